"""MimicBrush on ComfyUI's own models and samplers: conditioning, reference bank and patch, paste-back.

The imitative UNet is a ComfyUI MODEL whose 9 extra input channels ([mask, masked-image latent with the
masked region black, depth feature]) travel in the CONDITIONING as ``noise_concat``; the image-prompt
embedding (image_proj of the penultimate CLIP ViT-H hidden states, 257 tokens) replaces the text. The
reference UNet is a writer: every step it sees the clean reference latents at the current timestep and its
norm1 features of the mid and up blocks (10 on SD1.5) are blended into the imitative UNet's self-attention
(0.5 * Attn(x, [x, ref]) + 0.5 * Attn(x, x); the uncond chunk runs plain attention).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import comfy.model_management
import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention.bank import MaskProjector, ReferenceBank, ReferenceInfo, Timing
from ...attention.blocks import select_blocks, walk_transformer_blocks
from ...attention.reader import BLEND
from ..images import BLACK, WHITE, check_image, flatten_alpha, one_mask, resize_mask, resize_square, to_bchw
from ..progress import Stages
from ..references.patch import apply_reference_patch, bank_from_writer
from ..references.writer import WriterGroup, WriterInputs, encode_images
from .images import Box, binarize, black_fill, crop_around, pad_to_square, paste_back, resize_mask_binary, unpad
from .weights import MimicBrushParts

log = logging.getLogger("humanref")

# the writer combo's labels (saved in workflows) and when each runs the reference UNet
WRITER_TIMINGS: dict[str, Timing] = {"every step (exact)": Timing.EVERY_STEP, "once at t=0 (fast)": Timing.ONCE}
WRITER_MODES: tuple[str, ...] = tuple(WRITER_TIMINGS)
BLOCK_SET = "mid+up"
RATIO = 0.5


def writer_timing(label: str) -> Timing:
    if label not in WRITER_TIMINGS:
        raise ValueError(f"writer must be one of {WRITER_MODES}, got {label!r}")
    return WRITER_TIMINGS[label]


@dataclass(frozen=True, eq=False)
class MimicBrushEdit:
    """What the paste-back needs: the original image and mask, the edited box and the working resolution."""

    image: Tensor  # [1, H, W, 3] original
    mask: Tensor  # [H, W] binary original
    box: Box  # the region that was padded to a square and edited (whole image unless cropped)
    resolution: int

    def __deepcopy__(self, memo: dict) -> MimicBrushEdit:
        return self


@dataclass(frozen=True, eq=False)
class PreparedTarget:
    square: Tensor  # [1, R, R, 3] black-filled, padded, resized
    mask: Tensor  # [1, R, R] binary
    edit: MimicBrushEdit


# --------------------------------------------------------------------------------------------- inputs
def _rgb(image: Any, name: str, background: float = WHITE) -> Tensor:
    image = check_image(image, name, channels=(1, 3, 4))
    if image.shape[0] != 1:
        raise ValueError(f"{name} has {image.shape[0]} images; MimicBrush edits one image with one reference per "
                         "run (split the batch, e.g. with 'Image From Batch')")
    if image.shape[-1] == 4:  # the pack's RGBA rule: over white, the colour the official code pads with
        return flatten_alpha(image, background)[0]
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image


def _mask(mask: Any, image: Tensor) -> Tensor:
    mask = one_mask(mask, "mask")
    h, w = image.shape[1], image.shape[2]
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {w}x{h}: they must be the same "
                         "size (paint the mask on this image, or resize one of them)")
    binary = binarize(mask.cpu())
    if float(binary.max()) <= 0.0:
        raise ValueError("mask is empty (no pixel >= 0.5): paint the region of image to redraw")
    return binary


def prepare_target(image: Tensor, mask: Tensor, resolution: int, crop_to_mask: bool,
                   crop_margin: int) -> PreparedTarget:
    """Official order: binary mask, (crop), pad to square (white / black), black fill, resize to resolution."""
    image = _rgb(image, "image").float().cpu()
    binary = _mask(mask, image)
    h, w = binary.shape
    box = crop_around(binary, crop_margin) if crop_to_mask else Box(0, 0, h, w)
    img = image[:, box.top:box.bottom, box.left:box.right]
    m = binary[box.top:box.bottom, box.left:box.right].unsqueeze(0)
    sq_img = pad_to_square(img, 1.0)
    sq_mask = pad_to_square(m, 0.0)
    filled = black_fill(sq_img, sq_mask)
    return PreparedTarget(resize_square(filled, resolution), resize_mask_binary(sq_mask, resolution),
                          MimicBrushEdit(image, binary, box, resolution))


def prepare_depth(depth: Tensor, edit: MimicBrushEdit, name: str = "depth") -> Tensor:
    """A depth IMAGE of the target -> [1, 1, S, S] over the same crop and square padding (padding = 0)."""
    depth = _rgb(depth, name, BLACK).float().cpu().mean(dim=-1)  # [1, H, W]
    h, w = edit.mask.shape
    if tuple(depth.shape[1:]) != (h, w):
        dh, dw = depth.shape[1:]
        if abs(dh / dw - h / w) > 0.02 * (h / w):
            raise ValueError(f"{name} is {dw}x{dh} but image is {w}x{h}: the aspect ratios differ; give the depth "
                             "map of this image")
        log.info("HumanRef: %s is %dx%d, resized to the image's %dx%d", name, dw, dh, w, h)
        depth = resize_mask(depth, (h, w))
    b = edit.box
    return pad_to_square(depth[:, b.top:b.bottom, b.left:b.right], 0.0).unsqueeze(1)


def depth_feature(parts: MimicBrushParts, edit: MimicBrushEdit, keep_shape: bool, depth: Optional[Tensor],
                  depth_of_black: Optional[Tensor], depth_scale: float) -> Tensor:
    """[1, 4, R/8, R/8]. keep_shape: the guider sees the target's depth; off (official default): the depth of
    an all-black input (connect it as depth_of_black; a zero map when absent)."""
    res = edit.resolution
    if keep_shape:
        if depth is None:
            raise ValueError("keep_shape is on but depth is not connected: give a depth map of image (any depth "
                             "estimator node), or turn keep_shape off")
        d = prepare_depth(depth, edit) * depth_scale
    elif depth_of_black is not None:
        black = _rgb(depth_of_black, "depth_of_black", BLACK).float().cpu()
        d = to_bchw(black.mean(dim=-1, keepdim=True)) * depth_scale
    else:
        d = torch.zeros(1, 1, res, res)
    guider = parts.depth_guider
    with torch.no_grad():
        return guider(d.to(guider.conv_in.weight.dtype), (res, res)).float()


def image_prompt(parts: MimicBrushParts, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(cond, uncond) image-prompt embeddings [1, 257, 768]: projection of the penultimate CLIP hidden states of
    the padded reference, and of an all-zero (already normalised) input, as the official code."""
    cv = parts.clip_vision
    cond_hidden = cv.encode_image(reference)["penultimate_hidden_states"]
    comfy.model_management.load_model_gpu(cv.patcher)
    zeros = torch.zeros(1, 3, cv.image_size, cv.image_size, device=cv.load_device)
    with torch.no_grad():
        uncond_hidden = cv.model(pixel_values=zeros, intermediate_output=-2)[1]
        proj = parts.projection
        cond = proj(cond_hidden.to(proj.projector.weight.device))
        uncond = proj(uncond_hidden.to(proj.projector.weight.device))
    return cond.float().cpu(), uncond.float().cpu()


