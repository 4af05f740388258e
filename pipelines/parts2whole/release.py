"""Reading the Parts2Whole release (diffusers folders + ``decoupled_attn.pth``) into native ComfyUI objects.

No diffusers at run time: the UNet configs are translated to ComfyUI's UNet config (``loading.unet_configs``),
the diffusers keys are renamed with ComfyUI's own map (``loading.diffusers_unet``) and every file, read by
``loading.files``, is checked key by key, so a wrong folder or a damaged file fails with the file and the keys
named. The reference UNet may miss exactly the tensors the official code strips (its output head and the last
transformer block after norm1); those are filled with zeros because the writer stops right after capturing that
block's norm1 output.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import torch
from torch import Tensor

from ...attention.blocks import BlockKey
from ..loading.comfy_unet import unet_shapes
from ..loading.diffusers_unet import convert_unet_state_dict as convert_diffusers_unet
from ..loading.files import read_state_dict
from ..loading.unet_configs import SD15_HEADS, ldm_config_from_diffusers_config
from ..progress import Stages
from .pose_guider import PoseGuider, load_pose_guider

log = logging.getLogger("humanref")

UNET_DIRS = ("unet", "reference_unet")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")
ENCODER_NAMES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
DECOUPLED_FILE = "decoupled_attn.pth"
DC_MARK = ".attn2.processor.to_"
# diffusers beta schedule name -> ComfyUI's (diffusers "linear" is ComfyUI's "sqrt_linear")
BETA_SCHEDULES = {"linear": "sqrt_linear", "scaled_linear": "linear"}
RELEASE_SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}


# ----------------------------------------------------------------------------------------------- files
def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def find_weights(folder: str, names: tuple[str, ...]) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"{folder} has no weights file (expected one of {', '.join(names)})")


def check_release_folder(folder: str) -> None:
    """A clear error for a folder that is not a Parts2Whole release."""
    if not os.path.isdir(folder):
        raise ValueError(f"Parts2Whole release folder {folder} does not exist")
    needed = [os.path.join(d, "config.json") for d in UNET_DIRS + ("pose_guider", "image_encoder")]
    missing = [p for p in needed if not os.path.isfile(os.path.join(folder, p))]
    if missing:
        raise ValueError(f"{folder} is not a Parts2Whole release: missing {', '.join(missing)}. Expected the "
                         "folders unet/, reference_unet/, pose_guider/, image_encoder/ (and feature_extractor/, "
                         f"{DECOUPLED_FILE}) of huggingface.co/huanngzh/Parts2Whole")


# ----------------------------------------------------------------------------------------------- UNet config
def release_unet_config(cfg: Mapping, source: str) -> dict:
    """ComfyUI's UNet config for a release ``config.json``; Parts2Whole is SD1.5: 8 heads, no added embedding."""
    unet_config = ldm_config_from_diffusers_config(cfg, source)
    if unet_config["num_heads"] != SD15_HEADS:
        raise ValueError(f"{source}: attention heads {cfg.get('num_attention_heads') or cfg.get('attention_head_dim')}"
                         f"; ComfyUI's SD1.5 UNet has {SD15_HEADS}, and only SD1.5-style UNets can be loaded")
    if unet_config["adm_in_channels"] is not None:
        raise ValueError(f"{source}: an added embedding ({cfg.get('addition_embed_type')}) is not SD1.5; only "
                         "SD1.5-style UNets can be loaded")
    return unet_config


