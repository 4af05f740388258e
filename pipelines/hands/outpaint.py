"""Body outpainting around kept hands with sequential mask expansion (paper III-C, III-D), ComfyUI side.

The per-step keep mask goes in through ``set_model_denoise_mask_function`` on a clone of the model: ComfyUI's
``KSamplerX0Inpaint`` then sets, before every model call, ``x = x * m + noised(canvas) * (1 - m)`` with
m = 1 - keep, i.e. the keep region is the canvas latent noised to the current sigma (Blended Latent Diffusion,
eq. 11). The mask is chosen from the sigma of the call (:func:`mask_expand.step_index`), so first- and
second-order samplers alike see the mask of the step they are in. Sampling itself is ComfyUI's own KSampler
path (ComfyUI's ``nodes.common_ksampler``): progress bar, latent previews, every sampler and scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..images import check_image, check_mask, fit_mask, flatten_alpha, to_bchw, to_bhwc
from ..notices import warn
from .generator import SamplingOptions
from .mask_expand import Blending, keep_schedule, step_index


@dataclass(frozen=True)
class OutpaintOptions(SamplingOptions):
    denoise: float = 1.0
    max_expansion: int = 64  # pixels
    blending: Blending = Blending.SEQUENTIAL
    schedule: str = "linear"
    unmasked_last_steps: int = 2


def prepare_canvas_mask(canvas: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Checks and aligns IMAGE [B, H, W, C] and MASK [B|1, H, W]; a mask of another size is resized (warning)."""
    canvas = flatten_alpha(check_image(canvas, "canvas"))[0]
    h, w = canvas.shape[1:3]
    mask = fit_mask(check_mask(mask, "keep_mask", canvas.shape[0], "canvas"), (h, w), "keep_mask", "canvas")
    mask = mask.clamp(0.0, 1.0).to(canvas.device)
    return canvas, mask.expand(canvas.shape[0], h, w).contiguous()


