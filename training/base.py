"""The SD1.5 base a trainer starts from: one single-file checkpoint (ldm keys), read without any network.

The trainable UNet is a diffusers ``UNet2DConditionModel`` whose config is derived locally from ComfyUI's
detection of the checkpoint (``pipelines.loading.unet_configs``) and whose weights are renamed with ComfyUI's
own key map (``pipelines.loading.diffusers_unet``), the map the pack's writers use to turn the result back into
ComfyUI names. The frozen parts come through ComfyUI's loaders, as the nodes see them at inference: the CLIP text
encoder (ComfyUI's tokenizer and prompt handling) and the VAE module (``first_stage_model``), so training and
inference encode text, images and decoder features the same way.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..pipelines.loading.comfy_unet import UNET_PREFIX, config_family
from ..pipelines.loading.diffusers_unet import diffusers_names
from ..pipelines.loading.files import read_state_dict
from ..pipelines.loading.unet_configs import diffusers_config_from_ldm_config

SD15_SCALE = 0.18215  # comfy.latent_formats.SD15().scale_factor


@dataclass(eq=False)
class BaseModel:
    """What a trainer takes from the checkpoint. ``unet`` holds diffusers-named weights (not a module yet)."""

    name: str
    family: str  # ComfyUI's family name, "SD15"
    unet_config: dict  # ComfyUI/ldm UNet config
    unet: dict[str, Tensor]
    clip: Any  # comfy.sd.CLIP (frozen)
    vae: torch.nn.Module  # comfy first_stage_model (AutoencoderKL), frozen
    scale_factor: float = SD15_SCALE


def load_base(path: str) -> BaseModel:
    """An SD1.5 single-file checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--base {path}: no such file (an SD1.5 checkpoint, e.g. "
                                "v1-5-pruned-emaonly.safetensors)")
    try:
        sd, _ = read_state_dict(path)
    except ValueError as e:  # a damaged header, a pickle with code
        raise ValueError(f"--base {path} cannot be read as a checkpoint: {e}") from e
    return base_from_state_dict(sd, os.path.basename(path))


def base_from_state_dict(sd: Mapping[str, Tensor], name: str, clip: Any = None, vae: Any = None) -> BaseModel:
    """The same from an in-memory checkpoint; ``clip``/``vae`` (ComfyUI objects) may be given to reuse them."""
    import comfy.model_detection
    import comfy.sd

    sd = dict(sd)
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise ValueError(f"{name} has no {UNET_PREFIX}* keys: not a single-file SD checkpoint (ldm key names); "
                         "diffusers folders are not read, convert them to one file first")
    config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    family = config_family(config) or "unknown"
    if family != "SD15":
        raise ValueError(f"{name} is detected as {family}; the trainers fine-tune SD1.5 checkpoints (320 model "
                         "channels, 768 context)")
    unet_config = dict(config.unet_config)
    ldm = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    unet = {k: v.float() for k, v in diffusers_names(unet_config, ldm, name).items()}
    if clip is None or vae is None:
        _, loaded_clip, loaded_vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=vae is None,
                                                                              output_clip=clip is None,
                                                                              output_model=False)
        clip = clip if clip is not None else loaded_clip
        vae = vae if vae is not None else loaded_vae
    if clip is None:
        raise ValueError(f"{name} has no text encoder (cond_stage_model.*): the trainers need the checkpoint's CLIP")
    module = getattr(vae, "first_stage_model", vae)
    if module is None or getattr(getattr(module, "decoder", None), "mid", None) is None:
        raise ValueError(f"{name} has no SD VAE (first_stage_model.*): the trainers need the checkpoint's VAE")
    module = module.float().eval().requires_grad_(False)
    return BaseModel(name, family, unet_config, unet, clip, module)


