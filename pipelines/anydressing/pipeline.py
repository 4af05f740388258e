"""AnyDressing's GarmentsNet on a ComfyUI model: garment features for Dressing-Attention, one writer pass.

The writer (any SD1.5 UNet) runs once at t = 0 on the clean garment latents with cross-attention removed.
Every garment is its own batch item, so it attends only to itself; with trained garment weights, its slot's
LoRA sits on q, k and v of every self-attention (Garment-Specific Feature Extractor), applied per batch item.
The captured features (each block's norm1 output, the engine's capture point) form a ReferenceBank whose
references are the garments, labelled by slot, carrying the file's W'_k, W'_v for the dressing attention.

Everything is installed on a clone of the writer through ComfyUI's hooks: an attn2 output patch that zeroes
cross-attention, an attn1 patch that hands the block's self-attention input to an attn1 replace adding the
per-row LoRA deltas. The writer model passed in is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ...attention.bank import MaskProjector, ReferenceBank, ReferenceInfo, Timing
from ...attention.blocks import BlockInfo, block_label, walk_transformer_blocks
from ...attention.lora import slot_lora_delta
from ..images import check_image, check_not_empty, flatten_alpha, one_mask, resize_image, resize_mask
from ..loading.comfy_unet import model_family
from ..notices import warn
from ..references.inputs import writer_size
from ..references.patch import bank_from_writer, existing_replaces, host_attention, replaced_by_another
from ..references.writer import WriterGroup, WriterInputs, check_writer_input, encode_images, progress_bar
from .weights import MASK_RULE, GarmentWeights, SlotLoRA

STASH_KEY = "humanref_garment_attn1_input"


@dataclass(frozen=True, eq=False)
class Garment:
    image: Tensor  # [H, W, 3], H and W multiples of 8
    mask: Optional[Tensor]  # [H, W] in 0..1, or None (the whole image)
    slot: str
    number: int  # which input it came from (1-based)


def prepare_garments(
    inputs: Sequence[tuple[int, Optional[Tensor], Optional[Tensor], str]],
    max_side: int,
) -> list[Garment]:
    """(input number, IMAGE or None, MASK or None, slot) per input -> garments, or a clear error naming the input.

    Garments run as one writer batch, so they must share a size; an alpha channel is refused rather than
    silently dropped (composite the garment onto its background, and give the alpha as the garment's mask).
    """
    given = []
    for number, image, mask, slot in inputs:
        gname, mname, sname = f"garment_{number}", f"mask_{number}", f"slot_{number}"
        if image is None:
            if mask is not None:
                raise ValueError(f"{mname} is connected but {gname} is not")
            continue
        image = check_image(image, gname)
        if image.shape[0] != 1:
            raise ValueError(f"{gname} must be one IMAGE [1, height, width, 3], got shape {tuple(image.shape)}: "
                             "give one image per garment input")
        image, alpha = flatten_alpha(image)  # the pack's RGBA rule: over white, the alpha is the mask
        if mask is None and alpha is not None and float(alpha.min()) < 1.0:
            mask, mname = alpha, f"{gname} alpha"
        slot = slot.strip()
        if not slot:
            raise ValueError(f"{sname} is empty: name the garment's slot, e.g. 'upper' or 'lower'")
        if mask is not None:
            mask = one_mask(mask, mname)
            check_not_empty(mask[None], mname, f"it would select nothing of {gname}; disconnect it to use the "
                                               "whole image")
        given.append((number, image[0], mask, slot))
    if not given:
        raise ValueError("no garments: connect garment_1 (and more garment inputs for more garments)")
    seen: dict[str, int] = {}
    for number, _, _, slot in given:
        if slot in seen:
            raise ValueError(f"slot_{number} is {slot!r}, the same as slot_{seen[slot]}: every garment needs its "
                             "own slot (one upper, one lower, ...)")
        seen[slot] = number
    first = given[0]
    for number, image, _, _ in given[1:]:
        if image.shape[:2] != first[1].shape[:2]:
            raise ValueError(f"garment_{number} is {image.shape[1]}x{image.shape[0]} but garment_{first[0]} is "
                             f"{first[1].shape[1]}x{first[1].shape[0]}: give every garment the same size (they "
                             "run as one writer batch)")
    height, width = first[1].shape[:2]
    size = writer_size(height, width, max_side)
    out = []
    for number, image, mask, slot in given:
        img = resize_image(image.unsqueeze(0), size)[0]
        m = None
        if mask is not None:
            if tuple(mask.shape) != (height, width):
                warn(f"mask_{number} is {mask.shape[1]}x{mask.shape[0]} but garment_{number} is {width}x{height}; "
                     "the mask is stretched to the garment")
            m = resize_mask(mask.unsqueeze(0), size)[0]
        out.append(Garment(img, m, slot, number))
    return out


def garment_regions(regions: Sequence[tuple[int, Optional[Tensor]]], garments: Sequence[Garment]) -> Optional[Tensor]:
    """Target regions (input number, MASK or None) -> [G, H, W] in garment order, all ones where none is given.

    Regions are scale-free (projected on each block's grid at sampling), so they are brought to the first
    region's size; None when no region is connected.
    """
    given = {number: mask for number, mask in regions if mask is not None}
    if not given:
        return None
    numbers = {g.number for g in garments}
    for number, mask in given.items():
        if number not in numbers:
            raise ValueError(f"region_{number} is connected but garment_{number} is not")
        mask = one_mask(mask, f"region_{number}")
        check_not_empty(mask[None], f"region_{number}", f"garment_{number} would be nowhere; disconnect it to let "
                                                        "the garment go anywhere")
        given[number] = mask
    first = next(iter(given.values()))
    size = (int(first.shape[0]), int(first.shape[1]))
    out = []
    for g in garments:
        mask = given.get(g.number)
        out.append(torch.ones(size) if mask is None else resize_mask(mask.unsqueeze(0), size)[0])
    return torch.stack(out).clamp(0.0, 1.0)


def _no_cross_attention(n: Tensor, extra_options: dict) -> Tensor:
    """attn2 output patch: GarmentsNet has no cross-attention, so its residual contribution is zero."""
    return torch.zeros_like(n)


def _stash_attn1_input(n: Tensor, context: Tensor, value: Tensor, extra_options: dict):
    """attn1 patch: the replace only sees projected q/k/v; the LoRA needs the input they were projected from."""
    extra_options[STASH_KEY] = (n, context, value)
    return n, context, value


class GarmentLoRAReplace:
    """attn1 replace of one writer block: q/k/v + each batch row's slot LoRA, then plain self-attention."""

    def __init__(self, block: BlockInfo, rows: Sequence[SlotLoRA], scale: float) -> None:
        self.block = block
        self.scale = scale
        # per projection: down [B, r, C] and up [B, C, r], one row per garment
        self.down = [torch.stack([getattr(r, p)[0].float() for r in rows]) for p in ("q", "k", "v")]
        self.up = [torch.stack([getattr(r, p)[1].float() for r in rows]) for p in ("q", "k", "v")]
        self._cast: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}

    def __deepcopy__(self, memo: dict) -> GarmentLoRAReplace:
        return self

    def _weights(self, like: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = ([d.to(device=like.device, dtype=like.dtype) for d in self.down],
                               [u.to(device=like.device, dtype=like.dtype) for u in self.up])
        return self._cast[key]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        stash = extra_options.get(STASH_KEY)
        if stash is None:
            raise RuntimeError(f"HumanRef: garment writer block {block_label(self.block.key)} ran without its "
                               "input stash (another patch replaced attn1_patch?)")
        if q.shape[0] != self.down[0].shape[0]:
            raise RuntimeError(f"HumanRef: garment writer got a batch of {q.shape[0]} rows for "
                               f"{self.down[0].shape[0]} garments")
        downs, ups = self._weights(q)
        dtype = q.dtype
        q, k, v = [t + slot_lora_delta(src.to(dtype), d, u, self.scale)
                   for t, src, d, u in zip((q, k, v), stash, downs, ups)]
        return host_attention(extra_options)(q, k, v, extra_options["n_heads"])


def garment_writer(writer: Any, blocks: Sequence[BlockInfo], rows: Optional[Sequence[str]],
                   weights: Optional[GarmentWeights]) -> Any:
    """A clone of the writer with cross-attention removed and, with weights, each row's slot LoRA."""
    patcher = writer.clone()
    patcher.set_model_attn2_output_patch(_no_cross_attention)
    if weights is None or rows is None:
        return patcher
    replaces = existing_replaces(patcher, "attn1")
    patcher.set_model_attn1_patch(_stash_attn1_input)
    for b in blocks:
        if b.key in replaces:
            raise replaced_by_another(f"writer block {block_label(b.key)}", replaces[b.key],
                                      "give the garment extractor a plain writer model")
        per_row = [weights.lora[slot][b.path] for slot in rows]
        patcher.set_model_attn1_replace(GarmentLoRAReplace(b, per_row, weights.scale), b.key[0], b.key[1], b.key[2])
    return patcher


def _empty_conds(model: Any, count: int, device: torch.device) -> dict[str, Tensor]:
    """Model inputs without any condition: cross-attention is removed, so the context is one zero token."""
    unet_config = getattr(model.model_config, "unet_config", {})
    context_dim = int(unet_config.get("context_dim") or 768)
    conds = {"c_crossattn": torch.zeros(count, 1, context_dim, device=device)}
    adm = unet_config.get("adm_in_channels")
    if adm:
        conds["y"] = torch.zeros(count, int(adm), device=device)
    return conds


def build_garment_bank(writer: Any, vae: Any, garments: Sequence[Garment],
                       weights: Optional[GarmentWeights] = None, regions: Optional[Tensor] = None) -> ReferenceBank:
    """Run GarmentsNet once at t = 0 and keep each garment's features per block (the engine's bank).

    ``regions`` [G, H, W]: each garment's region on the target (see :func:`garment_regions`), kept in the
    bank as the dual mode's default.
    """
    model = writer.model
    blocks = walk_transformer_blocks(model.diffusion_model)
    family = model_family(writer)
    if weights is not None:
        weights.check_model(blocks, family, "writer")
        slot_ids = [weights.slot_index(g.slot, f"slot_{g.number}") for g in garments]
        rows = [g.slot for g in garments]
    else:
        slot_ids = list(range(len(garments)))
        rows = None
    patcher = garment_writer(writer, blocks, rows, weights)
    pbar = progress_bar(2 * len(garments))
    latents = encode_images(vae, model, [g.image for g in garments], progress=pbar)
    check_writer_input(model, latents)
    inputs = WriterInputs(
        patcher=patcher,
        groups=(WriterGroup(tuple(range(len(garments))), torch.cat([lat.cpu() for lat in latents], dim=0),
                            _empty_conds(model, len(garments), torch.device("cpu"))),),
        projector=MaskProjector([g.mask for g in garments], MASK_RULE),
        count=len(garments),
    )
    infos = tuple(ReferenceInfo(g.slot, sid, (g.image.shape[0], g.image.shape[1]), g.mask is not None)
                  for g, sid in zip(garments, slot_ids))
    projections = None if weights is None else {b.key: weights.dressing[b.path] for b in blocks}
    return bank_from_writer(inputs, infos, Timing.ONCE, MASK_RULE, progress=pbar, projections=projections,
                            regions=regions)
