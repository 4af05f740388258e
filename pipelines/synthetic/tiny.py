"""Every file ``python -m humanref tiny-models DIR`` writes, in one explicit list (base models, then each method)."""
from __future__ import annotations

from . import anydressing, hands, mimicbrush, parts2whole
from .base import TINY_CONTROLNET, TINY_SD15_CHECKPOINT, TinyModel, tiny_sd15_unet_config


def tiny_sd15_checkpoint() -> dict:
    import torch

    from .base import sd15_checkpoint_state_dict

    return sd15_checkpoint_state_dict(tiny_sd15_unet_config(), dtype=torch.float16)


def tiny_controlnet() -> dict:
    import torch

    from .base import controlnet_state_dict

    return controlnet_state_dict(tiny_sd15_unet_config(), seed=7, dtype=torch.float16)


BASE_MODELS: tuple[TinyModel, ...] = (
    TinyModel("checkpoints", TINY_SD15_CHECKPOINT,
              "SD1.5 checkpoint: tiny UNet (one level, 320 channels), full-size CLIP-L and VAE, random weights, fp16",
              build=tiny_sd15_checkpoint),
    TinyModel("controlnet", TINY_CONTROLNET,
              "SD1.5 ControlNet (e.g. in place of OpenPose) matching the tiny UNet, random weights, fp16",
              build=tiny_controlnet),
)


def all_tiny_models() -> tuple[TinyModel, ...]:
    """The base models, then each method's files (Parts2Whole, MimicBrush, hands, AnyDressing)."""
    return (BASE_MODELS + parts2whole.TINY_MODELS + mimicbrush.TINY_MODELS + hands.TINY_MODELS
            + anydressing.TINY_MODELS)
