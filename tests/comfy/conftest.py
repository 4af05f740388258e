"""The in-process ComfyUI tier: ComfyUI goes on sys.path (CPU mode) when pytest imports this file, so the test
modules import comfy and the pack at their top; without ComfyUI each module is reported skipped with the reason.
Fixtures: tiny SD15 and SDXL models built from comfy.supported_models, real CLIP/VAE."""
from __future__ import annotations

from pathlib import Path

import pytest
from comfyenv import COMFYUI_PATH, bootstrap, mark_tier, skipped_module

bootstrap()


def pytest_pycollect_makemodule(module_path, parent):
    return skipped_module(module_path, parent)


def pytest_collection_modifyitems(items):
    mark_tier(items, Path(__file__).parent, "comfy")


@pytest.fixture(scope="session")
def comfy_env() -> str:
    """The ComfyUI folder (on sys.path since this conftest was imported); a dependency that says "needs comfy"."""
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def clip_vae(comfy_env):
    from humanref.pipelines.synthetic.base import load_test_clip_vae

    return load_test_clip_vae(seed=3)


@pytest.fixture(scope="session")
def tiny_sd15_config() -> dict:
    """The tier's tiny SD15 UNet config (7 transformer blocks at widths 32/64); variants copy it:
    ``dict(tiny_sd15_config, in_channels=9)``."""
    from humanref.pipelines.synthetic.base import sd15_unet_config

    return sd15_unet_config(model_channels=32, channel_mult=(1, 2))


@pytest.fixture(scope="session")
def tiny_model(tiny_sd15_config):
    """A small SD15 ModelPatcher of the tiny config with random weights."""
    from humanref.pipelines.synthetic.base import build_model

    return build_model(tiny_sd15_config, seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl_model(comfy_env):
    """A small SDXL ModelPatcher (random weights): the other model family."""
    from humanref.pipelines.synthetic.base import build_model, sdxl_unet_config

    return build_model(sdxl_unet_config(), seed=2, arch="sdxl")


@pytest.fixture(scope="session")
def conds(clip_vae):
    clip, _ = clip_vae
    c, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a person"), return_pooled=True)
    n, npooled = clip.encode_from_tokens(clip.tokenize("blurry"), return_pooled=True)
    return [[c, {"pooled_output": pooled}]], [[n, {"pooled_output": npooled}]]


@pytest.fixture(scope="session")
def controlnet(tiny_sd15_config):
    """A ControlNet of the tiny UNet's layout (lllyasviel key layout, random weights) as comfy's ControlNet.

    ComfyUI detects a ControlNet's config only for real channel counts, so the 32-channel one is built
    directly from the tiny config; like an SD1.5 ControlNet, its hint is a pixel image.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import torch

    from humanref.pipelines.synthetic.base import controlnet_state_dict

    cfg = tiny_sd15_config
    sd = controlnet_state_dict(cfg, seed=5, dtype=torch.float32)
    cfg = {k: v for k, v in cfg.items()
           if k not in ("transformer_depth_output", "use_temporal_attention", "use_temporal_resblock", "out_channels")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", operations=comfy.ops.disable_weight_init, **cfg)
    control.load_state_dict({k.removeprefix("control_model."): v for k, v in sd.items()})
    return comfy.controlnet.ControlNet(control, load_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def bank(tiny_model, clip_vae):
    """A REFERENCE_BANK of the tiny model, encoded once at t=0 (helpers.make_bank)."""
    from helpers import make_bank

    return make_bank(tiny_model, clip_vae)


@pytest.fixture(scope="module")
def step_bank(tiny_model, clip_vae):
    """The same references as an 'every step' bank (the writer reruns at each sigma)."""
    from helpers import make_bank

    return make_bank(tiny_model, clip_vae, timing="every step")

