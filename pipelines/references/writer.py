"""Running a writer UNet over reference latents and capturing its norm1 features (ComfyUI host side).

The capture is an ``attn1_patch``: it sees exactly the norm1 output that the official codes store, plus the
block's token grid (``activations_shape``) for the mask projection. The writer's forward is otherwise untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import comfy.model_management
import comfy.utils
import torch
from torch import Tensor

from ...attention.adain import FeatureStats, UNetBlock, feature_stats
from ...attention.bank import CapturedTokens, MaskProjector, select_tokens
from ...attention.blocks import BlockKey, walk_transformer_blocks


class _WriterDone(Exception):
    """Raised by the capture after the last block it needs: the rest of the writer's forward is wasted work."""


@dataclass(frozen=True, eq=False)
class WriterGroup:
    """References that share a latent size and a conditioning shape, run as one writer batch."""

    indices: tuple[int, ...]
    latents: Tensor  # [R, C, h, w], already in the model's sampling space (process_latent_in)
    conds: dict[str, Tensor]  # apply_model kwargs: c_crossattn, y, ...


@dataclass(frozen=True, eq=False)
class WriterInputs:
    """What a per-step writer pass needs: kept in the bank, never deep-copied."""

    patcher: Any  # comfy ModelPatcher of the writer
    groups: tuple[WriterGroup, ...]
    projector: MaskProjector
    count: int
    seed: int = 0
    noise: list = field(default_factory=list, repr=False)
    # True: the writer sees the clean latents at the current timestep (MimicBrush's reference UNet), instead
    # of latents noised to sigma with the fixed noise (reference-only).
    clean: bool = False

    def __deepcopy__(self, memo: dict) -> WriterInputs:
        return self

    def noise_for(self, group: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Fixed noise per group so every run of the same graph is reproducible."""
        while len(self.noise) <= group:
            g = self.groups[len(self.noise)]
            gen = torch.Generator(device="cpu").manual_seed(self.seed + len(self.noise))
            self.noise.append(torch.randn(g.latents.shape, generator=gen, dtype=torch.float32))
        return self.noise[group].to(device=device, dtype=dtype)


def label_conds(model: Any, clip: Any, label: str, latents: Tensor, device: torch.device) -> dict[str, Tensor]:
    """apply_model kwargs for a label, through the model's own extra_conds (SDXL adds its pooled ADM vector)."""
    tokens = clip.tokenize(label)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    extra = model.extra_conds(cross_attn=cond, pooled_output=pooled, device=device, noise=latents,
                              width=w, height=h, target_width=w, target_height=h)
    return {k: v.process_cond(batch_size=1, device=device, area=None).cond for k, v in extra.items()}


def group_references(latents: list[Tensor], conds: list[dict[str, Tensor]]) -> tuple[WriterGroup, ...]:
    buckets: dict[tuple, list[int]] = {}
    for i, (lat, cond) in enumerate(zip(latents, conds)):
        sig = (tuple(lat.shape),) + tuple((k, tuple(v.shape)) for k, v in sorted(cond.items()))
        buckets.setdefault(sig, []).append(i)
    groups = []
    for idx in buckets.values():
        groups.append(WriterGroup(
            tuple(idx),
            torch.cat([latents[i] for i in idx], dim=0),
            {k: torch.cat([conds[i][k] for i in idx], dim=0) for k in conds[idx[0]]},
        ))
    return tuple(groups)


class _Remaining:
    """What a writer pass still has to capture; the forward stops (``_WriterDone``) once nothing is left."""

    def __init__(self, keys: Sequence[BlockKey], points: Sequence[UNetBlock]) -> None:
        self.keys = set(keys)
        self.points = set(points)

    def done(self, item: tuple) -> None:
        self.keys.discard(item)
        self.points.discard(item)
        if not self.keys and not self.points:
            raise _WriterDone


def _capture_patch(store: dict[BlockKey, dict[int, CapturedTokens]], keys: Optional[set[BlockKey]],
                   indices: tuple[int, ...], projector: MaskProjector, keep_device: Optional[torch.device],
                   remaining: _Remaining):
    def capture(n: Tensor, context: Tensor, value: Tensor, extra_options: dict):
        block = extra_options.get("block")
        if block is None:
            return n, context, value
        key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
        if keys is not None and key not in keys:
            return n, context, value
        h, w = extra_options["activations_shape"][-2:]
        if n.shape[1] != h * w:
            raise RuntimeError(f"HumanRef: writer block {key} has {n.shape[1]} tokens for a {h}x{w} grid; "
                               "a patch that changes the token layout (HyperTile, ToMe) is on the writer model")
        slot = store.setdefault(key, {})
        for row, ref in enumerate(indices):
            weights = projector.weights(ref, (h, w))
            cap = select_tokens(n[row].detach(), weights)
            if keep_device is not None:
                cap = CapturedTokens(cap.tokens.to(keep_device), cap.dropped)
            slot[ref] = cap
        remaining.done(key)
        return n, context, value

    return capture


def _stats_patches(stats: dict[UNetBlock, dict[int, Optional[FeatureStats]]], indices: tuple[int, ...],
                   projector: MaskProjector, keep_device: Optional[torch.device], remaining: _Remaining,
                   only: frozenset = frozenset()):
    """input_block_patch and output_block_patch that record the UNet block outputs' statistics per reference
    (for AdaIN; ``only`` these blocks when given, else every one passed): input block i at its own patch, the
    middle block and output block i at output block i + 1's."""

    def record(point: UNetBlock, h: Tensor) -> None:
        if only and point not in only:
            return
        grid = (int(h.shape[-2]), int(h.shape[-1]))
        slot = stats.setdefault(point, {})
        for row, ref in enumerate(indices):
            found = feature_stats(h[row].detach(), projector.weights(ref, grid))
            if found is not None and keep_device is not None:
                found = FeatureStats(found.mean.to(keep_device), found.var.to(keep_device))
            slot[ref] = found
        remaining.done(point)

    def after_input(h: Tensor, transformer_options: dict) -> Tensor:
        block = transformer_options.get("block")
        if block is not None:
            record(("input", int(block[1])), h)
        return h

    def before_output(h: Tensor, hsp: Tensor, transformer_options: dict) -> tuple[Tensor, Tensor]:
        block = transformer_options.get("block")
        if block is not None:
            j = int(block[1])
            record(("middle", 0) if j == 0 else ("output", j - 1), h)
        return h, hsp

    return after_input, before_output


def run_writer(
    writer: WriterInputs,
    sigma: float,
    keys: Optional[Sequence[BlockKey]] = None,
    keep_device: Optional[torch.device] = None,
    progress: Optional[Any] = None,
    stats_out: Optional[dict[UNetBlock, tuple[Optional[FeatureStats], ...]]] = None,
    points: Sequence[UNetBlock] = (),
) -> dict[BlockKey, tuple[CapturedTokens, ...]]:
    """One writer forward per group at ``sigma`` (0 = clean latents at t = 0); features per block per ref.

    Above 0 the latents are noised to sigma, or, with ``writer.clean``, passed clean at sigma's timestep.

    ``keys``: the blocks to capture in execution order (the forward stops once they and ``points`` are
    captured); None = all, found by walking the model, which per-step callers avoid by passing their ordered keys.
    ``stats_out``: filled with the UNet block outputs' statistics per reference (AdaIN): those of ``points``
    (per-step passes), or of every block the forward passes when ``points`` is empty (a cached bank, whose
    reader chooses its blocks later).
    """
    patcher = writer.patcher
    model = patcher.model
    device = patcher.load_device
    wanted = list(keys) if keys is not None else [b.key for b in walk_transformer_blocks(model.diffusion_model)]
    if not wanted and not points:
        return {}
    keyset = set(wanted)
    store: dict[BlockKey, dict[int, CapturedTokens]] = {}
    stats: dict[UNetBlock, dict[int, Optional[FeatureStats]]] = {}
    base_to = patcher.model_options.get("transformer_options", {})
    for gi, group in enumerate(writer.groups):
        comfy.model_management.throw_exception_if_processing_interrupted()
        latents = group.latents.to(device)
        if sigma > 0 and writer.clean:
            # apply_model divides its input by the model's input scale at sigma: pre-multiply so the UNet sees
            # the clean latents themselves, with the timestep of sigma
            ones = torch.ones((1,) * latents.ndim, device=device, dtype=latents.dtype)
            scale = model.model_sampling.calculate_input(torch.tensor([sigma], device=device), ones)
            x = latents / scale
        elif sigma > 0:
            noise = writer.noise_for(gi, device, latents.dtype)
            x = model.model_sampling.noise_scaling(torch.tensor([sigma], device=device), noise, latents)
        else:
            x = latents
        s = torch.full((x.shape[0],), float(sigma), device=device)
        to = dict(base_to)
        patches = dict(to.get("patches", {}))
        remaining = _Remaining(wanted, points)
        capture = _capture_patch(store, keyset, group.indices, writer.projector, keep_device, remaining)
        patches["attn1_patch"] = list(patches.get("attn1_patch", [])) + [capture]
        if stats_out is not None:
            after_input, before_output = _stats_patches(stats, group.indices, writer.projector, keep_device,
                                                        remaining, frozenset(points))
            patches["input_block_patch"] = list(patches.get("input_block_patch", [])) + [after_input]
            patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [before_output]
        to["patches"] = patches
        to.pop("wrappers", None)
        conds = {k: v.to(device) for k, v in group.conds.items()}
        try:
            with torch.no_grad():
                model.apply_model(x, s, transformer_options=to, **conds)
        except _WriterDone:
            pass
        if progress is not None:
            progress.update(len(group.indices))
    if stats_out is not None:
        stats_out.update({point: tuple(per_ref.get(i) for i in range(writer.count)) for point, per_ref in stats.items()
                          if len(per_ref) == writer.count})
    return {key: tuple(per_ref[i] for i in range(writer.count)) for key, per_ref in store.items()
            if len(per_ref) == writer.count}


def encode_images(vae: Any, model: Any, images: list[Tensor], progress: Optional[Any] = None) -> list[Tensor]:
    """VAE-encode [H, W, 3] images one by one into the model's sampling space (``progress``: one step each)."""
    out = []
    for img in images:
        comfy.model_management.throw_exception_if_processing_interrupted()
        latent = vae.encode(img.unsqueeze(0)[..., :3])
        out.append(model.process_latent_in(latent))
        if progress is not None:
            progress.update(1)
    return out


def unet_in_channels(model: Any) -> Optional[int]:
    """Input channels of a ComfyUI UNet (BaseModel), or None when it has no conv_in where SD UNets have it."""
    try:
        return int(model.diffusion_model.input_blocks[0][0].weight.shape[1])
    except (AttributeError, IndexError, TypeError):
        return None


def check_writer_input(model: Any, latents: list[Tensor], name: str = "writer") -> None:
    """The writer runs on the references' latents alone: its UNet must take exactly their channels (an
    inpainting or MimicBrush UNet wants extra channels and would fail deep inside its first convolution)."""
    channels = unet_in_channels(model)
    if channels is not None and latents and channels != latents[0].shape[1]:
        raise ValueError(f"{name} has a {channels}-channel input but the reference latents have "
                         f"{latents[0].shape[1]} channels: connect a plain text-to-image UNet (not an inpainting or "
                         "MimicBrush UNet), for training-free use the checkpoint you sample with")


def progress_bar(total: int) -> Any:
    return comfy.utils.ProgressBar(total)
