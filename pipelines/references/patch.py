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
from typing import Any, Callable, Optional, Sequence

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch
from torch import Tensor

from ...attention.adain import FeatureStats, UNetBlock, adain_blocks, adain_chunks, unet_blocks_named
from ...attention.bank import (
    MAX_REFERENCES,
    CapturedTokens,
    MaskProjector,
    ReferenceBank,
    ReferenceInfo,
    Timing,
)
from ...attention.blocks import (
    CUSTOM_ENTRY,
    BlockInfo,
    BlockKey,
    block_label,
    custom_entries,
    describe_architecture,
    select_blocks,
    walk_transformer_blocks,
)
from ...attention.kernels import ProjectedReferences, project_parts
from ...attention.masks import region_allowed
from ...attention.reader import ActivePatch, Mode, Strength, mode_named, reference_attention
from ...attention.schedules import WeightType, weight_factor
from ..loading.comfy_unet import model_family
from ..notices import warn
from .attention_maps import RECORD_KEY, record_call
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
MIN_FACTOR = 1e-4  # a strength curve below this counts as off (the first step's progress is ~1e-9, not 0)


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
    stats: dict = {}
    features = run_writer(inputs, 0.0, keys=keys, keep_device=comfy.model_management.intermediate_device(),
                          progress=progress, stats_out=stats)
    return ReferenceBank(infos, channels, timing, mask_rule, features=features, family=family, stats=stats,
                         **extras)


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
    style_fidelity: float = 1.0  # 1: the uncond chunk does not see the references; 0: it sees them fully
    paths: dict = field(default_factory=dict)  # BlockKey -> module path, in the UNet's execution order
    regions: Optional[Tensor] = None  # dual: one target-region mask [R, H, W] per reference of the bank
    weights: tuple[float, ...] = ()  # one per reference of the bank (empty: all 1)
    weight_type: WeightType = WeightType.CONSTANT
    adain_points: tuple[UNetBlock, ...] = ()  # the UNet blocks whose outputs AdaIN moves (adain modes)

    def __deepcopy__(self, memo: dict) -> ReferencePatch:
        return self

    @property
    def weight(self) -> float:
        """The kernel's ratio or lambda; a mass strength goes into the projected references' bias instead."""
        return 1.0 if self.mode.strength_is is Strength.MASS else self.strength

    @property
    def mass(self) -> float:
        return self.strength if self.mode.strength_is is Strength.MASS else 1.0

    def weight_of(self, ref: int) -> float:
        return self.weights[ref] if self.weights else 1.0

    def uses_chunks(self, cond_or_uncond: Optional[Sequence[int]]) -> bool:
        return not cond_or_uncond or any(c == 0 or self.style_fidelity < 1.0 for c in cond_or_uncond)


