"""Shared-attention references on a ComfyUI model: build a bank from a writer, patch a reader with it.

Per sampling run (OUTER_SAMPLE wrapper) a fresh :class:`RunState` per patch goes into
``transformer_options``; per model call (DIFFUSION_MODEL wrapper) it decides whether the patch is active at this
sigma and, for ``every step`` banks, runs the writer once per new sigma. The attn1 replace then projects the
references with the reader's own (LoRA-patched) to_k/to_v once per run (once per writer pass for per-step
banks) and calls the engine.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from ...attention.bank import (MAX_REFERENCES, CapturedTokens, MaskProjector, ReferenceBank, ReferenceInfo,
                              merge_captured)
from ...attention.blocks import BlockInfo, BlockKey, block_label, describe_architecture, select_blocks, walk_transformer_blocks
from ...attention.kernels import ProjectedReferences, project_references
from ...attention.masks import region_allowed
from ...attention.reader import DILUTING_MODES, MODES, ActiveLayer, reference_attention
from .inputs import PreparedReference
from .writer import (WriterInputs, check_writer_input, encode_images, group_references, label_conds, progress_bar,
                     run_writer)

log = logging.getLogger("humanref")
RUNS_KEY = "humanref_runs"


# ----------------------------------------------------------------------------------------------- writer side
def build_reference_bank(
    writer: Any,
    vae: Any,
    clip: Any,
    refs: Sequence[PreparedReference],
    timing: str,
    mask_rule: str,
    seed: int = 0,
) -> ReferenceBank:
    """Encode references, and for ``once at t=0`` run the writer now and keep only the captured tokens."""
    if len(refs) > MAX_REFERENCES:
        raise ValueError(f"{len(refs)} references given; at most {MAX_REFERENCES} are supported")
    model = writer.model
    blocks = walk_transformer_blocks(model.diffusion_model)
    pbar = progress_bar(len(refs) * (2 if timing == "once at t=0" else 1))
    device = writer.load_device
    latents = encode_images(vae, model, [r.image for r in refs])
    check_writer_input(model, latents)
    pbar.update(len(refs))
    cond_cache: dict[str, dict[str, Tensor]] = {}
    conds = []
    for r, lat in zip(refs, latents):
        if r.label not in cond_cache:
            cond_cache[r.label] = {k: v.cpu() for k, v in label_conds(model, clip, r.label, lat, device).items()}
        conds.append(cond_cache[r.label])
    inputs = WriterInputs(
        patcher=writer,
        groups=group_references([lat.cpu() for lat in latents], conds),
        projector=MaskProjector([r.mask for r in refs], mask_rule),
        count=len(refs),
        seed=seed,
    )
    infos = tuple(ReferenceInfo(r.label, r.slot, (r.image.shape[0], r.image.shape[1]), r.mask is not None)
                  for r in refs)
    channels = {b.key: b.channels for b in blocks}
    family = model_family(writer)
    if timing == "every step":
        return ReferenceBank(infos, channels, timing, mask_rule, features=None, writer=inputs, family=family)
    comfy.model_management.load_models_gpu([writer])
    features = run_writer(inputs, 0.0, keep_device=comfy.model_management.intermediate_device(), progress=pbar)
    return ReferenceBank(infos, channels, timing, mask_rule, features=features, writer=None, family=family)


def model_family(patcher: Any) -> str:
    """ComfyUI's name for the model family (SD15, SDXL, ...) from its supported-model config."""
    config = getattr(patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else ""


# ----------------------------------------------------------------------------------------------- reader side
@dataclass(frozen=True, eq=False)
class ReferenceLayer:
    """One MaskedSharedAttentionPatch: a bank and how it is injected. Shared by clones, never deep-copied."""

    uid: str
    bank: ReferenceBank
    mode: str
    strength: float
    start_percent: float
    end_percent: float
    uncond: bool
    paths: dict = field(default_factory=dict)  # BlockKey -> module path, in the UNet's execution order
    regions: Optional[Tensor] = None  # dual: one target-region mask [R, H, W] per reference of the bank

    def __deepcopy__(self, memo: dict) -> "ReferenceLayer":
        return self

    @property
    def weight(self) -> float:
        return self.strength if self.mode in ("blend", "dual") else 1.0

    def uses_chunks(self, cond_or_uncond: Optional[Sequence[int]]) -> bool:
        return not cond_or_uncond or any(c == 0 or self.uncond for c in cond_or_uncond)


class RunState:
    """Per sampling run: activity at the current sigma, writer features, projected reference K/V per block."""

    def __init__(self, layer: ReferenceLayer, sigma_start: float, sigma_end: float) -> None:
        self.layer = layer
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.call_active = False
        self.unet: Optional[torch.nn.Module] = None
        self.features: Optional[dict[BlockKey, tuple[CapturedTokens, ...]]] = None
        self.writer_sigma: Optional[float] = None
        self.projected: dict[BlockKey, Optional[ProjectedReferences]] = {}
        self.allowed: dict[tuple[int, int], Tensor] = {}
        self.writer_passes = 0

    def begin_call(self, unet: torch.nn.Module, transformer_options: dict) -> None:
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else 0.0
        self.unet = unet
        cond_or_uncond = transformer_options.get("cond_or_uncond")
        active = self.sigma_start >= sigma >= self.sigma_end and self.layer.uses_chunks(cond_or_uncond)
        self.call_active = active
        if not active:
            return
        bank = self.layer.bank
        if bank.cached:
            if self.features is None:
                self.features = dict(bank.features)
            return
        if self.writer_sigma != sigma:
            self.features = run_writer(bank.writer, sigma, keys=tuple(self.layer.paths))
            self.writer_sigma = sigma
            self.writer_passes += 1
            self.projected.clear()

    def refs_for(self, key: BlockKey, like: Tensor) -> Optional[ProjectedReferences]:
        if key in self.projected:
            return self.projected[key]
        refs = None
        entries = None if self.features is None else self.features.get(key)
        if entries:
            merged = merge_captured(entries)
            tokens = merged.tokens.to(device=like.device, dtype=like.dtype)
            dropped = merged.dropped
            attn1 = self.unet.get_submodule(self.layer.paths[key]).attn1
            layer = self.layer
            strength = layer.strength if layer.mode in ("concat", "strict") else 1.0
            to_k, to_v = attn1.to_k, attn1.to_v
            if layer.mode == "dual" and layer.bank.projections is not None and key in layer.bank.projections:
                to_k, to_v = layer.bank.projections[key]  # trained W'_k, W'_v
            if layer.mode == "dual" and layer.strength == 0:
                refs = None  # lambda = 0: exactly the frozen self-attention
            else:
                refs = project_references(tokens, dropped, to_k, to_v, strength=strength,
                                          dilute=layer.mode in DILUTING_MODES)
            if refs is not None and layer.mode == "dual":
                segments = tuple(int(e.tokens.shape[0]) for e in entries)
                refs = ProjectedReferences(refs.k, refs.v, refs.bias, segments)
        self.projected[key] = refs
        return refs

    def allowed_for(self, grid: tuple[int, int], like: Tensor) -> Optional[Tensor]:
        """Which references each target token may attend to on this grid (dual region masks), or None."""
        regions = self.layer.regions
        if regions is None:
            return None
        if grid not in self.allowed:
            self.allowed[grid] = region_allowed(regions, grid).to(like.device)
        return self.allowed[grid]


def host_attention(extra_options: dict):
    """ComfyUI's optimized_attention bound to this call's precision and options (the engine's attn callable)."""
    precision = extra_options.get("attn_precision")

    def attn(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                   transformer_options=extra_options)

    return attn


class ReferenceAttnReplace:
    """The attn1 replace of one block: every chained HumanRef layer that covers this block."""

    def __init__(self, key: BlockKey, layers: tuple[ReferenceLayer, ...]) -> None:
        self.key = key
        self.layers = layers

    def __deepcopy__(self, memo: dict) -> "ReferenceAttnReplace":
        return self

    def with_layer(self, layer: ReferenceLayer) -> "ReferenceAttnReplace":
        return ReferenceAttnReplace(self.key, self.layers + (layer,))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        runs = extra_options.get(RUNS_KEY) or {}
        active: list[ActiveLayer] = []
        for layer in self.layers:
            state: Optional[RunState] = runs.get(layer.uid)
            if state is None or not state.call_active:
                continue
            refs = state.refs_for(self.key, q)
            if refs is not None:
                allowed = None
                if layer.regions is not None:
                    h, w = extra_options["activations_shape"][-2:]
                    allowed = state.allowed_for((int(h), int(w)), q) if q.shape[1] == h * w else None
                active.append(ActiveLayer(layer.mode, refs, layer.weight, layer.uncond, allowed))
        if active:
            h, w = extra_options["activations_shape"][-2:]
            if q.shape[1] != h * w:
                raise RuntimeError(
                    f"HumanRef: block {block_label(self.key)} got {q.shape[1]} query tokens for a {h}x{w} grid. "
                    "A patch that changes the token layout (HyperTile, Token Merging) is applied to this model; "
                    "reference attention needs one query per latent pixel: remove that patch from the model you "
                    "sample with references (it can stay on models sampled without them).")
        heads = extra_options["n_heads"]
        return reference_attention(q, k, v, heads, extra_options.get("cond_or_uncond"), active,
                                   host_attention(extra_options))


def _outer_sample_wrapper(layer: ReferenceLayer):
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        try:
            sampling = guider.model_patcher.get_model_object("model_sampling")
            state = RunState(layer, float(sampling.percent_to_sigma(layer.start_percent)),
                             float(sampling.percent_to_sigma(layer.end_percent)))
            to = guider.model_options.setdefault("transformer_options", {})
            runs = dict(to.get(RUNS_KEY, {}))
            runs[layer.uid] = state
            to[RUNS_KEY] = runs
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    return wrapper


def _diffusion_model_wrapper(layer: ReferenceLayer):
    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = (transformer_options.get(RUNS_KEY) or {}).get(layer.uid)
        if state is not None:
            state.begin_call(executor.class_obj, transformer_options)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return wrapper


def check_compatible(bank: ReferenceBank, blocks: Sequence[BlockInfo], model_desc: str) -> None:
    """The bank's writer and the reader must have the same transformer blocks with the same widths."""
    writer_blocks = [BlockInfo(k, c, "") for k, c in bank.block_channels.items()]
    mismatch = [b for b in blocks if bank.block_channels.get(b.key) != b.channels]
    if mismatch:
        raise ValueError(
            f"reference_bank was encoded with a writer of {describe_architecture(writer_blocks, bank.family)}, "
            f"but model is "
            f"{model_desc}: block {block_label(mismatch[0].key)} has width {mismatch[0].channels} in the model and "
            f"{bank.block_channels.get(mismatch[0].key, 'none')} in the bank. Encode the references with a writer "
            "of the same architecture (for training-free use, the same checkpoint).")


def check_regions(regions: Optional[Tensor], bank: ReferenceBank, mode: str) -> Optional[Tensor]:
    """Region masks [R, H, W] (float, CPU), one per reference of the bank, or a clear error naming them."""
    if regions is None:
        return None
    if mode != "dual":
        raise ValueError(f"region_masks apply to mode 'dual' only (got mode {mode!r}); disconnect them or use dual")
    if regions.ndim == 2:
        regions = regions.unsqueeze(0)
    names = ", ".join(f"{i + 1}: {r.label}" for i, r in enumerate(bank.references))
    if regions.ndim != 3:
        raise ValueError(f"region_masks must be a MASK [count, height, width], got shape {tuple(regions.shape)}")
    if regions.shape[0] != len(bank.references):
        raise ValueError(f"region_masks has {regions.shape[0]} masks but the bank has {len(bank.references)} "
                         f"references ({names}): give one region per reference, in that order")
    regions = regions.detach().float().cpu().clamp(0.0, 1.0)
    for i in range(regions.shape[0]):
        if float(regions[i].max()) <= 0.0:
            raise ValueError(f"region_masks item {i + 1} ({bank.references[i].label}) is empty: that reference "
                             "would be nowhere; give an all-ones mask to let it go anywhere")
    return regions


def apply_reference_patch(
    model: Any,
    bank: ReferenceBank,
    mode: str = "concat",
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    block_set: str = "all",
    custom_blocks: str = "",
    uncond: bool = False,
    regions: Optional[Tensor] = None,
) -> Any:
    """A patched clone of ``model``; the input model is never modified.

    ``regions`` (dual mode only): one target-region mask per reference of the bank, [R, H, W] in 0..1 at any
    resolution (scaled to each block's grid): target tokens outside reference r's region do not attend to r.
    None: the bank's own regions, if it has any.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if regions is None and mode == "dual":
        regions = bank.regions  # the garments' own regions, given to the garment extractor
    regions = check_regions(regions, bank, mode)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    patched = model.clone()
    all_blocks = walk_transformer_blocks(patched.model.diffusion_model)
    chosen = select_blocks(all_blocks, block_set, custom_blocks)
    check_compatible(bank, chosen, describe_architecture(all_blocks, model_family(patched)))
    uid = f"humanref_ref_{uuid.uuid4().hex[:12]}"
    chosen_keys = {b.key for b in chosen}
    layer = ReferenceLayer(uid, bank, mode, float(strength), float(start_percent), float(end_percent), bool(uncond),
                           {b.key: b.path for b in all_blocks if b.key in chosen_keys}, regions)
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for b in chosen:
        existing = replaces.get(b.key)
        if existing is None:
            patch = ReferenceAttnReplace(b.key, (layer,))
        elif isinstance(existing, ReferenceAttnReplace):
            patch = existing.with_layer(layer)
        else:
            raise ValueError(f"another node already replaces self-attention at block {block_label(b.key)} "
                             f"({type(existing).__name__}); apply HumanRef's patch first or choose other blocks")
        patched.set_model_attn1_replace(patch, b.key[0], b.key[1], b.key[2])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, uid, _outer_sample_wrapper(layer))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, uid,
                                 _diffusion_model_wrapper(layer))
    if not bank.cached and bank.writer.patcher.model is not patched.model:
        patched.set_additional_models(uid, [bank.writer.patcher])
    return patched
