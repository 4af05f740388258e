"""The reference patch next to a ControlNet and an IP-Adapter-style attn2 replace on the same model."""
from __future__ import annotations

import pytest
import torch

from comfyenv import require_comfy

require_comfy()

from helpers import ksample  # noqa: E402
from test_reference import LATENT, make_bank  # noqa: E402
from humanref.pipelines.reference import apply_reference_patch  # noqa: E402


def test_tiny_controlnet_file_loads_through_comfy(comfy_env):
    """The tiny-models ControlNet (control_model.* layout, 320 channels) is detected and loaded by ComfyUI."""
    import comfy.controlnet
    from humanref.cli.tiny_models import _controlnet, tiny_sd15_unet_config
    from humanref.pipelines.synthetic import controlnet_shapes

    sd = _controlnet()
    control = comfy.controlnet.load_controlnet_state_dict(sd)
    assert isinstance(control, comfy.controlnet.ControlNet)
    loaded = control.control_model.state_dict()
    assert set(loaded) == set(controlnet_shapes(tiny_sd15_unet_config()))
    for k, v in loaded.items():
        assert torch.equal(v.float(), sd[f"control_model.{k}"].float()), k


def with_controlnet(conds, controlnet):
    import nodes

    hint = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(1))
    return nodes.ControlNetApplyAdvanced().apply_controlnet(conds[0], conds[1], controlnet, hint, 1.0, 0.0, 1.0)


def test_reference_patch_with_controlnet(tiny_model, clip_vae, conds, controlnet):
    bank = make_bank(tiny_model, clip_vae)
    patched = apply_reference_patch(tiny_model, bank)
    cn_conds = with_controlnet(conds, controlnet)
    both = ksample(patched, cn_conds, LATENT)
    assert torch.isfinite(both).all()
    assert (both - ksample(tiny_model, cn_conds, LATENT)).abs().max() > 1e-3  # the references act
    assert (both - ksample(patched, conds, LATENT)).abs().max() > 1e-3  # the ControlNet acts


def test_reference_patch_with_ip_adapter_style_attn2_replace(tiny_model, clip_vae, conds):
    import comfy.ldm.modules.attention as attention
    from humanref.attention.blocks import walk_transformer_blocks

    calls = []
    extra = torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(3))

    def ip_like(q, k, v, extra_options):  # cross-attention plus an extra image-token term, as IP-Adapter does
        calls.append(extra_options["block"])
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        c = q.shape[-1]
        ek = extra[..., :c].expand(q.shape[0], -1, -1).to(q.dtype)
        return out + 0.5 * attention.optimized_attention(q, ek, ek, extra_options["n_heads"])

    ip = tiny_model.clone()
    for b in walk_transformer_blocks(ip.model.diffusion_model):
        ip.set_model_attn2_replace(ip_like, b.key[0], b.key[1], b.key[2])
    bank = make_bank(tiny_model, clip_vae)
    both = ksample(apply_reference_patch(ip, bank), conds, LATENT)
    assert calls, "the attn2 replace must still run under the reference patch"
    assert (both - ksample(ip, conds, LATENT)).abs().max() > 1e-3
    assert (both - ksample(apply_reference_patch(tiny_model, bank), conds, LATENT)).abs().max() > 1e-3