class RunState:
    """Per sampling run: activity at the current sigma, writer features, projected reference K/V per block."""

    def __init__(self, patch: ReferencePatch, sigma_start: float, sigma_end: float,
                 percent_of: Optional[Callable[[float], float]] = None) -> None:
        self.patch = patch
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.percent_of = percent_of
        self.call_active = False
        self.factor = 1.0  # the weight type's factor at this call's step
        self.stats: Optional[dict[UNetBlock, tuple[Optional[FeatureStats], ...]]] = None
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
        patch = self.patch
        if active and patch.weight_type != WeightType.CONSTANT and self.percent_of is not None:
            span = patch.end_percent - patch.start_percent
            self.factor = weight_factor(patch.weight_type, (self.percent_of(sigma) - patch.start_percent) / span)
            active = self.factor >= MIN_FACTOR
        self.call_active = active
        if not active:
            return
        bank = patch.bank
        if bank.cached:
            if self.features is None:
                self.features = dict(bank.features)
                self.stats = dict(bank.stats or {})
            return
        if self.writer_sigma != sigma:
            stats: dict = {}
            keys = tuple(patch.paths) if patch.mode.attends else ()
            self.features = run_writer(bank.writer, sigma, keys=keys, stats_out=stats if patch.mode.adain else None,
                                       points=patch.adain_points)
            self.stats = stats
            self.writer_sigma = sigma
            self.writer_passes += 1
            self.projected.clear()

    def refs_for(self, key: BlockKey, like: Tensor) -> Optional[ProjectedReferences]:
        """The block's projected references at this call's strength (mass strength times the step's factor)."""
        if key not in self.projected:
            self.projected[key] = self._project(key, like)
        refs = self.projected[key]
        if refs is None or self.patch.mode.strength_is is not Strength.MASS:
            return refs
        mass = self.patch.strength * self.factor
        return None if mass <= 0 else scaled(refs, mass)

    def _project(self, key: BlockKey, like: Tensor) -> Optional[ProjectedReferences]:
        entries = None if self.features is None else self.features.get(key)
        patch, mode = self.patch, self.patch.mode
        separate = not mode.joins_own_keys
        if not entries or (separate and patch.strength == 0):  # lambda = 0: exactly the frozen self-attention
            return None
        attn1 = self.unet.get_submodule(patch.paths[key]).attn1
        to_k, to_v = attn1.to_k, attn1.to_v
        if separate and patch.bank.projections is not None and key in patch.bank.projections:
            to_k, to_v = patch.bank.projections[key]  # trained W'_k, W'_v
        parts = [(e.tokens.to(device=like.device, dtype=like.dtype), e.dropped, patch.weight_of(i))
                 for i, e in enumerate(entries)]
        return project_parts(parts, to_k, to_v, dilute=mode.dilutes, weight_values=separate)

    def stats_at(self, point: UNetBlock) -> tuple[Optional[FeatureStats], ...]:
        return (self.stats or {}).get(point, ())

    def allowed_for(self, grid: tuple[int, int], like: Tensor) -> Optional[Tensor]:
        """Which references each target token may attend to on this grid (dual region masks), or None."""
        regions = self.patch.regions
        if regions is None:
            return None
        if grid not in self.allowed:
            self.allowed[grid] = region_allowed(regions, grid).to(like.device)
        return self.allowed[grid]


def scaled(refs: ProjectedReferences, mass: float) -> ProjectedReferences:
    """``refs`` with every key's attention mass multiplied by ``mass`` (a log bias; 1 = unchanged)."""
    if mass == 1.0:
        return refs
    shift = torch.log(torch.tensor(mass, dtype=refs.k.dtype, device=refs.k.device))
    bias = shift.expand(refs.length) if refs.bias is None else refs.bias + shift
    return ProjectedReferences(refs.k, refs.v, bias, refs.segments)


def _adain_patches(patch: ReferencePatch):
    """input_block_patch and output_block_patch that move the block outputs of ``patch.adain_points`` toward the
    references' statistics while the patch is active (input block i: at its own patch; the middle block and
    output block i: at output block i + 1's patch, before the skip connection is joined)."""
    points = set(patch.adain_points)

    def move(point: UNetBlock, h: Tensor, transformer_options: dict) -> Tensor:
        if point not in points:
            return h
        state: Optional[RunState] = (transformer_options.get(RUNS_KEY) or {}).get(patch.uid)
        if state is None or not state.call_active:
            return h
        found = state.stats_at(point)
        strength = patch.strength * state.factor
        chosen = [(st, strength * patch.weight_of(i)) for i, st in enumerate(found)
                  if st is not None and patch.weight_of(i) > 0]
        if not chosen or strength <= 0:
            return h
        record = transformer_options.get(RECORD_KEY)
        if record is not None and not patch.mode.attends:
            record.acted_without_attention.add(patch.mode.name)
        return adain_chunks(h, transformer_options.get("cond_or_uncond"), [c[0] for c in chosen],
                            [c[1] for c in chosen], patch.style_fidelity)

    def after_input(h: Tensor, transformer_options: dict) -> Tensor:
        block = transformer_options.get("block")
        return h if block is None else move(("input", int(block[1])), h, transformer_options)

    def before_output(h: Tensor, hsp: Tensor, transformer_options: dict) -> tuple[Tensor, Tensor]:
        block = transformer_options.get("block")
        if block is None:
            return h, hsp
        j = int(block[1])
        return move(("middle", 0) if j == 0 else ("output", j - 1), h, transformer_options), hsp

    return after_input, before_output


