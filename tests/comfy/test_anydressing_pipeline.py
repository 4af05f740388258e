"""pipelines/anydressing/pipeline.py (GarmentsNet) and the dual patch (Dressing-Attention) on tiny SD15 models.

The independent reference for the writer is a second copy of the same UNet whose attn1 weights really are
W + scale * up @ down for one slot and whose cross-attention output projection is zero (cross-attention
removed), run on ONE garment at a time with forward hooks on every norm1: no patch of the code under test.
"""
from __future__ import annotations

import pytest
import torch
from helpers import ksample
from naive import naive_attention_probs

from humanref.attention import reader as reader_mod
from humanref.attention.blocks import walk_transformer_blocks
from humanref.attention.kernels import LinearWeights
from humanref.pipelines.anydressing.pipeline import build_garment_bank, prepare_garments
from humanref.pipelines.anydressing.weights import (
    block_widths_from_unet,
    garment_weights_metadata,
    garment_weights_state_dict,
    parse_garment_weights,
    random_garment_weights,
)
from humanref.pipelines.references import patch as reference_mod
from humanref.pipelines.references.patch import apply_reference_patch
from humanref.pipelines.references.writer import encode_images

SLOTS = ("upper", "lower", "hat")
LATENT = torch.zeros(1, 4, 8, 6)
SIZE = (32, 24)


def garment_images(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, *SIZE, 3, generator=g) for _ in range(count)]


def garments(images, slots):
    return prepare_garments([(i + 1, img, None, s) for i, (img, s) in enumerate(zip(images, slots))], 768)


def make_weights(model, slots=SLOTS, seed=5, own=False, zero_lora=False):
    widths = block_widths_from_unet(model.model.diffusion_model.state_dict())
    own_w = None
    if own:
        sd = model.model.diffusion_model.state_dict()
        own_w = {p: (sd[f"{p}.attn1.to_k.weight"], sd[f"{p}.attn1.to_v.weight"]) for p in widths}
    lora, dressing = random_garment_weights(widths, slots, rank=4, seed=seed, own=own_w)
    if own:  # W' exactly the layer's own weights
        dressing = {p: (LinearWeights(own_w[p][0].clone()), LinearWeights(own_w[p][1].clone())) for p in widths}
    if zero_lora:
        lora = {s: {p: type(lo)(*[(d, torch.zeros_like(u)) for d, u in (lo.q, lo.k, lo.v)])
                    for p, lo in per.items()} for s, per in lora.items()}
    sd = garment_weights_state_dict(lora, dressing)
    return parse_garment_weights(sd, garment_weights_metadata("SD15", slots, 4, alpha=2.0), "test.safetensors")


@pytest.fixture(scope="module")
def weights(tiny_model):
    return make_weights(tiny_model)


def reference_features(unet_config, clip_vae, image, slot_lora, scale):
    """norm1 outputs of every transformer block for one garment on a merged-weights, no-cross-attention copy."""
    from humanref.pipelines.synthetic.base import build_model

    _, vae = clip_vae
    ref = build_model(unet_config, seed=1)
    unet = ref.model.diffusion_model
    blocks = walk_transformer_blocks(unet)
    captured, hooks = {}, []
    with torch.no_grad():
        for b in blocks:
            tb = unet.get_submodule(b.path)
            if slot_lora is not None:
                lo = slot_lora[b.path]
                for lin, (down, up) in zip((tb.attn1.to_q, tb.attn1.to_k, tb.attn1.to_v), (lo.q, lo.k, lo.v)):
                    lin.weight.add_(scale * up.float() @ down.float())
            tb.attn2.to_out[0].weight.zero_()
            tb.attn2.to_out[0].bias.zero_()
            hooks.append(tb.norm1.register_forward_hook(
                lambda mod, args, out, key=b.key: captured.__setitem__(key, out[0].clone())))
        latent = encode_images(vae, ref.model, [image[0]])[0]
        ctx = torch.randn(1, 5, 768)  # anything: cross-attention contributes nothing
        ref.model.apply_model(latent, torch.zeros(1), c_crossattn=ctx)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("with_weights", [False, True], ids=["training-free", "weights"])
