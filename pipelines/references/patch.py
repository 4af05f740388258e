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

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch
from torch import Tensor

from ...attention.bank import (
    MAX_REFERENCES,
    CapturedTokens,
    MaskProjector,
    ReferenceBank,
    ReferenceInfo,
    Timing,
    merge_captured,
)
from ...attention.blocks import (
    BlockInfo,
    BlockKey,
    block_label,
    describe_architecture,
    select_blocks,
    walk_transformer_blocks,
)
from ...attention.kernels import ProjectedReferences, project_references
from ...attention.masks import region_allowed
from ...attention.reader import ActivePatch, Mode, Strength, mode_named, reference_attention
from ..loading.comfy_unet import model_family
from ..notices import warn
from .inputs import PreparedReference
from .writer import (
    WriterInputs,
    check_writer_input,
    encode_images,
    group_references,
    label_conds,
    progress_bar,
    run_writer,
)

log = logging.getLogger("humanref")
RUNS_KEY = "humanref_runs"


# ----------------------------------------------------------------------------------------------- writer side
def build_reference_bank(
    writer: Any,
    vae: Any,
    clip: Any,
    refs: Sequence[PreparedReference],
    timing: Timing,
    mask_rule: str,
    seed: int = 0,
) -> ReferenceBank:
    """Encode references, and for ``once at t=0`` run the writer now and keep only the captured tokens."""
    if len(refs) > MAX_REFERENCES:
        raise ValueError(f"{len(refs)} references given; at most {MAX_REFERENCES} are supported")
    model = writer.model
    pbar = progress_bar(len(refs) * (2 if timing == Timing.ONCE else 1))
    device = writer.load_device
    latents = encode_images(vae, model, [r.image for r in refs], progress=pbar)
    check_writer_input(model, latents)
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
    return bank_from_writer(inputs, infos, timing, mask_rule, progress=pbar)


def bank_from_writer(
    inputs: WriterInputs,
    infos: tuple[ReferenceInfo, ...],
    timing: Timing,
    mask_rule: str,
    keys: Optional[Sequence[BlockKey]] = None,
    progress: Optional[Any] = None,
    **extras: Any,
) -> ReferenceBank:
    """The bank of a writer: ``every step`` keeps the inputs for a writer pass per step; ``once at t=0`` runs the
    writer now (only the blocks ``keys``, None = all) and keeps its features. ``extras``: more bank fields."""
    patcher = inputs.patcher
    channels = {b.key: b.channels for b in walk_transformer_blocks(patcher.model.diffusion_model)}
    family = model_family(patcher)
    if timing == Timing.EVERY_STEP:
        return ReferenceBank(infos, channels, timing, mask_rule, writer=inputs, family=family, **extras)
    comfy.model_management.load_models_gpu([patcher])
    features = run_writer(inputs, 0.0, keys=keys, keep_device=comfy.model_management.intermediate_device(),
                          progress=progress)
    return ReferenceBank(infos, channels, timing, mask_rule, features=features, family=family, **extras)


def existing_replaces(patcher: Any, attn: str) -> dict:
    """The ``attn1``/``attn2`` replace patches already on a ModelPatcher, by block key."""
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get(attn, {})


def replaced_by_another(where: str, existing: Any, advice: str) -> ValueError:
    """The error for a block whose self-attention another node already replaces (two replaces cannot chain)."""
    return ValueError(f"another node already replaces self-attention at {where} ({type(existing).__name__}); "
                      f"{advice}")


# ----------------------------------------------------------------------------------------------- reader side
@dataclass(frozen=True, eq=False)
class ReferencePatch:
    """One MaskedSharedAttentionPatch: a bank and how it is injected. Shared by clones, never deep-copied."""

    uid: str
    bank: ReferenceBank
    mode: Mode
    strength: float
    start_percent: float
    end_percent: float
    uncond: bool
    paths: dict = field(default_factory=dict)  # BlockKey -> module path, in the UNet's execution order
    regions: Optional[Tensor] = None  # dual: one target-region mask [R, H, W] per reference of the bank

    def __deepcopy__(self, memo: dict) -> ReferencePatch:
        return self

    @property
    def weight(self) -> float:
        """The kernel's ratio or lambda; a mass strength goes into the projected references' bias instead."""
        return 1.0 if self.mode.strength_is is Strength.MASS else self.strength

    @property
    def mass(self) -> float:
        return self.strength if self.mode.strength_is is Strength.MASS else 1.0

    def uses_chunks(self, cond_or_uncond: Optional[Sequence[int]]) -> bool:
        return not cond_or_uncond or any(c == 0 or self.uncond for c in cond_or_uncond)


