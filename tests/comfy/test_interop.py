"""The reference patch next to a ControlNet and an IP-Adapter-style attn2 replace on the same model."""
from __future__ import annotations

import pytest
import torch
from helpers import LATENT, ksample, make_bank

from humanref.pipelines.references.patch import apply_reference_patch


def test_tiny_controlnet_file_loads_through_comfy(comfy_env):
    """The tiny-models ControlNet (control_model.* layout, 320 channels) is detected and loaded by ComfyUI."""
    import comfy.controlnet

    from humanref.pipelines.synthetic.base import controlnet_shapes, tiny_sd15_unet_config
    from humanref.pipelines.synthetic.tiny import tiny_controlnet

    sd = tiny_controlnet()
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


# ----------------------------------------------------------------------------------------------- one graph
def tiny_lora(model, rank: int = 4, seed: int = 21) -> dict:
    """A LoRA (ComfyUI's generic key format) on every attn1/attn2 to_q/to_k/to_v of the model: the reference keys
    and values are projected through the LoRA-patched to_k/to_v."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in model.model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
            name = key[: -len(".weight")]
            out_f, in_f = weight.shape
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            lora[f"{name}.lora_up.weight"] = 0.5 * torch.randn(out_f, rank, generator=g) / rank ** 0.5
    return lora


def with_lora(model, lora):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(lora) // 2  # every LoRA key found its weight
    return patched


def ip_adapter_like(model, calls: list, scale: float = 0.5):
    """An IP-Adapter-style attn2 replace on every transformer block (extra image tokens next to the text)."""
    import comfy.ldm.modules.attention as attention

    from humanref.attention.blocks import walk_transformer_blocks

    extra = torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(3))

    def ip_like(q, k, v, extra_options):
        calls.append(extra_options["block"])
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        ek = extra[..., :q.shape[-1]].expand(q.shape[0], -1, -1).to(q.dtype)
        return out + scale * attention.optimized_attention(q, ek, ek, extra_options["n_heads"])

    patched = model.clone()
    for b in walk_transformer_blocks(patched.model.diffusion_model):
        patched.set_model_attn2_replace(ip_like, b.key[0], b.key[1], b.key[2])
    return patched


@pytest.fixture(scope="module")
def two_banks(tiny_model, clip_vae):
    """A cached bank (masked references) and an 'every step' bank (a writer pass per step)."""
    return make_bank(tiny_model, clip_vae), make_bank(tiny_model, clip_vae, timing="every step", count=1, seed=4)


def test_everything_in_one_graph(tiny_model, clip_vae, conds, controlnet, two_banks):
    """Two chained reference patches (attn1) + an IP-Adapter-style attn2 replace + a LoRA + a ControlNet.

    Every part acts, the node order does not matter (bit-identical), and both reference patches at strength 0
    give exactly the graph without them: our attn1 patches leave the others' work untouched.
    """
    from humanref.attention.blocks import walk_transformer_blocks

    bank_a, bank_b = two_banks
    lora = tiny_lora(tiny_model)
    cn_conds = with_controlnet(conds, controlnet)
    n_blocks = len(walk_transformer_blocks(tiny_model.model.diffusion_model))

    def graph(refs=1.0, ip=True, use_lora=True, control=True, second=True, ours_first=False, calls=None):
        calls = [] if calls is None else calls

        def ours(m):
            if refs is None:
                return m
            m = apply_reference_patch(m, bank_a, mode="concat", strength=refs)
            return apply_reference_patch(m, bank_b, mode="strict", strength=refs) if second else m

        def others(m):
            m = with_lora(m, lora) if use_lora else m
            return ip_adapter_like(m, calls) if ip else m

        model = others(ours(tiny_model)) if ours_first else ours(others(tiny_model))
        return ksample(model, cn_conds if control else conds, LATENT)

    before = ksample(tiny_model, conds, LATENT)
    calls: list = []
    full = graph(calls=calls)
    assert torch.isfinite(full).all()
    assert len({tuple(c) for c in calls}) == len({b.key[:2] for b in walk_transformer_blocks(
        tiny_model.model.diffusion_model)}) and len(calls) >= n_blocks  # the attn2 replace ran on every block
    assert torch.equal(graph(ours_first=True), full)
    for part in ({"refs": None}, {"second": False}, {"ip": False}, {"use_lora": False}, {"control": False}):
        assert (graph(**part) - full).abs().max() > 1e-3, part
    assert torch.equal(graph(refs=0.0), graph(refs=None))
    assert torch.equal(ksample(tiny_model, conds, LATENT), before)  # the base model is untouched
    assert not tiny_model.patches and "attn1" not in tiny_model.model_options.get(
        "transformer_options", {}).get("patches_replace", {})


def test_lora_reaches_the_reference_projection(tiny_model, tiny_sd15_config, clip_vae, conds, two_banks):
    """The reader projects the references through the LoRA-patched to_k/to_v at sampling time: a LoRA on attn1
    loaded by ComfyUI gives the same patched result as a model whose weights were merged by hand (W + up @ down);
    stale, unpatched projection weights would not."""
    from humanref.pipelines.synthetic.base import build_model

    bank_a, _ = two_banks
    lora = {k: v for k, v in tiny_lora(tiny_model).items() if ".attn1.to_k" in k or ".attn1.to_v" in k}
    via_comfy = ksample(apply_reference_patch(with_lora(tiny_model, lora), bank_a), conds, LATENT)
    merged = build_model(tiny_sd15_config, seed=1)  # as tiny_model
    sd = merged.model.state_dict()
    own = tiny_model.model.state_dict()["diffusion_model.out.2.weight"]
    assert torch.equal(sd["diffusion_model.out.2.weight"], own)
    with torch.no_grad():
        for key in {k.rsplit(".lora_", 1)[0] for k in lora}:
            sd[key + ".weight"].add_(lora[key + ".lora_up.weight"] @ lora[key + ".lora_down.weight"])
    by_hand = ksample(apply_reference_patch(merged, bank_a), conds, LATENT)
    torch.testing.assert_close(via_comfy, by_hand, rtol=1e-5, atol=1e-5)
    assert (via_comfy - ksample(apply_reference_patch(tiny_model, bank_a), conds, LATENT)).abs().max() > 1e-3