def test_features_equal_one_garment_alone_on_merged_weights(tiny_model, tiny_sd15_config, clip_vae, weights,
                                                           with_weights):
    """Per-slot LoRA on its own batch row only, cross-attention removed, t = 0, garments isolated."""
    _, vae = clip_vae
    images = garment_images(3)
    bank = build_garment_bank(tiny_model, vae, garments(images, SLOTS), weights if with_weights else None)
    assert [r.label for r in bank.references] == list(SLOTS)
    assert [r.slot for r in bank.references] == [0, 1, 2]
    assert bank.timing == "once at t=0" and bank.family == "SD15"
    assert (bank.projections is not None) == with_weights
    for i, slot in enumerate(SLOTS):
        expected = reference_features(tiny_sd15_config, clip_vae, images[i],
                                      weights.lora[slot] if with_weights else None, weights.scale)
        assert set(expected) == set(bank.features)
        for key, tokens in expected.items():
            torch.testing.assert_close(bank.features[key][i].tokens, tokens, rtol=1e-4, atol=1e-4)


def test_lora_reaches_only_its_own_row_and_features_do_not_mix(tiny_model, clip_vae, weights):
    _, vae = clip_vae
    a, b, c = garment_images(3, seed=1)
    both = build_garment_bank(tiny_model, vae, garments([a, b], ["upper", "lower"]), weights)
    alone = build_garment_bank(tiny_model, vae, garments([a], ["upper"]), weights)
    three = build_garment_bank(tiny_model, vae, garments([a, b, c], ["upper", "lower", "hat"]), weights)
    other_slot = build_garment_bank(tiny_model, vae, garments([a, b], ["upper", "hat"]), weights)
    last = list(both.features)[-1]
    for key in both.features:
        for bank in (alone, three, other_slot):  # garment a's features never depend on the other garments
            torch.testing.assert_close(bank.features[key][0].tokens, both.features[key][0].tokens,
                                       rtol=1e-4, atol=1e-4)  # batch size changes float32 rounding only
        torch.testing.assert_close(three.features[key][1].tokens, both.features[key][1].tokens, rtol=1e-4, atol=1e-4)
    # b's features do depend on b's own slot LoRA (the last block sees every earlier LoRA'd attention)
    assert (other_slot.features[last][1].tokens - both.features[last][1].tokens).abs().max() > 1e-3


def test_garment_masks_drop_background_tokens(tiny_model, clip_vae):
    _, vae = clip_vae
    img = garment_images(1, seed=2)[0]
    mask = torch.zeros(1, *SIZE)
    mask[:, 0:8, 0:8] = 1.0  # one latent cell: 2x2 tokens after the one-cell dilation
    masked = build_garment_bank(tiny_model, vae, prepare_garments([(1, img, mask, "upper")], 768))
    full = build_garment_bank(tiny_model, vae, prepare_garments([(1, img, None, "upper")], 768))
    assert masked.references[0].masked
    key = next(iter(full.features))
    assert masked.features[key][0].tokens.shape[0] < full.features[key][0].tokens.shape[0]
    assert masked.features[key][0].dropped > 0


@pytest.fixture(scope="module")
def dressing_bank(tiny_model, clip_vae, weights):
    return build_garment_bank(tiny_model, clip_vae[1], garments(garment_images(2, seed=3), ["upper", "lower"]),
                              weights)


def test_lambda_zero_is_exactly_the_unpatched_model(tiny_model, conds, dressing_bank):
    plain = ksample(tiny_model, conds, LATENT)
    regions = torch.ones(2, 32, 24)
    patched = apply_reference_patch(tiny_model, dressing_bank, mode="dual", strength=0.0, regions=regions)
    assert torch.equal(ksample(patched, conds, LATENT), plain)


def test_w_prime_equal_to_w_is_the_training_free_dual(tiny_model, clip_vae, conds):
    """A file whose W' are the layer's own to_k/to_v and whose LoRAs are zero = no file at all."""
    _, vae = clip_vae
    gs = garments(garment_images(2, seed=4), ["upper", "lower"])
    own = make_weights(tiny_model, own=True, zero_lora=True)
    with_file = build_garment_bank(tiny_model, vae, gs, own)
    free = build_garment_bank(tiny_model, vae, gs)
    a = ksample(apply_reference_patch(tiny_model, with_file, mode="dual", strength=0.7), conds, LATENT)
    b = ksample(apply_reference_patch(tiny_model, free, mode="dual", strength=0.7), conds, LATENT)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - ksample(tiny_model, conds, LATENT)).abs().max() > 1e-3


