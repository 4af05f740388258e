"""Synthetic models with random weights in the exact key layouts of the real files.

Nothing can be downloaded in tests or smoke tests, so these build UNets (tiny or full SD1.5 size), and whole
SD1.5-format checkpoints, from ComfyUI's own module definitions instantiated on the meta device: the key names
and shapes are the ones ComfyUI loads, and the loading code under test is the real one.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..loading.comfy_unet import UNET_PREFIX, unet_shapes
from ..loading.diffusers_unet import diffusers_names, stripped_reference_keys


def sd15_unet_config(model_channels: int = 320, channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                     in_channels: int = 4, middle: bool = True, context_dim: int = 768) -> dict:
    """An SD1.5-style UNet config (conv proj_in, 8 heads); the full model is (1, 2, 4, 4) with 2 res blocks."""
    levels = len(channel_mult)
    # depths are listed per level from the top; the full SD1.5 has no attention at its lowest level
    attn = [1] * (levels - 1) + [0 if tuple(channel_mult) == (1, 2, 4, 4) else 1]
    depth = [a for a in attn for _ in range(num_res_blocks)]
    depth_out = [a for a in attn for _ in range(num_res_blocks + 1)]
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels, "transformer_depth": depth, "channel_mult": list(channel_mult),
        "transformer_depth_middle": 1 if middle else -1, "use_linear_in_transformer": False,
        "context_dim": context_dim, "num_heads": 8, "num_head_channels": -1,
        "transformer_depth_output": depth_out, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sdxl_unet_config(model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2), depth: int = 2) -> dict:
    """A small SDXL-style UNet config (linear proj_in, ADM 2816, context 2048, 64-channel heads)."""
    levels = len(channel_mult)
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [1] * levels,
        "transformer_depth": [0] + [depth] * (levels - 1),
        "transformer_depth_output": [0, 0] + [depth, depth] * (levels - 1),
        "channel_mult": list(channel_mult), "transformer_depth_middle": depth, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


TINY_SD15_CHECKPOINT = "humanref-tiny-sd15.safetensors"
TINY_CONTROLNET = "humanref-tiny-controlnet-sd15.safetensors"


def tiny_sd15_unet_config() -> dict:
    """The tiny checkpoint's UNet: one level (channel_mult (1,)), one res block, a middle transformer.

    Still model_channels 320, context 768 and conv proj_in, so ComfyUI detects it as SD15; every block kind
    the pack patches (input, middle, output transformers) is there.
    """
    return sd15_unet_config(channel_mult=(1,), num_res_blocks=1, middle=True)


@dataclass(frozen=True)
class TinyModel:
    """One file (or folder) that ``python -m humanref tiny-models DIR`` writes under DIR/<folder>/<filename>.

    Give ``build`` (a state dict, saved as safetensors) or ``write`` (called with the target path, for files
    that are not a flat safetensors state dict: folders, pickles). Each method's module lists its own in a
    ``TINY_MODELS`` tuple; ``synthetic/tiny.py`` collects them.
    """

    folder: str  # ComfyUI model folder name under DIR
    filename: str
    description: str
    build: Optional[Callable[[], dict]] = None
    write: Optional[Callable[[str], None]] = None


def random_like(shapes: dict[str, torch.Size], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Deterministic weights: N(0, 1/fan_in) for matrices and kernels, ones for norm scales, zeros for biases."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name in sorted(shapes):
        shape = torch.Size(shapes[name])
        if name.endswith("bias") or len(shape) == 0:
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = t.to(dtype)
    return out


def _meta_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def diffusers_unet_state_dict(unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                              stripped_reference: bool = False) -> dict[str, Tensor]:
    """Random UNet weights under diffusers names (every ComfyUI key has one); stripped_reference drops what the
    official Parts2Whole/MimicBrush reference UNets lack (loading.diffusers_unet.stripped_reference_keys)."""
    import comfy.utils

    sd = diffusers_names(unet_config, random_like(unet_shapes(unet_config), seed, dtype))
    if stripped_reference:
        for k in stripped_reference_keys(unet_config, comfy.utils.unet_to_diffusers(unet_config)):
            sd.pop(k, None)
    return sd


def build_model(unet_config: dict, seed: int = 0, arch: str = "sd15", dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> Any:
    """An in-memory ComfyUI ModelPatcher with random weights (no file, no detection)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cls = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]
    config = cls(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    model.load_model_weights(random_like(unet_shapes(unet_config), seed, dtype), "")
    load = device or comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def clip_shapes() -> dict[str, torch.Size]:
    import comfy.clip_model
    import comfy.ops

    path = os.path.join(os.path.dirname(comfy.clip_model.__file__), "sd1_clip_config.json")
    with open(path) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        clip = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    return _meta_shapes(clip)


def vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return _meta_shapes(vae)


def controlnet_shapes(unet_config: dict, hint_channels: int = 3) -> dict[str, torch.Size]:
    """Shapes of an SD1.5-style ControlNet matching unet_config (ComfyUI's cldm module, ldm key names)."""
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in unet_config.items()
           if k not in ("transformer_depth_output", "use_temporal_attention", "use_temporal_resblock", "out_channels")}
    with torch.device("meta"):
        control = comfy.cldm.cldm.ControlNet(hint_channels=hint_channels, device="meta",
                                             operations=comfy.ops.disable_weight_init, **cfg)
    return _meta_shapes(control)


def controlnet_state_dict(unet_config: Optional[dict] = None, seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """A ControlNet file's state dict in the original ``control_model.*`` layout (as the lllyasviel releases).

    Zero convolutions get random weights too, so the ControlNet visibly acts in tests.
    """
    shapes = controlnet_shapes(unet_config or sd15_unet_config())
    return {f"control_model.{k}": v for k, v in random_like(shapes, seed, dtype).items()}


def sd15_checkpoint_state_dict(unet_config: Optional[dict] = None, seed: int = 0,
                               dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """A whole SD1.5 checkpoint (ldm keys): tiny UNet, CLIP-L text encoder and VAE of the real sizes.

    The UNet keeps model_channels 320, context 768 and conv proj_in, which is what ComfyUI's detection needs to
    call it SD15; CLIP and VAE have fixed architectures in ComfyUI, so they are full size.
    """
    sd: dict[str, Tensor] = {}
    unet = random_like(unet_shapes(unet_config or sd15_unet_config()), seed, dtype)
    sd.update({f"{UNET_PREFIX}{k}": v for k, v in unet.items()})
    clip = random_like(clip_shapes(), seed + 1, dtype)
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items() if k != "text_projection.weight"})
    vae = random_like(vae_shapes(), seed + 2, dtype)
    sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    return sd


def load_test_clip_vae(seed: int = 0) -> tuple[Any, Any]:
    """CLIP and VAE objects, through ComfyUI's own loaders, from random full-size state dicts."""
    import comfy.sd
    import comfy.supported_models

    clip_sd = random_like(clip_shapes(), seed + 1, torch.float32)
    clip_sd = {k: v for k, v in clip_sd.items() if k != "text_projection.weight"}
    target = comfy.supported_models.SD15(sd15_unet_config()).clip_target()
    clip = comfy.sd.CLIP(target=target, embedding_directory=None)
    clip.load_sd(clip_sd)
    vae = comfy.sd.VAE(sd=random_like(vae_shapes(), seed + 2, torch.float32))
    return clip, vae