# --------------------------------------------------------------------------------------------- bank + patch
def mimicbrush_bank(parts: MimicBrushParts, ref_latent: Tensor, cond: Tensor, timing: Timing) -> ReferenceBank:
    """The reference UNet as a writer over the clean reference latents, conditioned on the image prompt."""
    writer = parts.reference_model
    inputs = WriterInputs(
        patcher=writer,
        groups=(WriterGroup((0,), ref_latent.cpu(), {"c_crossattn": cond.cpu()}),),
        projector=MaskProjector([None], "area"),
        count=1,
        clean=True,
    )
    size = (ref_latent.shape[-2] * 8, ref_latent.shape[-1] * 8)
    keys = [b.key for b in select_blocks(walk_transformer_blocks(writer.model.diffusion_model), BLOCK_SET)]
    return bank_from_writer(inputs, (ReferenceInfo("reference", 0, size, False),), timing, "area", keys=keys)


def conditioning(cond: Tensor, uncond: Tensor, concat: Tensor) -> tuple[list, list]:
    """CONDITIONING pair: the image prompt in place of text, the 9 extra channels as noise_concat (same for both)."""
    return [[cond, {"noise_concat": concat}]], [[uncond, {"noise_concat": concat}]]


@dataclass(frozen=True, eq=False)
class MimicBrushSetup:
    model: Any
    positive: list
    negative: list
    latent: dict
    edit: MimicBrushEdit


