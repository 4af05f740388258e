"""Parts2Whole's inference on the engine: references, decoupled image cross-attention and the pose guider.

The official pipeline (huanngzh/Parts2Whole ``Refs2ImagePipeline``), mapped onto ComfyUI:

- each part is resized (aspect not kept) to the output size, an alpha channel is composited over white and
  becomes the part's mask unless a MASK is given; the reference UNet runs once at t = 0 per part with the part's
  label as text, and its norm1 features, masked with the Parts2Whole rule, feed all transformer blocks of the
  denoising UNet through the ``concat`` kernel; the uncond pass sees no references
  (``pipelines.references``);
- every cross-attention layer also attends to exactly six CLIP image embeddings (one per part, zero padded;
  zeros for uncond), scale 1 (``attention.decoupled``), through an attn2 replace;
- the pose guider's output is added after conv_in for cond and uncond (``input_block_patch`` at input 0).

``as released`` reproduces two bugs of the official pipeline: every part and the prompt get the first
part's label embedding. ``as trained`` (default) gives each part its label and keeps the prompt.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention.bank import Timing
from ...attention.blocks import BlockKey, block_label, describe_architecture, walk_transformer_blocks
from ...attention.decoupled import (
    MAX_IMAGE_TOKENS,
    DecoupledTokens,
    decoupled_cross_attention,
    pad_image_tokens,
    project_image_tokens,
)
from ...attention.labels import Labeled
from ...attention.reader import CONCAT
from ..images import BLACK, check_image, check_mask, check_not_empty, fit_mask, flatten_alpha, resize_image, to_bchw
from ..loading.comfy_unet import model_family
from ..notices import warn
from ..references.inputs import PreparedReference
from ..references.patch import apply_reference_patch, build_reference_bank, existing_replaces, host_attention
from .pose_guider import PoseGuider
from .release import Parts2WholeRelease

log = logging.getLogger("humanref")

LABELS: tuple[str, ...] = ("upper body clothes", "lower body clothes", "whole body clothes", "hair or headwear",
                           "face", "shoes")


class Parts2WholeMode(Labeled):
    AS_TRAINED = "as trained"  # each part gets its label, the prompt is kept
    AS_RELEASED = "as released"  # the official pipeline's two bugs: the first part's label everywhere


class MaskSource(Labeled):
    """What a part's MASK means: the part's pixels, or LoadImage's mask (1 - alpha, 1 = transparent)."""

    MASK = "mask: 1 = part"
    ALPHA = "LoadImage alpha: 1 = transparent"


MODES: tuple[str, ...] = Parts2WholeMode.labels()
MASK_SOURCES: tuple[str, ...] = MaskSource.labels()
MAX_PARTS = MAX_IMAGE_TOKENS
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_STEPS, DEFAULT_CFG = 768, 512, 50, 3.5


@dataclass(frozen=True)
class PartInput:
    slot: int  # 1-based input number, for messages
    image: Tensor  # IMAGE [B, H, W, 3 or 4]
    mask: Optional[Tensor]  # MASK [B, H, W] / [H, W] or None
    label: str


@dataclass(frozen=True, eq=False)
class PreparedPart:
    reference: PreparedReference  # resized, composited image and attention mask
    clip_image: Tensor  # [H, W, 3] as given (the official CLIP input is the original image)