def parse_reference_weights(text: str, bank: ReferenceBank, name: str = "reference_weights") -> tuple[float, ...]:
    """One weight per reference of the bank from '1.2, 0.6' (bank order) or 'face=1.2, shoes=0.6' (by label;
    unnamed references keep 1); empty: all 1."""
    entries = [e.strip() for e in text.replace(";", ",").replace("\n", ",").split(",") if e.strip()]
    count = len(bank.references)
    listing = ", ".join(f"{i + 1}: {r.label}" for i, r in enumerate(bank.references))
    if not entries:
        return ()

    def number(value: str, entry: str) -> float:
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{name}: {entry!r} is not a number; write e.g. '1.2, 0.6' or 'face=1.2'") from None
        if not 0.0 <= w <= 10.0:
            raise ValueError(f"{name}: {entry!r} is outside 0..10")
        return w

    named = ["=" in e for e in entries]
    if any(named) and not all(named):
        raise ValueError(f"{name}: give either one number per reference or label=weight pairs, not both "
                         f"({text!r})")
    if not any(named):
        if len(entries) != count:
            raise ValueError(f"{name} has {len(entries)} weights but the bank has {count} references ({listing}): "
                             "give one weight per reference, in that order, or label=weight pairs")
        return tuple(number(e, e) for e in entries)
    weights = [1.0] * count
    for entry in entries:
        label, value = (p.strip() for p in entry.split("=", 1))
        hits = [i for i, r in enumerate(bank.references) if r.label == label]
        if not hits:
            raise ValueError(f"{name}: no reference is labelled {label!r}; the bank has {listing}")
        for i in hits:
            weights[i] = number(value, entry)
    return tuple(weights)


def split_custom_blocks(custom: str, all_blocks: Sequence[BlockInfo], mode: Mode,
                        unet_blocks: set[UNetBlock]) -> tuple[str, tuple[UNetBlock, ...]]:
    """For an AdaIN mode's custom list: (the entries that name attention blocks, the UNet blocks named)."""
    attention: list[str] = []
    for item in custom_entries(custom):
        m = CUSTOM_ENTRY.match(item)
        block = (m.group(1), int(m.group(2))) if m else None
        if block is None or block not in unet_blocks:
            have = ", ".join(f"{k}_{i}" for k, i in sorted(unet_blocks))
            raise ValueError(f"custom_blocks entry {item!r} names no block of this model; it has {have}")
        if any(b.key[:2] == block for b in all_blocks):
            attention.append(item)
    if mode.attends and not attention:
        raise ValueError(f"custom_blocks ({custom!r}) names no block with self-attention for mode {mode.name!r}: "
                         "add one (e.g. output_3) or use mode 'adain'")
    return ", ".join(attention), unet_blocks_named(custom)


def unet_block_points(unet: Any) -> set[UNetBlock]:
    """The UNet blocks whose output AdaIN can reach: every input block, the middle, every output block but the
    last (ComfyUI has no patch point after it)."""
    points = {("input", i) for i in range(len(unet.input_blocks))}
    if getattr(unet, "middle_block", None) is not None:
        points.add(("middle", 0))
    points |= {("output", i) for i in range(len(unet.output_blocks) - 1)}
    return points


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
        sources: list[ReferencePatch] = []
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
                active.append(ActivePatch(patch.mode, refs, patch.weight * state.factor, patch.style_fidelity,
                                          allowed))
                sources.append(patch)
        if active:
            h, w = extra_options["activations_shape"][-2:]
            if q.shape[1] != h * w:
                raise RuntimeError(
                    f"HumanRef: block {block_label(self.key)} got {q.shape[1]} query tokens for a {h}x{w} grid. "
                    "A patch that changes the token layout (HyperTile, Token Merging) is applied to this model; "
                    "reference attention needs one query per latent pixel: remove that patch from the model you "
                    "sample with references (it can stay on models sampled without them).")
        heads = extra_options["n_heads"]
        record = extra_options.get(RECORD_KEY)
        if record is not None and active:
            record_call(record, self.key, q, k, heads, active, sources, extra_options)
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
                             float(sampling.percent_to_sigma(patch.end_percent)), percent_of_sigma(sampling))
            to = guider.model_options.setdefault("transformer_options", {})
            runs = dict(to.get(RUNS_KEY, {}))
            runs[patch.uid] = state
            to[RUNS_KEY] = runs
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original

    return wrapper