SETUP_STAGES = ("encode images", "depth", "image prompt", "reference")


def setup_mimicbrush(
    model: Any,
    parts: MimicBrushParts,
    vae: Any,
    image: Tensor,
    mask: Tensor,
    reference: Tensor,
    depth: Optional[Tensor] = None,
    keep_shape: bool = False,
    depth_of_black: Optional[Tensor] = None,
    timing: Timing = Timing.EVERY_STEP,
    resolution: int = 512,
    crop_to_mask: bool = False,
    crop_margin: int = 64,
    depth_scale: float = 1.0,
) -> MimicBrushSetup:
    """Everything the sampler needs; ``model`` is cloned and patched, never modified."""
    if resolution % 64 != 0 or resolution < 64:
        raise ValueError(f"resolution must be a positive multiple of 64, got {resolution}")
    if crop_margin < 0:
        raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
    channels = model.model.diffusion_model.input_blocks[0][0].weight.shape[1]
    if channels != 13:
        raise ValueError(f"model has a {channels}-channel input; connect the MODEL of 'MimicBrush Loader (HumanRef)' "
                         "(the 13-channel imitative UNet)")
    target = prepare_target(image, mask, resolution, crop_to_mask, crop_margin)
    stages = Stages("MimicBrush Conditioning", SETUP_STAGES)
    ref_square = pad_to_square(_rgb(reference, "reference").float().cpu(), 1.0)
    ref = resize_square(ref_square, resolution)
    writer_model = parts.reference_model.model
    ref_latent = encode_images(vae, writer_model, [ref[0]])[0]
    masked_latent = encode_images(vae, model.model, [target.square[0]])[0]
    stages.finished("encode images")
    lat_hw = masked_latent.shape[-2:]
    mask_latent = F.interpolate(target.mask.unsqueeze(1), size=lat_hw, mode="nearest")
    depth_feat = depth_feature(parts, target.edit, keep_shape, depth, depth_of_black, depth_scale)
    stages.finished("depth")
    concat = torch.cat([mask_latent.float().cpu(), masked_latent.float().cpu(), depth_feat.cpu()], dim=1)
    cond, uncond = image_prompt(parts, ref_square)  # CLIP sees the padded reference at its own size
    stages.finished("image prompt")
    bank = mimicbrush_bank(parts, ref_latent, cond, timing)
    stages.finished("reference")
    patched = apply_reference_patch(model, bank, mode=BLEND.name, strength=RATIO, block_set=BLOCK_SET,
                                    style_fidelity=1.0)  # the official uncond pass sees no reference
    positive, negative = conditioning(cond, uncond, concat)
    latent = {"samples": torch.zeros(1, 4, lat_hw[0], lat_hw[1])}
    return MimicBrushSetup(patched, positive, negative, latent, target.edit)


def paste_result(images: Tensor, edit: MimicBrushEdit) -> Tensor:
    """Decoded square results [B, R, R, 3] -> the original image with the edit blended in (official paste)."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be the decoded square result [batch, {edit.resolution}, {edit.resolution}, 3], "
                         f"got {tuple(images.shape)}")
    box = edit.box
    region = unpad(images[..., :3].float().cpu(), box.height, box.width)
    out = [paste_back(edit.image, region[i:i + 1], edit.mask, box) for i in range(region.shape[0])]
    return torch.cat(out, dim=0)