def test_trained_projections_are_used(tiny_model, conds, dressing_bank, clip_vae):
    import dataclasses

    free = dataclasses.replace(dressing_bank, projections=None)
    a = ksample(apply_reference_patch(tiny_model, dressing_bank, mode="dual", strength=0.7), conds, LATENT)
    b = ksample(apply_reference_patch(tiny_model, free, mode="dual", strength=0.7), conds, LATENT)
    assert (a - b).abs().max() > 1e-3


def test_uncond_chunk_never_sees_garments(tiny_model, conds, dressing_bank):
    plain_rec, rec = [], []
    ksample(tiny_model, conds, LATENT, record=plain_rec)
    ksample(apply_reference_patch(tiny_model, dressing_bank, mode="dual", strength=0.7), conds, LATENT, record=rec)
    assert torch.equal(plain_rec[0][1], rec[0][1])  # joint CFG: uncond = epsilon(z, t), no garments
    assert (plain_rec[0][0] - rec[0][0]).abs().max() > 1e-4


def test_region_masks_confine_each_garments_attention(tiny_model, conds, dressing_bank, monkeypatch):
    """Tiny case: upper garment on the top half, lower on the bottom half of the target; the dual attention
    weights of every block put no mass on a garment outside its region, and all of it inside."""
    seen = []
    real = reader_mod.reference_attention

    def recording(q, k, v, heads, cond_or_uncond, layers, attn_fn):
        out = real(q, k, v, heads, cond_or_uncond, layers, attn_fn)
        for layer in layers:
            seen.append((q.detach().clone(), heads, layer.refs, layer.allowed))
        return out

    monkeypatch.setattr(reference_mod, "reference_attention", recording)
    regions = torch.zeros(2, 64, 48)
    regions[0, :32] = 1.0
    regions[1, 32:] = 1.0
    patched = apply_reference_patch(tiny_model, dressing_bank, mode="dual", strength=0.7, regions=regions)
    ksample(patched, conds, LATENT, steps=1, cfg=1.0)
    assert len(seen) == len(walk_transformer_blocks(tiny_model.model.diffusion_model))
    for q, heads, refs, allowed in seen:
        n = q.shape[1]
        h, w = {48: (8, 6), 12: (4, 3)}[n]  # the 8x6 latent's two grids
        assert allowed is not None and allowed.shape == (n, 2)
        owners = torch.repeat_interleave(torch.arange(2), torch.tensor(refs.segments))
        keys = refs.k.expand(q.shape[0], -1, -1)
        probs = naive_attention_probs(q, keys, heads, refs.bias, allowed[:, owners].cpu())  # [B, heads, N, M]
        mass = torch.stack([probs[..., owners == g].sum(-1) for g in range(2)], dim=-1)  # [B, heads, N, 2]
        rows = torch.arange(n) // w
        top, bottom = rows < h // 2, rows >= h // 2
        assert torch.equal(mass[:, :, top, 1], torch.zeros_like(mass[:, :, top, 1]))
        assert torch.equal(mass[:, :, bottom, 0], torch.zeros_like(mass[:, :, bottom, 0]))
        torch.testing.assert_close(mass[:, :, top, 0], torch.ones_like(mass[:, :, top, 0]))
        # without regions the same queries do spread mass over both garments
        free = naive_attention_probs(q, keys, heads, refs.bias)
        assert float(free[..., owners == 1].sum(-1)[:, :, top].min()) > 0


def test_region_and_mode_errors_name_the_input(tiny_model, dressing_bank):
    with pytest.raises(ValueError, match="region_masks has 3 masks but the bank has 2 references"):
        apply_reference_patch(tiny_model, dressing_bank, mode="dual", regions=torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match=r"region_masks item 2 \(lower\) is empty"):
        apply_reference_patch(tiny_model, dressing_bank, mode="dual",
                              regions=torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]))
    with pytest.raises(ValueError, match="region_masks apply to mode 'dual' only"):
        apply_reference_patch(tiny_model, dressing_bank, mode="concat", regions=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="unknown mode 'dressing'"):
        apply_reference_patch(tiny_model, dressing_bank, mode="dressing")


