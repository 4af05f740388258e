"""Attention maps on a ComfyUI model: attach a record, fill it from the attn1 replace, draw it over the image.

The record travels in ``transformer_options`` under :data:`RECORD_KEY`; the reference patch's attn1 replace
(patch.py) calls :func:`record_call` only when one is there, so sampling without the recorder costs nothing.
Each sampling run of the recorded model starts a fresh record (an OUTER_SAMPLE wrapper), so the maps always
show the last run, however often ComfyUI's cache hands the same record on.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import comfy.patcher_extension
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ...attention.blocks import BlockKey
from ...attention.gating import COND, chunk_slices
from ...attention.maps import AttentionRecord, RecordedReference, reference_shares
from ...attention.reader import ActivePatch

RECORD_KEY = "humanref_attention_record"
RECORD_BLOCKS: tuple[str, ...] = ("all", "input", "middle", "output")
NORMALIZE: tuple[str, ...] = ("per map", "none")
# a perceptual dark-to-bright ramp (black, purple, red, orange, light yellow), sampled at even steps
RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.33, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04],
                     [0.99, 1.0, 0.64]])


def attach_record(model: Any, blocks: str = "all", step: int = -1) -> tuple[Any, AttentionRecord]:
    """A clone of ``model`` that records attention maps into the returned record at every sampling run."""
    if blocks not in RECORD_BLOCKS:
        raise ValueError(f"blocks must be one of {RECORD_BLOCKS}, not {blocks!r}")
    record = AttentionRecord(blocks=blocks, step=int(step))
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})[RECORD_KEY] = record

    def start(executor: Any, *args: Any, **kwargs: Any) -> Any:
        sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
        record.start_run(steps=None if sigmas is None else len(sigmas) - 1)
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RECORD_KEY, start)
    return patched, record


def step_index(extra_options: dict) -> int:
    """The sampler step of this model call: where its sigma sits in the run's schedule (0 when unknown)."""
    schedule, sigmas = extra_options.get("sample_sigmas"), extra_options.get("sigmas")
    if schedule is None or sigmas is None:
        return 0
    return int((schedule.float().cpu() - float(sigmas.max())).abs().argmin())


def record_call(record: AttentionRecord, key: BlockKey, q: Tensor, k: Tensor, heads: int,
                active: Sequence[ActivePatch], sources: Sequence[Any], extra_options: dict) -> None:
    """Add this attn1 call's reference shares (cond rows) to the record; ``sources`` are the ReferencePatch of
    each active patch (their uid and bank labels name the references)."""
    step = step_index(extra_options)
    if not active or not record.wants(key, step):
        return
    rows = next((sl for sl, kind in chunk_slices(extra_options.get("cond_or_uncond"), q.shape[0]) if kind == COND),
                None)
    if rows is None:
        return
    h, w = (int(n) for n in extra_options["activations_shape"][-2:])
    shares = reference_shares(q[rows], k[rows], heads, active)
    named = []
    for patch, share in zip(sources, shares):
        for i, info in enumerate(patch.bank.references):
            named.append((RecordedReference(patch.uid, i, info.label or f"reference {i + 1}"), share[..., i]))
    record.add((h, w), named, step)


def nothing_recorded(record: AttentionRecord) -> str:
    """Why a record is empty, in the user's words."""
    if record.runs == 0:
        return ("attention_record: no sampler has run with the recorded model yet. Connect Record Reference "
                "Attention's model output to the sampler (through the Masked Shared Attention Patch, in either "
                "order) and its images, decoded, to this node")
    if record.step >= 0 and record.steps is not None and record.step >= record.steps:
        return (f"attention_record: step is {record.step}, but the sampler ran {record.steps} steps (0 to "
                f"{record.steps - 1}); set step lower, or -1 for every step")
    if record.acted_without_attention:
        modes = ", ".join(sorted(record.acted_without_attention))
        return (f"attention_record: the references acted through {modes} only, which moves feature statistics "
                "and does not attend to them, so there is no attention to map. Use adain+attn (or concat, strict, "
                "blend, dual) to see where each reference lands")
    return ("attention_record: the sampler ran, but no reference acted where and when the recorder looks (blocks "
            f"'{record.blocks}', step {record.step}). Put a Masked Shared Attention Patch on the recorded model, "
            "and check its blocks, start_percent and end_percent")


def colorize(values: Tensor) -> Tensor:
    """[..., H, W] in 0..1 -> [..., H, W, 3] on :data:`RAMP` (linear between its colours)."""
    x = values.clamp(0, 1) * (RAMP.shape[0] - 1)
    lo = x.floor().long().clamp(max=RAMP.shape[0] - 2)
    t = (x - lo).unsqueeze(-1)
    return RAMP[lo] * (1 - t) + RAMP[lo + 1] * t


def _label(picture: Tensor, text: str) -> Tensor:
    """The picture [H, W, 3] with ``text`` in a dark box in its top-left corner."""
    img = Image.fromarray((picture.clamp(0, 1) * 255).round().byte().numpy())
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    box = draw.textbbox((3, 2), text, font=font)
    draw.rectangle((0, 0, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(img).copy()).float() / 255.0


def render_maps(record: AttentionRecord, image: Optional[Tensor], opacity: float = 0.6,
                normalize: str = "per map") -> tuple[Tensor, Tensor, list[str]]:
    """(heatmaps IMAGE [R*B, H, W, 3] over ``image``, masks MASK [R*B, H, W], one caption per map).

    Reference-major order: every image's map of the first reference, then the second's. ``normalize``
    "per map" stretches each map to its own maximum (the pattern is what matters); "none" keeps the share of
    attention mass (0..1). Without an image the heatmaps are drawn on black at the latent grid times 8.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, not {normalize!r}")
    if not record.records:
        raise ValueError(nothing_recorded(record))
    maps = record.maps()  # [B, R, h, w]
    b, r = maps.shape[:2]
    if image is not None:
        if image.shape[0] not in (1, b):
            raise ValueError(f"images: a batch of {image.shape[0]} pictures for {b} sampled images; connect the "
                             "decoded images of the sampler that used the recorded model")
        size = tuple(image.shape[1:3])
        base = image.float().cpu()[..., :3].expand(b, -1, -1, -1)
    else:
        size = (maps.shape[2] * 8, maps.shape[3] * 8)
        base = torch.zeros(b, *size, 3)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp(min=0)
    peaks = up.amax(dim=(2, 3), keepdim=True)
    masks = up / peaks.clamp(min=1e-8) if normalize == "per map" else up.clamp(max=1)
    heat = colorize(masks)  # [B, R, H, W, 3]
    pictures, captions = [], []
    for j, ref in enumerate(record.references):
        for i in range(b):
            mixed = base[i] * (1 - opacity) + heat[i, j] * opacity
            caption = f"{ref.label}: peak {float(peaks[i, j]):.2f}, mean {float(maps[i, j].mean()):.3f}"
            pictures.append(_label(mixed, caption))
            captions.append(caption if b == 1 else f"image {i + 1}, {caption}")
    return torch.stack(pictures), masks.transpose(0, 1).reshape(r * b, *size), captions