def sampling_settings(folder: str) -> dict:
    """ComfyUI sampling settings from scheduler/scheduler_config.json (the release's DDIM "linear" betas)."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    cfg = read_json(path) if os.path.isfile(path) else dict(RELEASE_SCHEDULE)
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"{path}: beta_schedule {schedule!r} is not supported (expected linear or scaled_linear)")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{path}: prediction_type {cfg.get('prediction_type')!r}; the release predicts epsilon")
    return {"beta_schedule": BETA_SCHEDULES[schedule], "linear_start": float(cfg.get("beta_start", 0.00085)),
            "linear_end": float(cfg.get("beta_end", 0.012)), "timesteps": int(cfg.get("num_train_timesteps", 1000))}


# ----------------------------------------------------------------------------------------------- UNet weights
_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?1\.transformer_blocks\.(\d+)\.")


def ldm_block_key(ldm_key: str) -> Optional[BlockKey]:
    """("input", 4, 0) for "input_blocks.4.1.transformer_blocks.0...."; the middle block is ("middle", 0, i)."""
    m = _LDM_BLOCK.match(ldm_key)
    if not m:
        return None
    name = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
    return name, int(m.group(2) or 0), int(m.group(3))


@dataclass
class ConvertedUNet:
    state_dict: dict[str, Tensor]  # ComfyUI (ldm) keys
    decoupled: dict[str, Tensor] = field(default_factory=dict)  # diffusers _dc keys found in the file
    filled: tuple[str, ...] = ()  # diffusers keys missing by design, zero filled


def convert_unet_state_dict(sd: Mapping[str, Tensor], unet_config: dict, source: str,
                            reference: bool = False) -> ConvertedUNet:
    """Diffusers keys -> ComfyUI keys (loading.diffusers_unet); the denoising UNet's _dc keys set aside."""
    decoupled = {k: v for k, v in sd.items() if DC_MARK in k and not reference}
    plain = {k: v for k, v in sd.items() if k not in decoupled}
    out, filled = convert_diffusers_unet(plain, unet_config, source, reference=reference)
    return ConvertedUNet(out, decoupled, filled)