def test_writer_model_is_not_modified(tiny_model, clip_vae, weights):
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    to_before = repr(tiny_model.model_options)
    build_garment_bank(tiny_model, clip_vae[1], garments(garment_images(1), ["upper"]), weights)
    assert repr(tiny_model.model_options) == to_before
    assert all(torch.equal(v, tiny_model.model.state_dict()[k]) for k, v in before.items())


def test_weights_for_other_architecture_or_slot_fail_clearly(tiny_model, tiny_sdxl_model, clip_vae, weights):
    _, vae = clip_vae
    with pytest.raises(ValueError, match=r"slot_1 is slot 'shoes', which garment_weights test.safetensors has no "
                                         r"LoRA for \(its slots: upper, lower, hat\)"):
        build_garment_bank(tiny_model, vae, garments(garment_images(1), ["shoes"]), weights)
    sdxl = tiny_sdxl_model
    with pytest.raises(ValueError, match="garment_weights test.safetensors is for base model SD15, but writer is SDXL"):
        build_garment_bank(sdxl, vae, garments(garment_images(1), ["upper"]), weights)
    sd15_meta_on_sdxl = make_weights(sdxl)  # metadata says SD15, blocks are SDXL's
    with pytest.raises(ValueError, match="does not match writer's transformer blocks"):
        build_garment_bank(tiny_model, vae, garments(garment_images(1), ["upper"]), sd15_meta_on_sdxl)


def _img(h=64, w=48, c=3, b=1):
    return torch.rand(b, h, w, c)


@pytest.mark.parametrize("inputs, message", [
    ([], r"no garments: connect garment_1"),
    ([(1, None, None, "upper")], r"no garments"),
    ([(1, _img(), None, "upper"), (2, _img(), None, "upper")], r"slot_2 is 'upper', the same as slot_1"),
    ([(1, _img(c=4) * torch.tensor([1.0, 1.0, 1.0, 0.0]), None, "upper")], r"garment_1 alpha is empty"),
    ([(1, _img(), None, "upper"), (2, _img(h=72), None, "lower")], r"garment_2 is 48x72 but garment_1 is 48x64"),
    ([(1, _img(b=2), None, "upper")], r"garment_1 must be one IMAGE"),
    ([(1, _img(), None, "  ")], r"slot_1 is empty"),
    ([(1, None, torch.ones(1, 64, 48), "upper")], r"mask_1 is connected but garment_1 is not"),
    ([(1, _img(), torch.zeros(1, 64, 48), "upper")], r"mask_1 is empty"),
])
def test_bad_garment_inputs_name_the_input(inputs, message):
    with pytest.raises(ValueError, match=message):
        prepare_garments(inputs, 768)


def test_training_free_on_an_sdxl_writer_and_reader(tiny_sdxl_model, clip_vae):
    """No cross-attention and no text: the SDXL writer gets a zero ADM vector; the dual patch then runs."""
    sdxl = tiny_sdxl_model
    bank = build_garment_bank(sdxl, clip_vae[1], garments(garment_images(2, seed=6), ["upper", "lower"]))
    assert bank.family == "SDXL" and len(bank.features) == len(walk_transformer_blocks(sdxl.model.diffusion_model))
    g = torch.Generator().manual_seed(0)
    sdxl_conds = tuple([[torch.randn(1, 3, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
                       for _ in range(2))
    plain = ksample(sdxl, sdxl_conds, LATENT, steps=2)
    out = ksample(apply_reference_patch(sdxl, bank, mode="dual", strength=0.7), sdxl_conds, LATENT, steps=2)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_writer_with_extra_input_channels_is_named(tiny_sd15_config, clip_vae):
    """Found by the bad-input sweep: a 13-channel (MimicBrush) UNet as GarmentsNet failed inside its conv_in."""
    from humanref.pipelines.synthetic.base import build_model

    writer = build_model(dict(tiny_sd15_config, in_channels=13), seed=1)
    with pytest.raises(ValueError, match="writer has a 13-channel input but the reference latents have 4 channels"):
        build_garment_bank(writer, clip_vae[1], garments(garment_images(2), SLOTS[:2]))