def build_unet(base: BaseModel, in_channels: Optional[int] = None) -> Any:
    """A fresh trainable diffusers UNet with the base weights (fp32)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # no random init of weights that are overwritten next
        config = dict(base.unet_config, in_channels=in_channels or base.unet_config["in_channels"])
        unet = UNet2DConditionModel(**diffusers_config_from_ldm_config(config))
    weights = {k: v.clone() for k, v in base.unet.items()}
    if in_channels is not None and in_channels != base.unet["conv_in.weight"].shape[1]:
        shape = (base.unet["conv_in.weight"].shape[0], in_channels) + tuple(base.unet["conv_in.weight"].shape[2:])
        weights["conv_in.weight"] = torch.zeros(shape)  # the caller initialises the new channels
    expected = set(unet.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{base.name}: the UNet does not fit diffusers' SD1.5 UNet (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    unet.load_state_dict(weights, strict=True, assign=True)
    return unet


def transformer_paths(unet_config: dict) -> list[tuple[str, str]]:
    """(diffusers path, ComfyUI path) of every transformer block, in ComfyUI's execution order."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)
    suffix = ".attn1.to_k.weight"
    pairs = [(d[: -len(suffix)], ldm[: -len(suffix)]) for d, ldm in mapping.items() if d.endswith(suffix)]

    def order(pair: tuple[str, str]) -> tuple:
        parts = pair[1].split(".")
        group = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[parts[0]]
        return (group,) + tuple(int(p) for p in parts if p.isdigit())

    return sorted(pairs, key=order)


_TEXT_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Tensor]] = weakref.WeakKeyDictionary()


class TextEncoder:
    """Captions -> [B, 77, 768] with ComfyUI's CLIP (as the CLIPTextEncode node), frozen and cached.

    Parentheses are escaped (captions are plain text, not ComfyUI's weighting syntax) and only the first
    77-token chunk is kept, as the usual SD trainers do; longer captions are truncated (reported once).
    """

    def __init__(self, clip: Any, cache_size: int = 4096) -> None:
        self.clip = clip
        self.cache: dict[str, Tensor] = _TEXT_CACHE.setdefault(clip, {})  # shared by every encoder of this CLIP
        self.cache_size = cache_size
        self.truncated = 0

    def encode_one(self, caption: str) -> Tensor:
        if caption in self.cache:
            return self.cache[caption]
        text = caption.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        tokens = self.clip.tokenize(text)
        if any(len(chunks) > 1 for chunks in tokens.values()):
            self.truncated += 1
            tokens = {k: v[:1] for k, v in tokens.items()}
        with torch.no_grad():
            cond = self.clip.encode_from_tokens(tokens).float().cpu()[0]
        if len(self.cache) < self.cache_size:
            self.cache[caption] = cond
        return cond

    def __call__(self, captions: Sequence[str]) -> Tensor:
        return torch.stack([self.encode_one(c) for c in captions])


def vae_encode(vae: torch.nn.Module, images: Tensor, scale: float, generator: Optional[torch.Generator] = None,
               sample: bool = True) -> Tensor:
    """[B, 3, H, W] in -1..1 -> scaled latents (the UNet's space): a posterior sample, or its mean."""
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(images))
        mean, logvar = moments.float().chunk(2, dim=1)
        if not sample:
            return mean * scale
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
        return (mean + std * noise) * scale


def vae_decode(vae: torch.nn.Module, latents: Tensor, scale: float) -> Tensor:
    """Scaled latents -> [B, 3, H, W] in -1..1 (differentiable: the texture loss backpropagates through it)."""
    return vae.decoder(vae.post_quant_conv(latents / scale))


def decoder_mid_features(vae: torch.nn.Module, latents: Tensor, scale: float) -> Tensor:
    """The hand mask head's input for scaled latents: the decoder's middle-block output (512 channels, H/8).

    The same sequence as ``pipelines.hands.weights.vae_mask_features`` at inference, differentiable.
    """
    decoder = vae.decoder
    h = vae.post_quant_conv(latents / scale)
    h = decoder.conv_in(h)
    h = decoder.mid.block_1(h, None)
    h = decoder.mid.attn_1(h)
    return decoder.mid.block_2(h, None)


def ddpm_scheduler() -> Any:
    """SD1.5's training noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon), built locally."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def ddim_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class UNetTask:
    """What both trainers share: a diffusers UNet trained on the base checkpoint's VAE and text encoder with
    the DDPM schedule of SD1.5. Subclasses set ``unet`` and list their trainable modules in ``modules()``."""

    unet: torch.nn.Module

    def _init_common(self, base: BaseModel, config: Any) -> None:
        self.base = base
        self.config = config
        self.vae = base.vae
        self.text = TextEncoder(base.clip)
        self.scheduler = ddpm_scheduler()
        self.alphas = self.scheduler.alphas_cumprod.float()
        self.device = torch.device("cpu")

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        self.device = device
        self.unet.to(device)
        for module in self.modules():
            module.to(device)
        self.vae.to(device)
        self.alphas = self.alphas.to(device)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
