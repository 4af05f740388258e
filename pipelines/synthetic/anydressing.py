"""Tiny synthetic files for the AnyDressing workflow: garment weights and a style LoRA for the tiny checkpoint.

``python -m humanref tiny-models DIR`` writes them next to the tiny SD1.5 checkpoint, in the exact layouts the
workflow loads: our garment-weights format (models/garment_weights) and a kohya-style UNet LoRA (models/loras)
for LoraLoaderModelOnly. Random weights: they exist to run the workflow end to end, not to dress anybody.
"""
from __future__ import annotations

import torch

from .base import TinyModel

TINY_GARMENT_WEIGHTS = "humanref-tiny-garments-sd15.safetensors"
TINY_STYLE_LORA = "humanref-tiny-style-lora-sd15.safetensors"
TINY_SLOTS = ("upper", "lower", "hat")
TINY_RANK = 4


def _tiny_unet() -> dict[str, torch.Tensor]:
    """The tiny checkpoint's UNet weights (same config, seed and dtype as synthetic/tiny.py writes)."""
    from ..loading.comfy_unet import unet_shapes
    from .base import random_like, tiny_sd15_unet_config

    return random_like(unet_shapes(tiny_sd15_unet_config()), 0, torch.float16)


def write_tiny_garment_weights(path: str) -> None:
    """Slots upper/lower/hat, rank 4; W'_k, W'_v = the checkpoint's own to_k/to_v plus a little noise."""
    from ..anydressing.weights import block_widths_from_unet, random_garment_weights, save_garment_weights

    unet = _tiny_unet()
    widths = block_widths_from_unet(unet)
    own = {p: (unet[f"{p}.attn1.to_k.weight"], unet[f"{p}.attn1.to_v.weight"]) for p in widths}
    lora, dressing = random_garment_weights(widths, TINY_SLOTS, TINY_RANK, seed=11, own=own, dtype=torch.float16)
    save_garment_weights(path, "SD15", TINY_SLOTS, TINY_RANK, lora, dressing, alpha=float(TINY_RANK))


def tiny_style_lora(rank: int = 4, seed: int = 12) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on every cross-attention (q, k, v, out) of the tiny UNet, as style LoRAs usually are."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, w in sorted(_tiny_unet().items()):
        if ".attn2.to_" not in key or not key.endswith(".weight"):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        out_f, in_f = w.shape
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).half()
        sd[f"{name}.lora_up.weight"] = (0.1 * torch.randn(out_f, rank, generator=g) / rank ** 0.5).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    return sd


TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel("garment_weights", TINY_GARMENT_WEIGHTS,
              "AnyDressing garment weights (HumanRef format) for the tiny SD1.5 checkpoint: slots upper, lower, hat",
              write=write_tiny_garment_weights),
    TinyModel("loras", TINY_STYLE_LORA, "style LoRA (kohya format, cross-attention) for the tiny SD1.5 checkpoint",
              build=tiny_style_lora),
)
