"""Loading ``mimicbrush.bin`` into native ComfyUI objects.

The official file is a pickled dict of five state dicts: ``unet`` (the 13-channel imitative UNet, diffusers
names), ``referencenet`` (the reference UNet, diffusers names without ``conv_norm_out``/``conv_out`` and the
stripped last transformer block), ``image_proj`` (a 1280 -> 768 linear), ``depth_guider`` and ``image_encoder``
(transformers CLIP-vision names, fine-tuned ViT-H/14). It is read by ``loading.files`` (a pickle only with
``torch.load(weights_only=True)``: a file that needs code to unpickle is refused). A safetensors file holding
the same tensors as ``<part>.<key>`` loads too.

The UNets are converted to ComfyUI's names with ComfyUI's own diffusers map and loaded through
``comfy.sd.load_diffusion_model_state_dict``; the image encoder through ``comfy.clip_vision``.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import comfy.clip_model
import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import torch
from torch import Tensor, nn

from ..loading.comfy_unet import model_family
from ..loading.diffusers_unet import convert_unet_state_dict
from ..loading.files import read_state_dict
from ..loading.unet_configs import SD15_HEADS, ldm_config_from_diffusers_state_dict
from ..progress import Stages
from .depth_guider import DepthGuider, depth_guider_from_state_dict

log = logging.getLogger("humanref")

PARTS: tuple[str, ...] = ("unet", "referencenet", "image_proj", "depth_guider", "image_encoder")
IMITATIVE_CHANNELS = 13  # [noisy latent 4 | mask 1 | masked-image latent 4 | depth feature 4]
EXTRA_CHANNELS = IMITATIVE_CHANNELS - 4
CHECK_KEY = "humanref_mimicbrush_inputs"


# ---------------------------------------------------------------------------------------------- the file
def read_checkpoint(path: str) -> dict[str, dict[str, Tensor]]:
    """The five parts of a MimicBrush checkpoint, each a flat tensor dict; clear errors for anything else."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MimicBrush checkpoint {path} does not exist")
    try:
        flat, _ = read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"{name} is not a MimicBrush checkpoint: {e}") from e
    data: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if not rest:
            raise ValueError(f"{name}: part {part!r} is not a state dict of tensors")
        data.setdefault(part, {})[rest] = value
    missing = [p for p in PARTS if p not in data]
    if missing:
        raise ValueError(f"{name} is not a complete MimicBrush checkpoint: missing part(s) {missing}; found "
                         f"{sorted(data)[:8]}. Expected {PARTS} (the official mimicbrush.bin)")
    return {part: data[part] for part in PARTS}


# ---------------------------------------------------------------------------------------------- UNets
def convert_unet(sd: Mapping[str, Tensor], part: str, in_channels: int,
                 tolerate_stripped: bool = False) -> tuple[dict[str, Tensor], dict, list[str]]:
    """Diffusers UNet keys -> ComfyUI (ldm) keys, shape-checked; documented-missing tensors become zeros.

    Returns (ldm state dict, unet_config, diffusers names that were filled with zeros).
    """
    config = ldm_config_from_diffusers_state_dict(sd, part, SD15_HEADS)
    if config["in_channels"] != in_channels:
        raise ValueError(f"{part}: conv_in.weight has {config['in_channels']} input channels (shape "
                         f"{tuple(sd['conv_in.weight'].shape)}); MimicBrush's {part} has {in_channels}")
    out, filled = convert_unet_state_dict(sd, config, part, reference=tolerate_stripped)
    return out, config, list(filled)


def _load_unet(ldm: dict[str, Tensor], part: str, name: str, dtype: Optional[torch.dtype]) -> Any:
    options = {"dtype": dtype} if dtype is not None else {}
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(ldm), model_options=options)
    if patcher is None:
        raise ValueError(f"{name}: ComfyUI did not recognise the {part} UNet (model_channels 320, context 768 "
                         "and conv proj_in are what makes an SD1.5 UNet)")
    family = model_family(patcher)
    if family != "SD15":
        raise ValueError(f"{name}: the {part} UNet was detected as {family}; MimicBrush is SD1.5")
    return patcher


def _inputs_check(executor, x, t, c_concat=None, *args, **kwargs):
    """Clear error instead of a conv_in shape error when the 9 extra channels are missing."""
    got = 0 if c_concat is None else int(c_concat.shape[1])
    if got != EXTRA_CHANNELS:
        raise ValueError(
            f"the MimicBrush model needs {EXTRA_CHANNELS} extra input channels [mask, masked-image latent, depth "
            f"feature] in its conditioning, got {got}: use the positive/negative outputs of 'MimicBrush "
            "Conditioning (HumanRef)' with this model")
    return executor(x, t, c_concat, *args, **kwargs)


def imitative_model(ldm: dict[str, Tensor], name: str, dtype: Optional[torch.dtype] = None) -> Any:
    """The 13-channel UNet as a ComfyUI MODEL whose extra channels come only from ``noise_concat``."""
    patcher = _load_unet(ldm, "unet", name, dtype)
    # ComfyUI treats in_channels > 4 as SD-inpainting (mask + masked image, grey fill); MimicBrush's extra
    # channels are [mask, black-filled masked latent, depth feature] and come whole from the conditioning.
    patcher.model.concat_keys = ()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CHECK_KEY, _inputs_check)
    return patcher


