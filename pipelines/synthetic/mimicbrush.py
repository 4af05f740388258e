"""Synthetic ``mimicbrush.bin`` files in the official layout (random weights), for tests and example runs.

The UNet parts carry diffusers names (made with ComfyUI's own diffusers map, inverted), the reference UNet
lacks exactly what the official ReferenceNet lacks, the image encoder has transformers CLIP-vision names.
The tiny file keeps model_channels 320 and context 768 (what makes ComfyUI call a UNet SD1.5) but one level;
its CLIP vision tower is small (hidden 64, 2 layers, 224 px, 257 tokens) and the projection maps 64 -> 768.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import TinyModel, diffusers_unet_state_dict, random_like, sd15_unet_config

TINY_MIMICBRUSH = "humanref-tiny-mimicbrush.bin"
TINY_CLIP_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "patch_size": 14,
                    "image_size": 224, "projection_dim": 32, "num_attention_heads": 1, "hidden_act": "gelu"}
VIT_H = {"hidden_size": 1280, "num_hidden_layers": 32, "intermediate_size": 5120, "patch_size": 14,
         "image_size": 224, "projection_dim": 1024, "num_attention_heads": 16, "hidden_act": "gelu"}


def tiny_unet_config(in_channels: int = 4) -> dict:
    return sd15_unet_config(channel_mult=(1,), num_res_blocks=1, middle=True, in_channels=in_channels)


def clip_vision_shapes(cfg: dict) -> dict[str, torch.Size]:
    """transformers CLIPVisionModelWithProjection names and shapes for a config (no transformers import)."""
    h, inter, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"]
    n_pos = (cfg["image_size"] // p) ** 2 + 1
    shapes: dict[str, tuple] = {
        "vision_model.embeddings.class_embedding": (h,),
        "vision_model.embeddings.patch_embedding.weight": (h, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": (n_pos, h),
        "vision_model.pre_layrnorm.weight": (h,), "vision_model.pre_layrnorm.bias": (h,),
        "vision_model.post_layernorm.weight": (h,), "vision_model.post_layernorm.bias": (h,),
        "visual_projection.weight": (cfg["projection_dim"], h),
    }
    for i in range(cfg["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}.self_attn.{proj}.weight"] = (h, h)
            shapes[f"{pre}.self_attn.{proj}.bias"] = (h,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}.{norm}.weight"] = (h,)
            shapes[f"{pre}.{norm}.bias"] = (h,)
        shapes[f"{pre}.mlp.fc1.weight"] = (inter, h)
        shapes[f"{pre}.mlp.fc1.bias"] = (inter,)
        shapes[f"{pre}.mlp.fc2.weight"] = (h, inter)
        shapes[f"{pre}.mlp.fc2.bias"] = (h,)
    return {k: torch.Size(v) for k, v in shapes.items()}


def depth_guider_shapes() -> dict[str, torch.Size]:
    from ..mimicbrush.depth_guider import DepthGuider

    with torch.device("meta"):
        guider = DepthGuider()
    return {k: v.shape for k, v in guider.state_dict().items()}


def mimicbrush_checkpoint(unet_config: Optional[dict] = None, clip_config: Optional[dict] = None, seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> dict[str, dict[str, Tensor]]:
    """The official five-part dict. Random class embeddings and biases of zero; the projection is random."""
    base = dict(unet_config or tiny_unet_config())
    clip_cfg = clip_config or TINY_CLIP_VISION
    unet_cfg = dict(base, in_channels=13)
    ref_cfg = dict(base, in_channels=4)
    clip = random_like(clip_vision_shapes(clip_cfg), seed + 3, dtype)
    clip["vision_model.embeddings.class_embedding"] = torch.randn(
        clip_cfg["hidden_size"], generator=torch.Generator().manual_seed(seed + 4)).to(dtype)
    proj = random_like({"projector.weight": torch.Size((768, clip_cfg["hidden_size"])),
                        "projector.bias": torch.Size((768,))}, seed + 5, dtype)
    return {
        "unet": diffusers_unet_state_dict(unet_cfg, seed + 1, dtype),
        "referencenet": diffusers_unet_state_dict(ref_cfg, seed + 2, dtype, stripped_reference=True),
        "image_proj": proj,
        "depth_guider": random_like(depth_guider_shapes(), seed + 6, dtype),
        "image_encoder": clip,
    }


def write_tiny_mimicbrush(path: str) -> None:
    torch.save(mimicbrush_checkpoint(), path)


TINY_MODELS = (
    TinyModel("mimicbrush", TINY_MIMICBRUSH,
              "mimicbrush.bin layout (pickled tensor dict): tiny 13-channel UNet and reference UNet, small CLIP "
              "vision tower, projection, depth guider; random weights, fp16",
              write=write_tiny_mimicbrush),
)
