"""Fixtures of the in-process ComfyUI tier: tiny SD15 models built from comfy.supported_models, real CLIP/VAE."""
from __future__ import annotations

import pytest

from comfyenv import comfy_available, require_comfy


@pytest.fixture(scope="session")
def comfy_env():
    if not comfy_available():
        pytest.skip("ComfyUI not available")
    return require_comfy()


@pytest.fixture(scope="session")
def clip_vae(comfy_env):
    from humanref.pipelines.synthetic.base import load_test_clip_vae

    return load_test_clip_vae(seed=3)


@pytest.fixture(scope="session")
def tiny_model(comfy_env):
    """A small SD15 ModelPatcher (7 transformer blocks at widths 32/64) with random weights."""
    from humanref.pipelines.synthetic.base import build_model, sd15_unet_config

    return build_model(sd15_unet_config(model_channels=32, channel_mult=(1, 2)), seed=1)


@pytest.fixture(scope="session")
def conds(clip_vae):
    clip, _ = clip_vae
    c, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a person"), return_pooled=True)
    n, npooled = clip.encode_from_tokens(clip.tokenize("blurry"), return_pooled=True)
    return [[c, {"pooled_output": pooled}]], [[n, {"pooled_output": npooled}]]


@pytest.fixture(scope="session")
def controlnet(comfy_env):
    """A ControlNet of the tiny UNet's layout (lllyasviel key layout, random weights) as comfy's ControlNet.

    ComfyUI detects a ControlNet's config only for real channel counts, so the 32-channel one is built
    directly from the tiny config; like an SD1.5 ControlNet, its hint is a pixel image.
    """
    import torch

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from humanref.pipelines.synthetic.base import controlnet_state_dict, sd15_unet_config

    cfg = sd15_unet_config(model_channels=32, channel_mult=(1, 2))
    sd = controlnet_state_dict(cfg, seed=5, dtype=torch.float32)
    cfg = {k: v for k, v in cfg.items()
           if k not in ("transformer_depth_output", "use_temporal_attention", "use_temporal_resblock", "out_channels")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", operations=comfy.ops.disable_weight_init, **cfg)
    control.load_state_dict({k.removeprefix("control_model."): v for k, v in sd.items()})
    return comfy.controlnet.ControlNet(control, load_device=torch.device("cpu"))