def build_unet_model(ldm_sd: dict[str, Tensor], unet_config: dict, sampling: dict,
                     dtype: Optional[torch.dtype] = None) -> Any:
    """A ComfyUI SD15 ModelPatcher with the release's noise schedule, loaded like ComfyUI's UNet loader."""
    config = comfy.supported_models.SD15(dict(unet_config))
    config.sampling_settings = dict(sampling)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(ldm_sd),
                                                  supported_dtypes=list(config.supported_inference_dtypes),
                                                  weight_dtype=comfy.utils.weight_dtype(ldm_sd))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model(ldm_sd, "")
    model = model.to(offload_device)
    model.load_model_weights(ldm_sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# ----------------------------------------------------------------------------------------------- decoupled attn
def decoupled_weights(sd: Mapping[str, Tensor], unet_config: dict,
                      source: str) -> dict[BlockKey, tuple[Tensor, Tensor]]:
    """``...attn2.processor.to_{k,v}_dc.weight`` per transformer block -> {block key: (W_k, W_v)}, all checked."""
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    expected = unet_shapes(unet_config)
    wanted: dict[str, tuple[BlockKey, str, tuple[int, ...]]] = {}
    for dk, lk in mapping.items():
        if dk.endswith(".attn2.to_k.weight") and lk in expected:
            prefix = dk[: -len(".attn2.to_k.weight")]
            key = ldm_block_key(lk)
            shape = tuple(expected[lk])
            for kind in ("k", "v"):
                wanted[f"{prefix}.attn2.processor.to_{kind}_dc.weight"] = (key, kind, shape)
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{source}: decoupled cross-attention weights do not match the UNet; missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    out: dict[BlockKey, dict[str, Tensor]] = {}
    for name, (key, kind, shape) in wanted.items():
        t = sd[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: key {name} has shape {tuple(t.shape)}, expected {shape}")
        out.setdefault(key, {})[kind] = t.float()
    return {k: (v["k"], v["v"]) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- image encoder
def load_image_encoder(folder: str) -> Any:
    """The CLIP ViT image encoder as ComfyUI's ClipVisionModel, built from the release's own config.json, with
    the feature extractor's preprocessing (size, mean, std)."""
    enc_dir = os.path.join(folder, "image_encoder")
    cfg_path = os.path.join(enc_dir, "config.json")
    cfg = read_json(cfg_path)
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model" or "projection_dim" not in cfg:
        raise ValueError(f"{cfg_path}: expected a CLIPVisionModelWithProjection config (model_type "
                         f"clip_vision_model with projection_dim), got model_type {cfg.get('model_type')!r}")
    path = find_weights(enc_dir, ENCODER_NAMES)
    sd, _ = read_state_dict(path)
    sd.pop("vision_model.embeddings.position_ids", None)  # a buffer in older transformers files
    clip = comfy.clip_vision.ClipVisionModel(cfg_path)
    expected = clip.model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: does not match {cfg_path}; missing keys {missing[:8]}, unexpected keys "
                         f"{unexpected[:8]}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: key {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    clip.load_sd(sd)
    fe_path = os.path.join(folder, "feature_extractor", "preprocessor_config.json")
    if os.path.isfile(fe_path):
        fe = read_json(fe_path)
        crop = fe.get("crop_size", clip.image_size)
        clip.image_size = int(crop["height"] if isinstance(crop, dict) else crop)
        clip.image_mean = list(fe.get("image_mean", clip.image_mean))
        clip.image_std = list(fe.get("image_std", clip.image_std))
    return clip


# ----------------------------------------------------------------------------------------------- the release
@dataclass(frozen=True, eq=False)
class Parts2WholeRelease:
    """What the Parts2Whole patch needs besides the two UNets: the pose guider and the decoupled weights.

    Passed between nodes by reference and never mutated (deepcopy answers itself)."""

    name: str
    pose_guider: PoseGuider
    decoupled: dict[BlockKey, tuple[Tensor, Tensor]]
    image_dim: int

    def __deepcopy__(self, memo: dict) -> Parts2WholeRelease:
        return self


@dataclass
class LoadedRelease:
    model: Any
    reference_unet: Any
    image_encoder: Any
    release: Parts2WholeRelease
    filled: tuple[str, ...] = ()


def load_unet_folder(folder: str, sub: str, sampling: dict,
                     dtype: Optional[torch.dtype]) -> tuple[Any, dict, ConvertedUNet]:
    cfg = read_json(os.path.join(folder, sub, "config.json"))
    unet_config = release_unet_config(cfg, os.path.join(folder, sub, "config.json"))
    path = find_weights(os.path.join(folder, sub), WEIGHT_NAMES)
    converted = convert_unet_state_dict(read_state_dict(path)[0], unet_config, path, reference=sub == "reference_unet")
    model = build_unet_model(converted.state_dict, unet_config, sampling, dtype)
    return model, unet_config, converted


LOAD_STAGES = ("unet", "reference_unet", "decoupled attention", "pose guider", "image encoder")


def load_release(folder: str, dtype: Optional[torch.dtype] = None) -> LoadedRelease:
    """Everything of a release folder as ComfyUI objects (MODEL, writer MODEL, CLIP_VISION, PARTS2WHOLE)."""
    check_release_folder(folder)
    stages = Stages(f"Parts2Whole release {os.path.basename(os.path.normpath(folder))}", LOAD_STAGES)
    sampling = sampling_settings(folder)
    model, unet_config, unet = load_unet_folder(folder, "unet", sampling, dtype)
    stages.finished("unet")
    writer, ref_config, ref = load_unet_folder(folder, "reference_unet", sampling, dtype)
    stages.finished("reference_unet")
    if ref_config != unet_config:
        raise ValueError(f"{folder}: unet/config.json and reference_unet/config.json describe different UNets")
    dc_path = os.path.join(folder, DECOUPLED_FILE)
    if os.path.isfile(dc_path):
        decoupled = decoupled_weights(read_state_dict(dc_path)[0], unet_config, dc_path)
    elif unet.decoupled:
        decoupled = decoupled_weights(unet.decoupled, unet_config, os.path.join(folder, "unet"))
    else:
        raise ValueError(f"{folder}: no decoupled cross-attention weights ({DECOUPLED_FILE} is missing and the "
                         "unet holds no *_dc keys)")
    stages.finished("decoupled attention")
    guider_dir = os.path.join(folder, "pose_guider")
    guider_path = find_weights(guider_dir, WEIGHT_NAMES)
    guider = load_pose_guider(read_json(os.path.join(guider_dir, "config.json")), read_state_dict(guider_path)[0],
                              guider_path)
    if guider.conv_out.out_channels != unet_config["model_channels"]:
        raise ValueError(f"{guider_path}: the pose guider outputs {guider.conv_out.out_channels} channels but the "
                         f"UNet's conv_in has {unet_config['model_channels']}")
    stages.finished("pose guider")
    encoder = load_image_encoder(folder)
    stages.finished("image encoder")
    image_dim = int(read_json(os.path.join(folder, "image_encoder", "config.json"))["projection_dim"])
    in_dim = next(iter(decoupled.values()))[0].shape[1]
    if image_dim != in_dim:
        raise ValueError(f"{folder}: the image encoder projects to {image_dim} but {DECOUPLED_FILE} expects {in_dim}")
    release = Parts2WholeRelease(os.path.basename(os.path.normpath(folder)), guider, decoupled, image_dim)
    if ref.filled:
        log.info("HumanRef: Parts2Whole reference_unet: %d tensors stripped by design, zero filled", len(ref.filled))
    return LoadedRelease(model, writer, encoder, release, ref.filled)
