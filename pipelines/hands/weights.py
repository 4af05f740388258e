"""The trained hand generator's file layout (ours: no weights were released) and its mask head.

One safetensors file in ``models/hand_generator/``:

- ``unet.*``: an SD1.5 UNet in ComfyUI/ldm key names (``unet.input_blocks.0.0.weight`` ...), whose
  ``conv_in`` (``unet.input_blocks.0.0.weight``) has 15 input channels: 4 latent + 11 condition (the table in
  ``hand_condition``), fed by the condition bilinearly downscaled to the latent grid.
- ``mask_head.{0,2,4,6}.{weight,bias}``: the mask head f_m, ``nn.Sequential(ConvTranspose2d(k=2, s=2), SiLU,
  ConvTranspose2d, SiLU, ConvTranspose2d, SiLU, ConvTranspose2d)``; widths come from the weights (ours:
  512 -> 256 -> 128 -> 64 -> 1); weights are ``[in, out, 2, 2]`` as PyTorch stores transposed convolutions.
- metadata (all strings): ``format = "humanref-hand-generator"``, ``version = "1"``, optional
  ``mask_activation`` (``clamp``, the default: the paper regresses the mask with an L2 loss, or ``sigmoid``)
  and free-form ``heatmap_sigma``, ``description``.

Mask-head input ("decoder features", paper III-B leaves it open): the activation of the SD VAE decoder after
its middle block (``decoder.mid.block_2``), 512 channels on the latent grid (H/8). Four stride-2 transposed
convolutions bring it to 2H; a 2x2 average pool brings that to the image resolution H (supersampled, so the
mask edge is antialiased). The features are computed from the final denoised latent, the one that is decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loading.comfy_unet import model_family
from ..loading.diffusers_unet import convert_unet_state_dict
from ..loading.files import read_state_dict
from ..loading.unet_configs import ldm_config_from_diffusers_state_dict
from ..notices import warn
from ..progress import Stages

FORMAT = "humanref-hand-generator"
VERSION = "1"
FILE_UNET_PREFIX = "unet."  # the UNet's keys in our file (not a checkpoint's loading.comfy_unet.UNET_PREFIX)
HEAD_PREFIX = "mask_head."
HEAD_LAYERS = (0, 2, 4, 6)
MASK_FEATURE_CHANNELS = 512
IN_CHANNELS = 4 + 11
ACTIVATIONS = ("clamp", "sigmoid")


class MaskHead(nn.Module):
    """f_m: 4 transposed convolutions (k 2, s 2), SiLU between them; then 2x2 average pool to image size."""

    def __init__(self, widths: tuple[int, ...] = (MASK_FEATURE_CHANNELS, 256, 128, 64, 1), activation: str = "clamp"):
        super().__init__()
        if len(widths) != 5 or widths[-1] != 1:
            raise ValueError(f"mask head widths must be 5 numbers ending in 1, got {widths}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"mask_activation must be one of {ACTIVATIONS}, got {activation!r}")
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size=2, stride=2))
            if i < 3:
                layers.append(nn.SiLU())
        self.layers = nn.Sequential(*layers)
        self.activation = activation

    def forward(self, features: Tensor) -> Tensor:
        """[B, C, h, w] decoder features -> [B, 8h, 8w] mask in 0..1."""
        m = F.avg_pool2d(self.layers(features), 2)
        m = torch.sigmoid(m) if self.activation == "sigmoid" else m.clamp(0.0, 1.0)
        return m[:, 0]


def head_state_dict(head: MaskHead) -> dict[str, Tensor]:
    return {f"{HEAD_PREFIX}{k.removeprefix('layers.')}": v for k, v in head.state_dict().items()}


def mask_head_from_state_dict(sd: dict[str, Tensor], activation: str = "clamp",
                              name: str = "hand generator") -> MaskHead:
    """Build and load f_m from ``mask_head.{0,2,4,6}.*`` (prefix optional), with shape checks."""
    sd = {k.removeprefix(HEAD_PREFIX): v for k, v in sd.items()}
    expected = {f"{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")}
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(f"{name}: the mask head needs keys mask_head.{{0,2,4,6}}.{{weight,bias}} "
                         f"(nn.Sequential of 4 ConvTranspose2d with SiLU between); missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    widths = [int(sd["0.weight"].shape[0])]
    for i in HEAD_LAYERS:
        w = sd[f"{i}.weight"]
        if w.ndim != 4 or tuple(w.shape[2:]) != (2, 2):
            raise ValueError(f"{name}: mask_head.{i}.weight must be a 2x2 transposed-convolution kernel "
                             f"[in, out, 2, 2], got {tuple(w.shape)}")
        if int(w.shape[0]) != widths[-1]:
            raise ValueError(f"{name}: mask_head.{i}.weight takes {w.shape[0]} channels but the previous layer "
                             f"gives {widths[-1]}")
        widths.append(int(w.shape[1]))
    if widths[0] != MASK_FEATURE_CHANNELS:
        raise ValueError(f"{name}: the mask head must take the VAE decoder's {MASK_FEATURE_CHANNELS} middle-block "
                         f"channels, got {widths[0]}")
    if widths[-1] != 1:
        raise ValueError(f"{name}: the mask head must end in 1 channel, got {widths[-1]}")
    head = MaskHead(tuple(widths), activation)
    head.load_state_dict({f"layers.{k}": v.float() for k, v in sd.items()})
    return head.eval()


def split_checkpoint(sd: dict[str, Tensor], metadata: Optional[dict], name: str) -> tuple[dict, dict, dict]:
    """(UNet state dict without prefix, mask-head state dict, metadata), or a ValueError naming what is wrong."""
    metadata = dict(metadata or {})
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT:
        raise ValueError(f"{name}: metadata format is {fmt!r}, expected {FORMAT!r}")
    if fmt is None:
        warn(f"{name} has no 'format' metadata; it is read as {FORMAT} version {VERSION}")
    if metadata.get("version", VERSION) != VERSION:
        raise ValueError(f"{name}: {FORMAT} version {metadata['version']} is not supported (this pack reads {VERSION})")
    unet = {k[len(FILE_UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(FILE_UNET_PREFIX)}
    head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    other = sorted(k for k in sd if not k.startswith((FILE_UNET_PREFIX, HEAD_PREFIX)))
    if other:
        raise ValueError(f"{name}: unexpected keys outside unet.* and mask_head.*: {other[:5]}"
                         f"{' ...' if len(other) > 5 else ''}")
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None:
        hint = " (diffusers key names: convert the file first)" if any(k.startswith("unet.conv_in") for k in sd) else ""
        raise ValueError(f"{name}: no unet.input_blocks.0.0.weight: not a UNet in ComfyUI/ldm key names{hint}")
    if conv_in.ndim != 4 or conv_in.shape[1] != IN_CHANNELS:
        raise ValueError(f"{name}: the UNet's conv_in takes {conv_in.shape[1]} channels, expected {IN_CHANNELS} "
                         "(4 latent + 11 hand condition)")
    if not head:
        raise ValueError(f"{name}: no mask_head.* keys (the mask head is part of a hand generator file)")
    return unet, head, metadata


@dataclass(frozen=True, eq=False)
class HandGeneratorWeights:
    model: Any  # comfy ModelPatcher of the 15-channel UNet
    head: MaskHead
    metadata: dict
    name: str

    def __deepcopy__(self, memo: dict) -> HandGeneratorWeights:
        return self


LOAD_STAGES = ("read", "unet")


def load_hand_generator(path: str, name: Optional[str] = None) -> HandGeneratorWeights:
    """Read our layout and load the UNet as a native ComfyUI SD15 model (its own dtype and device handling)."""
    import comfy.sd

    name = name or path
    if not path.endswith(".safetensors"):
        raise ValueError(f"{name}: hand generators are safetensors files (see docs: the layout)")
    stages = Stages(f"hand generator {name}", LOAD_STAGES)
    sd, metadata = read_state_dict(path)
    stages.finished("read")
    unet, head_sd, metadata = split_checkpoint(sd, metadata, name)
    head = mask_head_from_state_dict(head_sd, metadata.get("mask_activation", "clamp"), name)
    patcher = comfy.sd.load_diffusion_model_state_dict(unet)
    stages.finished("unet")
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI does not recognise unet.* as a UNet (expected an SD1.5 UNet: "
                         "320 model channels, 768 context)")
    kind = model_family(patcher)
    if kind != "SD15":
        raise ValueError(f"{name}: the UNet was detected as {kind}, expected SD15")
    patcher.model.concat_keys = ()  # our own fresh model: the 11 channels come from the hand condition
    return HandGeneratorWeights(patcher, head, metadata, name)


def vae_mask_features(vae: Any, samples: Tensor) -> Tensor:
    """The mask head's input: the VAE decoder's middle-block output for latents [B, 4, h, w] -> [B, 512, h, w]."""
    import comfy.model_management

    fsm = vae.first_stage_model
    decoder = getattr(fsm, "decoder", None)
    mid = getattr(decoder, "mid", None)
    if mid is None or not hasattr(mid, "block_2") or getattr(fsm, "bn", None) is not None:
        raise ValueError("the hand generator's mask head needs an SD1.5-style VAE (KL-f8 with a decoder middle "
                         "block); connect the SD1.5 checkpoint's VAE")
    comfy.model_management.load_models_gpu([vae.patcher])
    z = samples.to(device=vae.device, dtype=vae.vae_dtype)
    post = getattr(fsm, "post_quant_conv", None)
    h = post(z) if post is not None else z
    h = decoder.conv_in(h)
    h = mid.block_1(h, None)
    h = mid.attn_1(h)
    h = mid.block_2(h, None)
    if h.shape[1] != MASK_FEATURE_CHANNELS:
        raise ValueError(f"the VAE decoder's middle block has {h.shape[1]} channels; the mask head needs "
                         f"{MASK_FEATURE_CHANNELS} (an SD1.5 VAE)")
    return h.float()


def predict_mask(head: MaskHead, vae: Any, samples: Tensor) -> Tensor:
    """[B, 4, h, w] final latents -> [B, 8h, 8w] mask on the CPU."""
    features = vae_mask_features(vae, samples)
    head = head.to(features.device)
    with torch.no_grad():
        return head(features).cpu()


# ---- diffusers -> our layout -------------------------------------------------------------------------------

def convert_diffusers(unet_sd: dict[str, Tensor], head_sd: dict[str, Tensor],
                      metadata: Optional[dict] = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A diffusers fine-tuned UNet (15-channel conv_in) + mask-head weights -> our file's (state dict, metadata)."""
    unet_sd = {k.removeprefix("unet."): v for k, v in unet_sd.items()}  # a diffusers pipeline's unet.* prefix
    cfg = ldm_config_from_diffusers_state_dict(unet_sd, "diffusers UNet")
    converted, _ = convert_unet_state_dict(unet_sd, cfg, "diffusers UNet")
    out = {f"{FILE_UNET_PREFIX}{k}": v for k, v in converted.items()}
    if cfg["in_channels"] != IN_CHANNELS:
        raise ValueError(f"diffusers UNet: conv_in takes {cfg['in_channels']} channels, expected {IN_CHANNELS} "
                         "(4 latent + 11 hand condition)")
    head = mask_head_from_state_dict(head_sd, name="mask head weights")
    out.update({k: v.contiguous() for k, v in head_state_dict(head).items()})
    meta = {"format": FORMAT, "version": VERSION, "mask_activation": "clamp"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return out, meta


def save_hand_generator(path: str, unet_sd: dict[str, Tensor], head: MaskHead | dict[str, Tensor],
                        metadata: Optional[dict] = None) -> dict[str, str]:
    """Write our layout from a diffusers UNet state dict and the mask head (the trainer's writer).

    The file goes through :func:`convert_diffusers` and the loader's own checks (:func:`split_checkpoint`)
    before anything is written, so a trainer can never produce a file the loader refuses; written to a
    temporary name first and renamed, so an interrupted save leaves no half file. Returns the metadata.
    """
    import os

    from safetensors.torch import save_file

    meta = {}
    if isinstance(head, MaskHead):
        meta["mask_activation"] = head.activation
        head = head_state_dict(head)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    sd, meta = convert_diffusers({k: v.detach() for k, v in unet_sd.items()},
                                 {k: v.detach() for k, v in head.items()}, meta)
    if meta.get("mask_activation", "clamp") not in ACTIVATIONS:
        raise ValueError(f"mask_activation must be one of {ACTIVATIONS}, got {meta['mask_activation']!r}")
    split_checkpoint(sd, meta, os.path.basename(path))
    tmp = path + ".part"
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp, metadata=meta)
    os.replace(tmp, path)
    return meta