# ---------------------------------------------------------------------------------------------- CLIP vision
class ConfiguredClipVision(comfy.clip_vision.ClipVisionModel):
    """comfy's ClipVisionModel from a config dict (for encoders ComfyUI has no JSON for, e.g. tiny test ones)."""

    def __init__(self, config: dict) -> None:  # mirrors ClipVisionModel.__init__ minus the JSON file
        self.image_size = config.get("image_size", 224)
        self.image_mean = config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        self.image_std = config.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.return_all_hidden_states = False
        self.load_device = comfy.model_management.text_encoder_device()
        offload = comfy.model_management.text_encoder_offload_device()
        self.dtype = comfy.model_management.text_encoder_dtype(self.load_device)
        self.model = comfy.clip_model.CLIPVisionModelProjection(config, self.dtype, offload, comfy.ops.manual_cast)
        self.model.eval()
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device,
                                                        offload_device=offload)


def clip_vision_config(sd: Mapping[str, Tensor], head_dim: int = 64) -> dict:
    """A CLIP-vision config from key shapes (heads assume 64-dim heads, as CLIP B and L have)."""
    hidden = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[0])
    patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
    positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    grid = int(round((positions - 1) ** 0.5))
    config = {
        "hidden_act": "gelu", "hidden_size": hidden, "image_size": grid * patch,
        "intermediate_size": int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
        "num_attention_heads": max(1, hidden // head_dim), "num_channels": 3,
        "num_hidden_layers": len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")}),
        "patch_size": patch,
    }
    if "visual_projection.weight" in sd:
        config["projection_dim"] = int(sd["visual_projection.weight"].shape[0])
    return config


def image_encoder(sd: Mapping[str, Tensor], name: str) -> Any:
    """The fine-tuned CLIP vision tower as a comfy ClipVisionModel (ViT-H through ComfyUI's own config)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    needed = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
              "vision_model.encoder.layers.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError(f"{name}: image_encoder lacks {absent}; expected transformers CLIPVisionModel names")
    clip = comfy.clip_vision.load_clipvision_from_sd(dict(sd))
    if clip is None:
        clip = ConfiguredClipVision(clip_vision_config(sd))
        missing, _ = clip.load_sd(sd)
    else:
        missing = [k for k in clip.model.state_dict() if k not in sd]
    if missing:
        raise ValueError(f"{name}: image_encoder is missing {len(missing)} key(s), e.g. {sorted(missing)[:6]}")
    shapes = {k: tuple(v.shape) for k, v in clip.model.state_dict().items()}
    bad = [k for k, v in sd.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"{name}: image_encoder tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, expected "
                         f"{shapes[bad[0]]}")
    return clip


# ---------------------------------------------------------------------------------------------- projection
class ImageProjection(nn.Module):
    """MimicBrush's LinearResampler: CLIP penultimate hidden states [B, 257, 1280] -> [B, 257, 768]."""

    def __init__(self, in_dim: int = 1280, out_dim: int = 768) -> None:
        super().__init__()
        self.projector = nn.Linear(in_dim, out_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.projector(hidden.to(self.projector.weight.dtype))


def image_projection(sd: Mapping[str, Tensor], name: str) -> ImageProjection:
    if set(sd) != {"projector.weight", "projector.bias"}:
        raise ValueError(f"{name}: image_proj must hold projector.weight and projector.bias, got {sorted(sd)}")
    out_dim, in_dim = sd["projector.weight"].shape
    proj = ImageProjection(int(in_dim), int(out_dim))
    proj.load_state_dict({k: v.float() for k, v in sd.items()})
    return proj.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- bundle
@dataclass(frozen=True, eq=False)
class MimicBrushParts:
    """What the conditioning node needs besides MODEL/VAE: shared by reference, never deep-copied or mutated."""

    reference_model: Any  # ModelPatcher of the reference UNet (the writer)
    clip_vision: Any  # comfy ClipVisionModel (fine-tuned)
    projection: ImageProjection
    depth_guider: DepthGuider
    uid: str = ""

    def __deepcopy__(self, memo: dict) -> MimicBrushParts:
        return self


@dataclass(frozen=True, eq=False)
class LoadedMimicBrush:
    model: Any  # imitative UNet ModelPatcher
    parts: MimicBrushParts
    filled_writer_keys: tuple[str, ...]


LOAD_STAGES = ("read", "unet", "referencenet", "image encoder", "image projection and depth guider")


def load_mimicbrush(path: str, dtype: Optional[torch.dtype] = None) -> LoadedMimicBrush:
    """Everything in mimicbrush.bin as ComfyUI objects (UNets in ComfyUI's chosen dtype unless given)."""
    name = os.path.basename(path)
    stages = Stages(f"MimicBrush {name}", LOAD_STAGES)
    parts = read_checkpoint(path)
    stages.finished("read")
    unet_ldm, _, _ = convert_unet(parts["unet"], f"{name} unet", IMITATIVE_CHANNELS)
    model = imitative_model(unet_ldm, name, dtype)
    stages.finished("unet")
    ref_ldm, _, filled = convert_unet(parts["referencenet"], f"{name} referencenet", 4, tolerate_stripped=True)
    writer = _load_unet(ref_ldm, "referencenet", name, dtype)
    stages.finished("referencenet")
    clip_vision = image_encoder(parts["image_encoder"], name)
    stages.finished("image encoder")
    bundle = MimicBrushParts(
        reference_model=writer,
        clip_vision=clip_vision,
        projection=image_projection(parts["image_proj"], f"{name} image_proj"),
        depth_guider=depth_guider_from_state_dict(parts["depth_guider"], f"{name} depth_guider"),
        uid=uuid.uuid4().hex[:12],
    )
    stages.finished("image projection and depth guider")
    return LoadedMimicBrush(model, bundle, tuple(filled))