class RunState:
    """Per sampling run: activity at the current sigma, writer features, projected reference K/V per block."""

    def __init__(self, patch: ReferencePatch, sigma_start: float, sigma_end: float) -> None:
        self.patch = patch
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
        active = self.sigma_start >= sigma >= self.sigma_end and self.patch.uses_chunks(cond_or_uncond)
        self.call_active = active
        if not active:
            return
        bank = self.patch.bank
        if bank.cached:
            if self.features is None:
                self.features = dict(bank.features)
            return
        if self.writer_sigma != sigma:
            self.features = run_writer(bank.writer, sigma, keys=tuple(self.patch.paths))
            self.writer_sigma = sigma
            self.writer_passes += 1
            self.projected.clear()

    def refs_for(self, key: BlockKey, like: Tensor) -> Optional[ProjectedReferences]:
        if key in self.projected:
            return self.projected[key]
        refs = None
        entries = None if self.features is None else self.features.get(key)
        patch, mode = self.patch, self.patch.mode
        separate = not mode.joins_own_keys
        if entries and not (separate and patch.strength == 0):  # lambda = 0: exactly the frozen self-attention
            merged = merge_captured(entries)
            tokens = merged.tokens.to(device=like.device, dtype=like.dtype)
            attn1 = self.unet.get_submodule(patch.paths[key]).attn1
            to_k, to_v = attn1.to_k, attn1.to_v
            if separate and patch.bank.projections is not None and key in patch.bank.projections:
                to_k, to_v = patch.bank.projections[key]  # trained W'_k, W'_v
            refs = project_references(tokens, merged.dropped, to_k, to_v, strength=patch.mass, dilute=mode.dilutes)
            if refs is not None and mode.takes_regions:
                segments = tuple(int(e.tokens.shape[0]) for e in entries)
                refs = ProjectedReferences(refs.k, refs.v, refs.bias, segments)
        self.projected[key] = refs
        return refs

    def allowed_for(self, grid: tuple[int, int], like: Tensor) -> Optional[Tensor]:
        """Which references each target token may attend to on this grid (dual region masks), or None."""
        regions = self.patch.regions
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
    """The attn1 replace of one block: every chained HumanRef patch that covers this block."""

    def __init__(self, key: BlockKey, patches: tuple[ReferencePatch, ...]) -> None:
        self.key = key
        self.patches = patches

    def __deepcopy__(self, memo: dict) -> ReferenceAttnReplace:
        return self

    def with_patch(self, patch: ReferencePatch) -> ReferenceAttnReplace:
        return ReferenceAttnReplace(self.key, self.patches + (patch,))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        runs = extra_options.get(RUNS_KEY) or {}
        active: list[ActivePatch] = []
        for patch in self.patches:
            state: Optional[RunState] = runs.get(patch.uid)
            if state is None or not state.call_active:
                continue
            refs = state.refs_for(self.key, q)
            if refs is not None:
                allowed = None
                if patch.regions is not None:
                    h, w = extra_options["activations_shape"][-2:]
                    allowed = state.allowed_for((int(h), int(w)), q) if q.shape[1] == h * w else None
                active.append(ActivePatch(patch.mode, refs, patch.weight, patch.uncond, allowed))
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


def _outer_sample_wrapper(patch: ReferencePatch):
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        try:
            sampling = guider.model_patcher.get_model_object("model_sampling")
            state = RunState(patch, float(sampling.percent_to_sigma(patch.start_percent)),
                             float(sampling.percent_to_sigma(patch.end_percent)))
            to = guider.model_options.setdefault("transformer_options", {})
            runs = dict(to.get(RUNS_KEY, {}))
            runs[patch.uid] = state
            to[RUNS_KEY] = runs
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    return wrapper


def _diffusion_model_wrapper(patch: ReferencePatch):
    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        state = (transformer_options.get(RUNS_KEY) or {}).get(patch.uid)
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


def check_regions(regions: Optional[Tensor], bank: ReferenceBank, mode: Mode) -> Optional[Tensor]:
    """Region masks [R, H, W] (float, CPU), one per reference of the bank, or a clear error naming them."""
    if regions is None:
        return None
    if not mode.takes_regions:
        raise ValueError(f"region_masks apply to mode 'dual' only (got mode {mode.name!r}); disconnect them or use "
                         "dual")
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

    ``mode``: a name in the engine's mode table (``attention.reader.MODES``), as the patch node's combo holds it.
    ``regions`` (dual mode only): one target-region mask per reference of the bank, [R, H, W] in 0..1 at any
    resolution (scaled to each block's grid): target tokens outside reference r's region do not attend to r.
    None: the bank's own regions, if it has any.
    """
    injection = mode_named(mode)
    if regions is None and injection.takes_regions:
        regions = bank.regions  # the garments' own regions, given to the garment extractor
    regions = check_regions(regions, bank, injection)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")
    if block_set != "custom" and custom_blocks.strip():
        warn(f"custom_blocks ({custom_blocks.strip()!r}) is ignored because blocks is {block_set!r}; set blocks "
             "to 'custom' to use that list")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    patched = model.clone()
    all_blocks = walk_transformer_blocks(patched.model.diffusion_model)
    chosen = select_blocks(all_blocks, block_set, custom_blocks)
    check_compatible(bank, chosen, describe_architecture(all_blocks, model_family(patched)))
    uid = f"humanref_ref_{uuid.uuid4().hex[:12]}"
    chosen_keys = {b.key for b in chosen}
    patch = ReferencePatch(uid, bank, injection, float(strength), float(start_percent), float(end_percent),
                           bool(uncond), {b.key: b.path for b in all_blocks if b.key in chosen_keys}, regions)
    replaces = existing_replaces(patched, "attn1")
    for b in chosen:
        existing = replaces.get(b.key)
        if existing is None:
            replace = ReferenceAttnReplace(b.key, (patch,))
        elif isinstance(existing, ReferenceAttnReplace):
            replace = existing.with_patch(patch)
        else:
            raise replaced_by_another(f"block {block_label(b.key)}", existing,
                                      "apply HumanRef's patch first or choose other blocks")
        patched.set_model_attn1_replace(replace, b.key[0], b.key[1], b.key[2])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, uid, _outer_sample_wrapper(patch))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, uid,
                                 _diffusion_model_wrapper(patch))
    if not bank.cached and bank.writer.patcher.model is not patched.model:
        patched.set_additional_models(uid, [bank.writer.patcher])
    return patched
