"""A synthetic Parts2Whole release (random weights) in the exact layout of huggingface.co/huanngzh/Parts2Whole.

Folders unet/, reference_unet/ (diffusers configs and key names, the reference UNet stripped like the official
one), pose_guider/, image_encoder/ (transformers CLIP vision config and keys), feature_extractor/, scheduler/
and decoupled_attn.pth (safetensors content despite the name, like the release). The UNets can be tiny: the
loader reads the architecture from config.json. ``python -m humanref tiny-models`` writes one under
parts2whole/ for the example workflow.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor

from ..loading.comfy_unet import unet_shapes
from ..loading.unet_configs import diffusers_config_from_ldm_config
from .base import TinyModel, diffusers_unet_state_dict, random_like, sd15_unet_config

TINY_RELEASE = "humanref-tiny-parts2whole"
FEATURE_EXTRACTOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}


def tiny_image_encoder_config(hidden: int = 64, layers: int = 2, projection: int = 768) -> dict:
    """A small CLIPVisionModelWithProjection config (ViT-L/14 has hidden 1024, 24 layers, 16 heads)."""
    return {
        "architectures": ["CLIPVisionModelWithProjection"], "attention_dropout": 0.0, "dropout": 0.0,
        "hidden_act": "quick_gelu", "hidden_size": hidden, "image_size": 224, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": hidden * 4, "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3,
        "num_hidden_layers": layers, "patch_size": 14, "projection_dim": projection, "torch_dtype": "float32",
    }


def decoupled_state_dict(unet_config: dict, seed: int, image_dim: int = 768,
                         dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """``...attn2.processor.to_{k,v}_dc.weight`` [hidden, image_dim] for every cross-attention layer."""
    import comfy.utils

    shapes = unet_shapes(unet_config)
    names = {}
    for dk, lk in comfy.utils.unet_to_diffusers(unet_config).items():
        if dk.endswith(".attn2.to_k.weight") and lk in shapes:
            prefix = dk[: -len(".attn2.to_k.weight")]
            for kind in ("k", "v"):
                names[f"{prefix}.attn2.processor.to_{kind}_dc.weight"] = torch.Size((shapes[lk][0], image_dim))
    return random_like(names, seed, dtype)


def pose_guider_state_dict(channels: int, seed: int, block_out_channels=(16, 32, 96, 256)) -> dict[str, Tensor]:
    from ..parts2whole.pose_guider import PoseGuider

    with torch.device("meta"):
        guider = PoseGuider(channels, 3, block_out_channels)
    return random_like({k: v.shape for k, v in guider.state_dict().items()}, seed)


def image_encoder_state_dict(config: dict, seed: int) -> dict[str, Tensor]:
    """transformers CLIPVisionModelWithProjection key names (the same names ComfyUI's CLIP vision module uses)."""
    import comfy.clip_model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.manual_cast)
    sd = random_like({k: v.shape for k, v in model.state_dict().items()}, seed)
    # transformers' initialisation scale for embeddings keeps the tiny ViT's activations moderate
    for k in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight"):
        sd[k] = torch.randn(sd[k].shape, generator=torch.Generator().manual_seed(seed + 11)) * 0.02
    # fp16-representable values: ComfyUI stores CLIP vision in fp16, so the weights load losslessly
    return {k: v.half().float() for k, v in sd.items()}


def _save(sd: dict[str, Tensor], path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def _json(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def write_release(path: str, unet_config: Optional[dict] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                  image_encoder: Optional[dict] = None, dc_in_unet: bool = False) -> dict:
    """Write a synthetic release folder; returns the state dicts written (for tests)."""
    cfg = unet_config or sd15_unet_config()
    enc_cfg = image_encoder or tiny_image_encoder_config()
    diff_cfg = diffusers_config_from_ldm_config(cfg)
    unet = diffusers_unet_state_dict(cfg, seed, dtype)
    ref = diffusers_unet_state_dict(cfg, seed + 1, dtype, stripped_reference=True)
    dc = decoupled_state_dict(cfg, seed + 2, enc_cfg["projection_dim"], dtype)
    guider = pose_guider_state_dict(cfg["model_channels"], seed + 3)
    encoder = image_encoder_state_dict(enc_cfg, seed + 4)
    _json({"_class_name": "Refs2ImagePipeline", "note": "humanref synthetic release (random weights)"},
          os.path.join(path, "model_index.json"))
    _json(diff_cfg, os.path.join(path, "unet", "config.json"))
    _save({**unet, **dc} if dc_in_unet else unet, os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    _json(dict(diff_cfg, _class_name="ReferenceUNet2DConditionModel"),
          os.path.join(path, "reference_unet", "config.json"))
    _save(ref, os.path.join(path, "reference_unet", "diffusion_pytorch_model.safetensors"))
    _json({"_class_name": "PoseGuider", "conditioning_embedding_channels": cfg["model_channels"],
           "conditioning_channels": 3, "block_out_channels": [16, 32, 96, 256]},
          os.path.join(path, "pose_guider", "config.json"))
    _save(guider, os.path.join(path, "pose_guider", "diffusion_pytorch_model.safetensors"))
    _json(enc_cfg, os.path.join(path, "image_encoder", "config.json"))
    _save(encoder, os.path.join(path, "image_encoder", "model.safetensors"))
    _json(FEATURE_EXTRACTOR, os.path.join(path, "feature_extractor", "preprocessor_config.json"))
    _json(SCHEDULER, os.path.join(path, "scheduler", "scheduler_config.json"))
    _save(dc, os.path.join(path, "decoupled_attn.pth"))
    return {"unet": unet, "reference_unet": ref, "decoupled": dc, "pose_guider": guider, "image_encoder": encoder,
            "unet_config": diff_cfg, "image_encoder_config": enc_cfg}


def tiny_release_unet_config() -> dict:
    """Two levels at widths 32/64, one res block, attention everywhere: 7 transformer blocks."""
    return sd15_unet_config(model_channels=32, channel_mult=(1, 2), num_res_blocks=1)


def write_tiny_release(path: str) -> None:
    write_release(path, tiny_release_unet_config(), seed=5, dtype=torch.float16)


TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel("parts2whole", TINY_RELEASE,
              "Parts2Whole release folder: tiny UNets and CLIP vision, full-size pose guider, random weights",
              write=write_tiny_release),
)
