"""ComfyUI's own UNet as the loaders meet it: its exact keys and shapes, its prefix in a checkpoint, its family.

Every loader checks a file against what ComfyUI will instantiate, so these come from ComfyUI's module
definitions (built on the meta device: no weights are allocated), never from a list written here. ComfyUI is
imported only inside the functions, so this module loads before ``import_comfy`` has run.
"""
from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."  # the UNet's keys in a single-file (ldm) checkpoint


def unet_shapes(unet_config: dict) -> dict[str, torch.Size]:
    """The exact state-dict keys and shapes of ComfyUI's UNetModel for an ldm ``unet_config``."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in unet.state_dict().items()}


def config_family(model_config: Any) -> str:
    """ComfyUI's family name (SD15, SDXL, ...): the class name of its supported-model config; "" for none."""
    return type(model_config).__name__ if model_config is not None else ""


def model_family(patcher: Any) -> str:
    """The family of a loaded ComfyUI model (a ModelPatcher), as :func:`config_family` names it."""
    return config_family(getattr(patcher.model, "model_config", None))