def percent_of_sigma(sampling: Any) -> Callable[[float], float]:
    """The inverse of the model's percent_to_sigma (monotone decreasing), by bisection, cached per sigma."""
    cache: dict[float, float] = {}

    def percent(sigma: float) -> float:
        if sigma not in cache:
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if float(sampling.percent_to_sigma(mid)) > sigma:
                    lo = mid
                else:
                    hi = mid
            cache[sigma] = (lo + hi) / 2
        return cache[sigma]

    return percent


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
    style_fidelity: float = 1.0,
    regions: Optional[Tensor] = None,
    reference_weights: str = "",
    weight_type: str = WeightType.CONSTANT,
) -> Any:
    """A patched clone of ``model``; the input model is never modified.

    ``mode``: a name in the engine's mode table (``attention.reader.MODES``), as the patch node's combo holds it.
    ``style_fidelity``: 1 keeps the references out of the uncond chunk (official Parts2Whole/MimicBrush), 0
    shows them to it fully; between, the anchors' mix (``attention.reader``).
    ``regions`` (dual mode only): one target-region mask per reference of the bank, [R, H, W] in 0..1 at any
    resolution (scaled to each block's grid): target tokens outside reference r's region do not attend to r.
    None: the bank's own regions, if it has any.
    ``reference_weights``: one strength per reference (:func:`parse_reference_weights`); ``weight_type``: the
    strength's curve over the active steps (``attention.schedules``).
    """
    injection = mode_named(mode)
    kind = WeightType.from_label(weight_type, "weight_type")
    if regions is None and injection.takes_regions:
        regions = bank.regions  # the garments' own regions, given to the garment extractor
    regions = check_regions(regions, bank, injection)
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")
    if not 0.0 <= style_fidelity <= 1.0:
        raise ValueError(f"style_fidelity must be in 0..1, got {style_fidelity}")
    if block_set != "custom" and custom_blocks.strip():
        warn(f"custom_blocks ({custom_blocks.strip()!r}) is ignored because blocks is {block_set!r}; set blocks "
             "to 'custom' to use that list")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    weights = parse_reference_weights(reference_weights, bank)
    patched = model.clone()
    unet = patched.model.diffusion_model
    all_blocks = walk_transformer_blocks(unet)
    family = model_family(patched)
    attention_custom, points = custom_blocks, ()
    if injection.adain:
        if block_set == "custom":
            every_block = unet_block_points(unet) | {("output", len(unet.output_blocks) - 1)}
            attention_custom, named = split_custom_blocks(custom_blocks, all_blocks, injection, every_block)
            points = adain_blocks(family, "custom", 0, 0, named)
        else:
            points = adain_blocks(family, block_set, len(unet.input_blocks), len(unet.output_blocks))
        check_stats(bank, points, unet_block_points(unet))
        if bank.cached and strength > 0:
            warn(f"{injection.name} with a reference bank encoded 'once at t=0' applies the clean references' "
                 "statistics at every step, also the noisiest, which can wash the picture out (A1111/ACN take "
                 "them from the reference noised to each step). Encode the references with timing 'every step' "
                 "for AdaIN")
    chosen = select_blocks(all_blocks, block_set, attention_custom) if injection.attends else []
    check_compatible(bank, chosen, describe_architecture(all_blocks, family))
    uid = f"humanref_ref_{uuid.uuid4().hex[:12]}"
    chosen_keys = {b.key for b in chosen}
    patch = ReferencePatch(uid, bank, injection, float(strength), float(start_percent), float(end_percent),
                           float(style_fidelity), {b.key: b.path for b in all_blocks if b.key in chosen_keys},
                           regions, weights, kind, points)
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
    if points:
        after_input, before_output = _adain_patches(patch)
        patched.set_model_input_block_patch(after_input)
        patched.set_model_output_block_patch(before_output)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, uid, _outer_sample_wrapper(patch))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, uid,
                                 _diffusion_model_wrapper(patch))
    if not bank.cached and bank.writer.patcher.model is not patched.model:
        patched.set_additional_models(uid, [bank.writer.patcher])
    return patched


def check_stats(bank: ReferenceBank, points: Sequence[UNetBlock], reachable: set[UNetBlock]) -> None:
    """AdaIN's blocks exist in the model and, for a cached bank, their statistics are in the bank."""
    for point in points:
        name = f"{point[0]}_{point[1]}"
        if point not in reachable:
            raise ValueError(f"AdaIN cannot act on block {name}: this model's blocks are "
                             f"{', '.join(f'{k}_{i}' for k, i in sorted(reachable))} (the last output block has no "
                             "patch point)")
        if bank.cached and point not in (bank.stats or {}):
            raise ValueError(f"reference_bank holds no statistics for block {name}, which mode adain needs: "
                             "encode the references again with this version of the Reference Encoder (a bank "
                             "saved or built before AdaIN existed has none)")