def pad_to_multiple(image: Tensor, mask: Tensor, multiple: int = 8) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Replicate-pad image/mask at the bottom/right to multiples of 8 (cropped back after decoding)."""
    h, w = image.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image, mask, (h, w)
    img = to_bhwc(F.pad(to_bchw(image), (0, pw, 0, ph), mode="replicate"))
    m = F.pad(mask.unsqueeze(1), (0, pw, 0, ph), mode="replicate")[:, 0]
    return img, m, (h, w)


def latent_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """Pixel keep mask [B, H, W] -> latent grid [B, 1, h, w] by area averaging (soft at the hand's edge)."""
    return F.interpolate(mask.unsqueeze(1).float(), size=(height, width), mode="area")


class ScheduledDenoiseMask:
    """``denoise_mask_function``: ComfyUI's regenerate-mask (1 - keep) for the step the call's sigma is in.

    Holds the per-step keep masks for a given step count; a run with another count (denoise < 1 shortens the
    schedule) builds its own. ``calls`` records (sigma, step) for inspection.
    """

    def __init__(self, keep: Tensor, options: OutpaintOptions, max_radius: float):
        self.keep = keep
        self.options = options
        self.max_radius = max_radius
        self._schedules: dict[int, list[Optional[Tensor]]] = {}
        self.calls: list[tuple[float, int]] = []

    def __deepcopy__(self, memo: dict) -> ScheduledDenoiseMask:
        return self  # immutable inputs; ModelPatcher.clone deep-copies model_options

    def schedule(self, steps: int) -> list[Optional[Tensor]]:
        if steps not in self._schedules:
            o = self.options
            self._schedules[steps] = keep_schedule(self.keep, steps, o.unmasked_last_steps, self.max_radius,
                                                   o.blending, o.schedule)
        return self._schedules[steps]

    def __call__(self, sigma: Tensor, denoise_mask: Tensor, extra_options: dict) -> Tensor:
        sigmas = extra_options["sigmas"]
        s = float(sigma.reshape(-1)[0])
        step = step_index(sigmas, s)
        self.calls.append((s, step))
        keep = self.schedule(sigmas.shape[0] - 1)[step]
        if keep is None:
            return torch.ones_like(denoise_mask)
        keep = keep.to(device=denoise_mask.device, dtype=denoise_mask.dtype)
        if keep.shape[0] != denoise_mask.shape[0]:
            keep = keep.repeat((denoise_mask.shape[0] + keep.shape[0] - 1) // keep.shape[0], 1, 1, 1)
            keep = keep[:denoise_mask.shape[0]]
        return (1.0 - keep).expand_as(denoise_mask)


def is_inpaint_model(model: Any) -> bool:
    return "mask" in tuple(getattr(model.model, "concat_keys", ()))


def inpaint_conditioning(positive: list, negative: list, vae: Any, canvas: Tensor, keep: Tensor) -> tuple[list, list]:
    """An inpainting UNet's extra channels: the exact hand mask (1 = generate) and the grey-filled canvas."""
    import node_helpers

    generate = (1.0 - keep).unsqueeze(1)  # [B, 1, H, W]
    filled = canvas.clone()
    filled[(keep < 0.5)] = 0.5
    concat = vae.encode(filled)
    values = {"concat_latent_image": concat, "concat_mask": generate}
    return (node_helpers.conditioning_set_values(positive, values),
            node_helpers.conditioning_set_values(negative, values))


@torch.no_grad()
def outpaint(model: Any, positive: list, negative: list, vae: Any, canvas: Tensor, keep_mask: Tensor,
             options: OutpaintOptions) -> tuple[Tensor, dict, Optional[ScheduledDenoiseMask]]:
    """Returns (IMAGE after the pixel blend, LATENT, the mask function used or None)."""
    import nodes as comfy_nodes

    if options.steps < 1:
        raise ValueError(f"steps must be at least 1, got {options.steps}")
    if options.unmasked_last_steps >= options.steps:
        raise ValueError(f"unmasked_last_steps ({options.unmasked_last_steps}) must be less than steps "
                         f"({options.steps}): every step would run unmasked, so the hands would never be held "
                         "while the body forms. Lower it (the paper: 2) or raise steps")
    canvas, keep = prepare_canvas_mask(canvas, keep_mask)
    padded, keep_p, (h, w) = pad_to_multiple(canvas, keep)
    latent = vae.encode(padded)
    if float(keep.min()) >= 1.0:
        warn("keep_mask is all white: everything is kept and nothing is drawn; the canvas is returned "
             "unchanged (connect the Hand Canvas's keep_mask)")
        return canvas.clone(), {"samples": latent}, None
    mask_fn: Optional[ScheduledDenoiseMask] = None
    work = model.clone()
    lat_keep = latent_mask(keep_p, latent.shape[-2], latent.shape[-1])
    if float(keep.max()) <= 0.0:
        warn("keep_mask is all black: no hand is kept, so this is plain sampling of the whole canvas "
             "(connect the Hand Canvas's keep_mask)")
    else:
        if "denoise_mask_function" in work.model_options:
            warn("the model already has a denoise mask function (e.g. Differential Diffusion); this node "
                 "replaces it on its own copy of the model")
        mask_fn = ScheduledDenoiseMask(lat_keep, options, options.max_expansion / 8.0)
        work.set_model_denoise_mask_function(mask_fn)
        if is_inpaint_model(model):
            positive, negative = inpaint_conditioning(positive, negative, vae, padded, keep_p)
    ones = torch.ones(latent.shape[0], 1, latent.shape[-2], latent.shape[-1])
    (out,) = comfy_nodes.common_ksampler(work, options.seed, options.steps, options.cfg, options.sampler_name,
                                   options.scheduler, positive, negative, {"samples": latent, "noise_mask": ones},
                                   denoise=options.denoise)
    decoded = vae.decode(out["samples"])[..., :3].to(canvas.device)
    decoded = decoded[:, :h, :w].float()
    m = keep.unsqueeze(-1)
    image = canvas.float() * m + decoded * (1.0 - m)  # paper III-D: the hand pixels back, with the initial mask
    return image, {"samples": out["samples"]}, mask_fn