# ----------------------------------------------------------------------------------------------- preprocessing
def _resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A mask resized as the official code resizes its mask images (PIL bicubic), [B, H, W] -> [B, h, w]."""
    return resize_image(mask.unsqueeze(-1), size)[..., 0]


def prepare_parts(parts: Sequence[PartInput], height: int, width: int,
                  mask_source: MaskSource = MaskSource.MASK) -> list[PreparedPart]:
    """The official preprocessing: resize to (height, width), alpha over white, mask from alpha or MASK."""
    mask_source = MaskSource.from_label(mask_source, "mask_source")
    out: list[PreparedPart] = []
    counts: list[str] = []
    for part in parts:
        iname, mname, lname = f"image_{part.slot}", f"mask_{part.slot}", f"label_{part.slot}"
        if part.label not in LABELS:
            raise ValueError(f"{lname} is {part.label!r}; Parts2Whole knows only the six labels {list(LABELS)}")
        image = check_image(part.image, iname)
        count, h, w = image.shape[0], image.shape[1], image.shape[2]
        counts.append(f"{iname}: {count}")
        rgb = image[..., :3].float()
        alpha = image[..., 3].float() if image.shape[-1] == 4 else None
        mask = None
        if part.mask is not None:
            mask = check_mask(part.mask, mname, count, iname).expand(count, -1, -1)
            mask = fit_mask(mask, (h, w), mname, iname, resize=_resize_mask)
            if mask_source == MaskSource.ALPHA:
                alpha, mask = 1.0 - mask, None
        rgb_t = resize_image(rgb, (height, width))
        attn_mask = None
        if alpha is not None:
            alpha_t = resize_image(alpha.unsqueeze(-1), (height, width))
            rgb_t = rgb_t * alpha_t + (1.0 - alpha_t)
            attn_mask = alpha_t[..., 0]
        if mask is not None:
            attn_mask = _resize_mask(mask, (height, width))
        if attn_mask is not None:
            check_not_empty(attn_mask, mname if mask is not None else f"{iname} alpha",
                            "it would select nothing of the part")
        for i in range(count):
            m = None if attn_mask is None else attn_mask[i]
            ref = PreparedReference(rgb_t[i].contiguous(), m, part.label, part.slot - 1)
            out.append(PreparedPart(ref, rgb[i]))
    if not out:
        raise ValueError("no part images: connect at least one of image_1 ... image_6")
    if len(out) > MAX_PARTS:
        raise ValueError(f"{len(out)} part images were given ({', '.join(counts)}) but Parts2Whole takes at most "
                         f"{MAX_PARTS} (its decoupled cross-attention has six image tokens); count every image of "
                         "every batch")
    return out


def prepare_pose(pose: Tensor, height: int, width: int) -> Tensor:
    """IMAGE [1, H, W, 3] -> [1, 3, height, width] in 0..1 (the official pipeline resizes the pose too)."""
    pose = check_image(pose, "pose")
    if pose.shape[0] != 1:
        raise ValueError(f"pose has {pose.shape[0]} images; give exactly one pose (DensePose) image")
    if tuple(pose.shape[1:3]) != (height, width):
        log.info("HumanRef: pose is %dx%d; resized to the output size %dx%d", pose.shape[2], pose.shape[1],
                 width, height)
    pose = flatten_alpha(pose.float(), BLACK)[0]  # a control map: transparent = its black background
    return to_bchw(resize_image(pose, (height, width))).contiguous()


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")


# ----------------------------------------------------------------------------------------------- image tokens
def encode_image_tokens(clip_vision: Any, images: Sequence[Tensor]) -> Tensor:
    """CLIP image_embeds (projected, one token per part), through ComfyUI's CLIP vision with its preprocessing
    (shortest side to 224 bicubic, center crop, CLIP mean/std: the release's feature extractor)."""
    embeds = []
    for img in images:
        out = clip_vision.encode_image(img.unsqueeze(0), crop=True)
        embeds.append(out["image_embeds"].float().cpu().reshape(1, -1))
    return torch.cat(embeds, dim=0)


class DecoupledAttn2Replace:
    """attn2 replace of one block: text attention (or an earlier replace's result) + the image term."""

    def __init__(self, key: BlockKey, tokens: DecoupledTokens, inner: Any = None) -> None:
        self.key = key
        self.tokens = tokens
        self.inner = inner

    def __deepcopy__(self, memo: dict) -> DecoupledAttn2Replace:
        return self

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        attn = host_attention(extra_options)
        heads = extra_options["n_heads"]
        text = self.inner(q, k, v, extra_options) if self.inner is not None else attn(q, k, v, heads)
        return decoupled_cross_attention(q, text, self.tokens, heads, extra_options.get("cond_or_uncond"), attn)


class PoseFeaturePatch:
    """input_block_patch: adds the pose guider's features to the output of conv_in (input block 0) for every
    batch chunk. Features are computed once per latent size and device; another size resizes the pose image."""

    def __init__(self, guider: PoseGuider, pose: Tensor) -> None:
        self.guider = guider
        self.pose = pose  # [1, 3, H, W], 0..1
        self._guiders: dict[Any, PoseGuider] = {}
        self._features: dict[tuple, Tensor] = {}

    def __deepcopy__(self, memo: dict) -> PoseFeaturePatch:
        return self

    def to(self, device: Any) -> PoseFeaturePatch:
        return self

    def features(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (size, device, dtype)
        if key not in self._features:
            scale = self.guider.scale
            pixels = (size[0] * scale, size[1] * scale)
            pose = self.pose
            if tuple(pose.shape[-2:]) != pixels:
                warn(f"the image being sampled is {pixels[1]}x{pixels[0]} px but Parts2Whole's width and height "
                     f"are {pose.shape[-1]}x{pose.shape[-2]}; the pose is stretched to the image (set the same "
                     "size on Parts2Whole and the latent)")
                pose = F.interpolate(pose, size=pixels, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            if device not in self._guiders:
                self._guiders[device] = (self.guider if device == torch.device("cpu")
                                         else copy.deepcopy(self.guider).to(device))
            with torch.no_grad():
                feat = self._guiders[device](pose.to(device=device, dtype=torch.float32))
            if tuple(feat.shape[-2:]) != tuple(size):
                raise RuntimeError(f"pose features are {tuple(feat.shape[-2:])} for a {size} latent")
            self._features[key] = feat.to(dtype)
        return self._features[key]

    def __call__(self, h: Tensor, transformer_options: dict) -> Tensor:
        block = transformer_options.get("block")
        if block is None or block[0] != "input" or int(block[1]) != 0:
            return h
        feat = self.features((h.shape[-2], h.shape[-1]), h.device, h.dtype)
        if feat.shape[1] != h.shape[1]:
            raise RuntimeError(f"the pose guider gives {feat.shape[1]} channels but conv_in has {h.shape[1]}")
        return h + feat


# ----------------------------------------------------------------------------------------------- the patch
def label_conditioning(clip: Any, label: str) -> list:
    tokens = clip.tokenize(label)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def apply_decoupled(patched: Any, release: Parts2WholeRelease, tokens: Tensor) -> None:
    """Install the image side channel on every transformer block of ``patched`` (a clone owned by the caller)."""
    blocks = walk_transformer_blocks(patched.model.diffusion_model)
    keys = {b.key for b in blocks}
    if keys != set(release.decoupled):
        raise ValueError(f"the model's transformer blocks {sorted(block_label(k) for k in keys)[:4]}... do not match "
                         f"the release's decoupled weights ({len(release.decoupled)} blocks); use the MODEL of the "
                         "same Parts2Whole loader")
    padded = pad_image_tokens(tokens)
    replaces = existing_replaces(patched, "attn2")
    for b in blocks:
        wk, wv = release.decoupled[b.key]
        if wk.shape[0] != b.channels:
            raise ValueError(f"block {block_label(b.key)} has width {b.channels} but the decoupled weights have "
                             f"{wk.shape[0]}")
        inner = replaces.get(b.key)
        patch = DecoupledAttn2Replace(b.key, project_image_tokens(padded, wk, wv, 1.0), inner)
        patched.set_model_attn2_replace(patch, b.key[0], b.key[1], b.key[2])


@dataclass
class Parts2WholeResult:
    model: Any
    positive: list
    parts: list[PreparedPart]


def apply_parts2whole(
    model: Any,
    reference_unet: Any,
    release: Parts2WholeRelease,
    clip_vision: Any,
    vae: Any,
    clip: Any,
    positive: list,
    parts: Sequence[PartInput],
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    pose: Optional[Tensor] = None,
    mode: Parts2WholeMode = Parts2WholeMode.AS_TRAINED,
    mask_source: MaskSource = MaskSource.MASK,
) -> Parts2WholeResult:
    """A patched clone of ``model`` and the positive conditioning to sample it with; inputs are not modified."""
    mode = Parts2WholeMode.from_label(mode, "mode")
    if not isinstance(release, Parts2WholeRelease):
        raise ValueError("parts2whole must come from the Parts2Whole loader")
    check_size(width, height)
    check_same_unet(model, reference_unet)
    prepared = prepare_parts(parts, height, width, mask_source)
    refs = [p.reference for p in prepared]
    if mode == Parts2WholeMode.AS_RELEASED:
        first = refs[0].label
        refs = [replace(r, label=first) for r in refs]
        positive = label_conditioning(clip, first)
        log.info("HumanRef: Parts2Whole 'as released': every part and the prompt use the label %r", first)
    bank = build_reference_bank(reference_unet, vae, clip, refs, timing=Timing.ONCE, mask_rule="parts2whole")
    patched = apply_reference_patch(model, bank, mode=CONCAT.name, strength=1.0, start_percent=0.0, end_percent=1.0,
                                    block_set="all", custom_blocks="", style_fidelity=1.0)
    tokens = encode_image_tokens(clip_vision, [p.clip_image for p in prepared])
    if tokens.shape[1] != release.image_dim:
        raise ValueError(f"clip_vision gives {tokens.shape[1]}-d image embeddings; the release's decoupled "
                         f"attention expects {release.image_dim} (use the release's image encoder)")
    apply_decoupled(patched, release, tokens)
    if pose is not None:
        patched.set_model_input_block_patch(PoseFeaturePatch(release.pose_guider, prepare_pose(pose, height, width)))
    return Parts2WholeResult(patched, positive, prepared)


def check_same_unet(model: Any, reference_unet: Any) -> None:
    """The reference UNet feeds every transformer block of the model: both must have the same blocks and widths
    (the loader's two UNets do), checked here so the message names these two inputs."""
    blocks = walk_transformer_blocks(model.model.diffusion_model)
    ref_blocks = walk_transformer_blocks(reference_unet.model.diffusion_model)
    if [(b.key, b.channels) for b in blocks] != [(b.key, b.channels) for b in ref_blocks]:
        raise ValueError(f"reference_unet is {describe_architecture(ref_blocks, model_family(reference_unet))} but "
                         f"model is {describe_architecture(blocks, model_family(model))}: connect the model and "
                         "reference_unet outputs of the same Parts2Whole Loader")


def empty_latent(width: int, height: int, batch_size: int = 1) -> dict:
    check_size(width, height)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
