"""Issue 14's reference controls in the engine, against naive float64 definitions: AdaIN (A1111/ACN
reference_adain), style fidelity, per-reference weights in every mode, the strength curve over the steps."""
from __future__ import annotations

import pytest
import torch
from naive import naive_adain, naive_attention, proj
from test_reader import HEADS, Block, Ref

from humanref.attention import kernels as K
from humanref.attention import reader as R
from humanref.attention.adain import (
    adain,
    adain_blocks,
    adain_chunks,
    default_adain_blocks,
    feature_stats,
    unet_blocks_named,
)
from humanref.attention.schedules import WeightType, weight_factor

DT = torch.float64
ATOL = 1e-10


def maps(seed, shape=(2, 6, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return 0.7 * torch.randn(*shape, generator=g, dtype=DT) + torch.arange(shape[1], dtype=DT).reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------- AdaIN
@pytest.mark.parametrize("masked", [False, True])
def test_adain_matches_the_written_out_definition(masked):
    x = maps(0)
    refs = [maps(1, (1, 6, 8, 6))[0], maps(2, (1, 6, 4, 4))[0]]  # references of other sizes
    masks = [None, None]
    if masked:
        masks[0] = torch.zeros(8, 6, dtype=DT)
        masks[0][2:6, 1:5] = 1.0
        masks[0][6, 1] = 0.5  # a soft edge weighs half
    weights = [0.8, 1.3]
    stats = [feature_stats(r, m) for r, m in zip(refs, masks)]
    out = adain(x, stats, weights)
    torch.testing.assert_close(out.to(DT), naive_adain(x, refs, masks, weights), rtol=0, atol=1e-5)  # float32 inside


def test_adain_moves_statistics_exactly_and_zero_weight_is_identity():
    x, ref = maps(3), maps(4, (1, 6, 5, 5))[0]
    out = adain(x, [feature_stats(ref)], [1.0])
    var, mean = torch.var_mean(out.to(DT), dim=(2, 3), correction=0)
    rvar, rmean = torch.var_mean(ref, dim=(1, 2), correction=0)
    torch.testing.assert_close(mean, rmean.expand_as(mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(var, rvar.expand_as(var), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adain(x, [feature_stats(ref)], [0.0]), x.to(out.dtype), rtol=0, atol=1e-6)


def test_a_mask_that_selects_nothing_gives_no_statistics():
    assert feature_stats(maps(5)[0], torch.zeros(4, 5)) is None


@pytest.mark.parametrize("fidelity", [0.0, 0.5, 1.0])
def test_adain_style_fidelity_mixes_only_the_uncond_rows(fidelity):
    x, ref = maps(6, (4, 6, 4, 5)), maps(7, (1, 6, 4, 5))[0]
    stats = [feature_stats(ref)]
    full = adain(x, stats, [1.0])
    out = adain_chunks(x, [1, 0], stats, [1.0], fidelity)  # rows 0-1 uncond, 2-3 cond
    torch.testing.assert_close(out[2:], full[2:], rtol=0, atol=0)
    torch.testing.assert_close(out[:2], fidelity * x[:2] + (1 - fidelity) * full[:2], rtol=0, atol=1e-12)


def test_adain_block_sets_are_the_anchors_defaults():
    # ACN: SD1.5 gates input [4,5,7,8,10,11] at 2(1 - w/6), output [0..7] at 2w/8, middle 0; act when < 1.0
    sd15 = [("input", i) for w, i in enumerate([4, 5, 7, 8, 10, 11]) if 2 * (1 - w / 6) < 1.0]
    sd15 += [("middle", 0)] + [("output", i) for w, i in enumerate(range(8)) if 2 * w / 8 < 1.0]
    assert default_adain_blocks("SD15", 12, 12) == tuple(sd15)  # SD1.5: 12 input and 12 output blocks
    sdxl = [("input", i) for w, i in enumerate([4, 5, 7, 8]) if 2 * (1 - w / 4) < 1.0]
    sdxl += [("middle", 0)] + [("output", i) for w, i in enumerate(range(6)) if 2 * w / 6 < 1.0]
    assert default_adain_blocks("SDXL", 9, 9) == tuple(sdxl)
    assert adain_blocks("SD15", "mid+up", 12, 12) == (("middle", 0), ("output", 0), ("output", 1), ("output", 2),
                                                      ("output", 3))
    assert adain_blocks("SD15", "custom", 12, 12, unet_blocks_named("input_10, output_9.1")) == (
        ("input", 10), ("output", 9))
    with pytest.raises(ValueError, match="not like"):
        unet_blocks_named("decoder_1")


def test_adain_default_blocks_never_include_conv_in_on_a_shallow_unet():
    # The anchors' lists start at input 4 (SD1.5) / 4 (SDXL): input 0 (conv_in, the latent itself) is never one.
    # A one-level UNet (2 input blocks): "the last 2 input blocks" would be conv_in and input 1.
    assert default_adain_blocks("SD15", 2, 2) == (("input", 1), ("middle", 0), ("output", 0))
    assert default_adain_blocks("SDXL", 2, 2) == (("input", 1), ("middle", 0), ("output", 0))
    assert default_adain_blocks("SD15", 1, 2) == (("middle", 0), ("output", 0))
    # three levels of one res block (6 input, 6 output blocks): the deepest two input blocks, the first four outputs
    assert default_adain_blocks("SD15", 6, 6) == (("input", 4), ("input", 5), ("middle", 0), ("output", 0),
                                                  ("output", 1), ("output", 2), ("output", 3))
    assert adain_blocks("SD15", "down-only", 2, 2) == (("input", 1),)


# ----------------------------------------------------------------------------------------------- style fidelity
@pytest.mark.parametrize("fidelity", [0.0, 0.3, 1.0])
def test_attention_style_fidelity_is_the_anchors_mix(fidelity):
    layout = [1, 0]
    blk = Block(2 * 2, seed=11)
    ref = Ref(21)
    layer = R.ActivePatch(R.CONCAT, ref.project(blk), style_fidelity=fidelity)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    with_refs, plain = blk.naive([ref.official()]), blk.naive([])
    torch.testing.assert_close(out[2:], with_refs[2:], rtol=0, atol=ATOL)  # cond rows: always the references
    torch.testing.assert_close(out[:2], fidelity * plain[:2] + (1 - fidelity) * with_refs[:2], rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------- per-reference weights
def weighted_parts(refs, weights, dilute=True):
    return [(r.strict(), int((r.w == 0).sum()) if dilute else 0, w) for r, w in zip(refs, weights)]


@pytest.mark.parametrize("weights", [(1.5, 0.5), (0.0, 2.0), (1.0, 1.0)])
def test_concat_weight_per_reference_multiplies_its_attention_mass(weights):
    blk = Block(2, seed=12)
    refs = [Ref(31), Ref(32, m=6)]
    projected = K.project_parts(weighted_parts(refs, weights), blk.to_k, blk.to_v, strength=0.8)
    out = K.joint_attention(blk.q, blk.k, blk.v, HEADS, [projected], K.sdpa)
    expected = []
    for b in range(2):  # the official zero tokens kept, each key's exp() multiplied by strength x its weight
        ctx = torch.cat([blk.x[b]] + [r.official() for r in refs])
        mass = torch.cat([torch.ones(blk.x.shape[1], dtype=DT)]
                         + [torch.full((r.feats.shape[0],), 0.8 * w, dtype=DT) for r, w in zip(refs, weights)])
        expected.append(naive_attention(proj(blk.to_q, blk.x[b])[None], proj(blk.to_k, ctx)[None],
                                        proj(blk.to_v, ctx)[None], HEADS, mass=mass))
    torch.testing.assert_close(out, torch.cat(expected), rtol=0, atol=1e-9)


def test_dual_weight_per_reference_scales_its_share_of_the_separate_term():
    blk = Block(2, seed=13)
    refs = [Ref(33, weights=torch.ones(9, dtype=DT)), Ref(34, m=5, weights=torch.ones(5, dtype=DT))]
    weights = (1.4, 0.3)
    projected = K.project_parts(weighted_parts(refs, weights, dilute=False), blk.to_k, blk.to_v, dilute=False,
                                weight_values=True)
    out = K.dual_term(blk.q, HEADS, projected, K.sdpa)
    feats = torch.cat([r.feats for r in refs])
    value_scale = torch.cat([torch.full((r.feats.shape[0],), w, dtype=DT) for r, w in zip(refs, weights)])
    expected = torch.cat([naive_attention(proj(blk.to_q, blk.x[b])[None], proj(blk.to_k, feats)[None],
                                          (proj(blk.to_v, feats) * value_scale[:, None])[None], HEADS)
                          for b in range(2)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert projected.segments == (9, 5)


# ----------------------------------------------------------------------------------------------- weight over the steps
@pytest.mark.parametrize("kind, values", [
    (WeightType.CONSTANT, [1.0, 1.0, 1.0, 1.0]),
    (WeightType.LINEAR_IN, [0.0, 0.25, 0.5, 1.0]),
    (WeightType.LINEAR_OUT, [1.0, 0.75, 0.5, 0.0]),
    (WeightType.EASE_IN, [0.0, 0.15625, 0.5, 1.0]),  # 3p^2 - 2p^3 at 0, 1/4, 1/2, 1
    (WeightType.EASE_OUT, [1.0, 0.84375, 0.5, 0.0]),
])
def test_weight_curves_by_hand(kind, values):
    assert [weight_factor(kind, p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx(values, abs=1e-12)
    assert weight_factor(kind, -0.5) == weight_factor(kind, 0.0) and weight_factor(kind, 1.5) == weight_factor(kind,
                                                                                                                 1.0)
