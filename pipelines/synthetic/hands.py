"""A tiny trained hand generator in HumanRef's layout (random weights) for tests and the example workflow."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..loading.comfy_unet import unet_shapes
from .base import TinyModel, random_like, sd15_unet_config

TINY_HAND_GENERATOR = "humanref-tiny-hand-generator.safetensors"


def hand_generator_state_dict(unet_config: Optional[dict] = None, seed: int = 11,
                              dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, metadata): ``unet.*`` with a 15-channel conv_in and ``mask_head.{0,2,4,6}.*``."""
    from ..hands.weights import FORMAT, VERSION, MaskHead, head_state_dict

    cfg = unet_config or sd15_unet_config(channel_mult=(1,), num_res_blocks=1, middle=True, in_channels=15)
    sd = {f"unet.{k}": v for k, v in random_like(unet_shapes(cfg), seed, dtype).items()}
    gen = torch.Generator().manual_seed(seed + 1)
    head = MaskHead()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    sd.update({k: v.to(dtype) for k, v in head_state_dict(head).items()})
    return sd, {"format": FORMAT, "version": VERSION, "mask_activation": "clamp",
                "description": "tiny synthetic hand generator, random weights"}


def write_tiny_hand_generator(path: str) -> None:
    from safetensors.torch import save_file

    sd, meta = hand_generator_state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)


TINY_MODELS = (
    TinyModel("hand_generator", TINY_HAND_GENERATOR,
              "trained-layout hand generator: tiny 15-channel SD15 UNet + mask head, random weights, fp16",
              write=write_tiny_hand_generator),
)
