"""The reader: CFG gating per chunk and composition of several layers, against naive float64 attention.

Most cases here mask out exactly ONE token per reference: the zero key then carries a bias of log(1) = 0, so the
reader logic is checked at float64 precision independently of how the kernels represent log(count) (that part
is covered by test_kernels). The end-to-end bank test uses arbitrary masks.
"""
from __future__ import annotations

import pytest
import torch
from naive import linear as naive_linear  # noqa: F401
from naive import naive_attention, proj

from humanref.attention import bank as BK
from humanref.attention import kernels as K
from humanref.attention import reader as R

ATOL = 1e-10
DT = torch.float64
HEADS, DIM = 8, 8
C = HEADS * DIM
N_OWN = 5


# ----------------------------------------------------------------------------------------------- naive helpers
def linear(seed, bias=True):
    return naive_linear(seed, bias, C)


class Block:
    """One attn1 with its target hidden states x [B, N, C]."""

    def __init__(self, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = 1.5 * torch.randn(batch, N_OWN, C, generator=g, dtype=DT)
        self.to_q, self.to_k, self.to_v = linear(seed + 1), linear(seed + 2), linear(seed + 3)
        with torch.no_grad():
            self.q, self.k, self.v = self.to_q(self.x), self.to_k(self.x), self.to_v(self.x)

    def plain(self):
        return K.sdpa(self.q, self.k, self.v, HEADS)

    def naive(self, ref_token_sets, rows=None):
        """Naive attention of the given rows with K/V source [own tokens, *ref_token_sets] (official tokens)."""
        rows = range(self.x.shape[0]) if rows is None else rows
        outs = []
        for b in rows:
            ctx = torch.cat([self.x[b]] + list(ref_token_sets), dim=0)
            outs.append(naive_attention(proj(self.to_q, self.x[b])[None], proj(self.to_k, ctx)[None],
                                        proj(self.to_v, ctx)[None], HEADS))
        return torch.cat(outs, dim=0)


class Ref:
    """A reference: features [M, C] and per-token weights with exactly one masked-out token by default."""

    def __init__(self, seed, m=9, weights=None):
        g = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(m, C, generator=g, dtype=DT)
        if weights is None:
            weights = torch.ones(m, dtype=DT)
            weights[2] = 0.0
            weights[4] = 0.4
        self.w = weights

    def official(self):
        """Features times weight, zero tokens kept (Parts2Whole)."""
        return torch.stack([self.feats[i] * self.w[i] for i in range(self.feats.shape[0])])

    def strict(self):
        rows = [self.feats[i] * self.w[i] for i in range(self.feats.shape[0]) if self.w[i] > 0]
        return torch.stack(rows) if rows else torch.zeros(0, C, dtype=DT)

    def project(self, block, dilute=True, to_k=None, to_v=None):
        kept = self.strict()
        dropped = int((self.w == 0).sum())
        with torch.no_grad():
            return K.project_references(kept, dropped, to_k or block.to_k, to_v or block.to_v, dilute=dilute)


LAYOUTS = [[1, 0], [0], [1], [1, 0, 0]]
PER_CHUNK = 2


def _rows(layout, kind):
    return [i * PER_CHUNK + j for i, k in enumerate(layout) if k == kind for j in range(PER_CHUNK)]


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", [None, [1, 0], [0]])
def test_no_layers_is_plain_attention_bit_for_bit(layout):
    blk = Block(4, seed=1)
    calls = []

    def spy(q, k, v, heads):
        calls.append(q.shape[0])
        return K.sdpa(q, k, v, heads)

    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [], spy)
    assert torch.equal(out, blk.plain())
    assert calls == [4]
    torch.testing.assert_close(out, naive_attention(blk.q, blk.k, blk.v, HEADS), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("mode", ["concat", "strict"])
def test_cfg_layouts_cond_gets_references_uncond_is_plain(layout, mode):
    blk = Block(PER_CHUNK * len(layout), seed=2)
    ref = Ref(10)
    layer = R.ActivePatch(R.MODES[mode], ref.project(blk, dilute=(mode == "concat")))
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    assert out.shape == blk.q.shape
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    tokens = ref.official() if mode == "concat" else ref.strict()
    if cond:
        torch.testing.assert_close(out[cond], blk.naive([tokens], cond), rtol=0, atol=ATOL)
        assert (out[cond] - blk.plain()[cond]).abs().max() > 1e-3
    if uncond:
        assert torch.equal(out[uncond], blk.plain()[uncond])


def test_layout_none_counts_as_cond():
    blk = Block(3, seed=3)
    ref = Ref(11)
    layer = R.ActivePatch(R.CONCAT, ref.project(blk))
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, None, [layer], K.sdpa)
    torch.testing.assert_close(out, blk.naive([ref.official()]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", [[1, 0], [1], [1, 0, 0]], ids=str)
def test_uncond_layer_applies_to_uncond_rows(layout):
    blk = Block(PER_CHUNK * len(layout), seed=4)
    ref = Ref(12)
    layer = R.ActivePatch(R.CONCAT, ref.project(blk), style_fidelity=0.0)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    torch.testing.assert_close(out, blk.naive([ref.official()]), rtol=0, atol=ATOL)


def test_mixed_uncond_flags():
    layout = [1, 0, 0]
    blk = Block(PER_CHUNK * len(layout), seed=5)
    both, cond_only = Ref(13), Ref(14, m=7)
    layers = [R.ActivePatch(R.CONCAT, both.project(blk), style_fidelity=0.0),
              R.ActivePatch(R.CONCAT, cond_only.project(blk))]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, layers, K.sdpa)
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    torch.testing.assert_close(out[uncond], blk.naive([both.official()], uncond), rtol=0, atol=ATOL)
    torch.testing.assert_close(out[cond], blk.naive([both.official(), cond_only.official()], cond), rtol=0, atol=ATOL)


def test_two_concat_layers_are_one_joint_attention():
    layout = [1, 0]
    blk = Block(4, seed=6)
    r1, r2 = Ref(15), Ref(16, m=6)
    layers = [R.ActivePatch(R.CONCAT, r1.project(blk)), R.ActivePatch(R.CONCAT, r2.project(blk))]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, layers, K.sdpa)
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    torch.testing.assert_close(out[cond], blk.naive([r1.official(), r2.official()], cond), rtol=0, atol=ATOL)
    assert torch.equal(out[uncond], blk.plain()[uncond])
    # one joint softmax, not the average or sum of two separate ones
    separate = 0.5 * (blk.naive([r1.official()], cond) + blk.naive([r2.official()], cond))
    assert (out[cond] - separate).abs().max() > 1e-4


def test_concat_and_strict_layers_join_one_key_set():
    blk = Block(2, seed=7)
    r1, r2 = Ref(17), Ref(18)
    layers = [R.ActivePatch(R.CONCAT, r1.project(blk)), R.ActivePatch(R.STRICT, r2.project(blk, dilute=False))]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, [0], layers, K.sdpa)
    torch.testing.assert_close(out, blk.naive([r1.official(), r2.strict()]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_blend_alone_is_mimicbrush(ratio):
    layout = [1, 0]
    blk = Block(4, seed=8)
    ref = Ref(19, weights=torch.ones(9, dtype=DT))  # MimicBrush: unmasked reference
    layer = R.ActivePatch(R.BLEND, ref.project(blk), weight=ratio)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    expected = ratio * blk.naive([ref.official()], cond) + (1 - ratio) * blk.naive([], cond)
    torch.testing.assert_close(out[cond], expected, rtol=0, atol=ATOL)
    assert torch.equal(out[uncond], blk.plain()[uncond])


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_concat_plus_blend_follows_documented_rule(ratio):
    """Docstring: concat refs join one key set; a blend layer mixes that joint attention, with its own
    references added, against it by its ratio."""
    blk = Block(2, seed=9)
    rc, rb = Ref(20), Ref(21, m=8)
    layers = [R.ActivePatch(R.BLEND, rb.project(blk), weight=ratio), R.ActivePatch(R.CONCAT, rc.project(blk))]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, [0], layers, K.sdpa)
    joint = blk.naive([rc.official()])
    with_blend = blk.naive([rc.official(), rb.official()])
    torch.testing.assert_close(out, ratio * with_blend + (1 - ratio) * joint, rtol=0, atol=ATOL)


@pytest.mark.parametrize("lam", [0.7, 0.0])
def test_concat_plus_dual(lam):
    blk = Block(2, seed=10)
    rc = Ref(22)
    garments = Ref(23, m=10, weights=torch.ones(10, dtype=DT))
    wk2, wv2 = linear(201), linear(202)
    layers = [
        R.ActivePatch(R.DUAL, garments.project(blk, to_k=wk2, to_v=wv2), weight=lam),
        R.ActivePatch(R.CONCAT, rc.project(blk)),
    ]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, [0], layers, K.sdpa)
    q = proj(blk.to_q, blk.x)
    k2 = proj(wk2, garments.feats)[None].expand(2, -1, -1)
    v2 = proj(wv2, garments.feats)[None].expand(2, -1, -1)
    expected = blk.naive([rc.official()]) + lam * naive_attention(q, k2, v2, HEADS)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_dual_alone_with_cfg():
    layout = [1, 0]
    blk = Block(4, seed=11)
    garments = Ref(24, m=10, weights=torch.ones(10, dtype=DT))
    wk2, wv2 = linear(203), linear(204)
    layer = R.ActivePatch(R.DUAL, garments.project(blk, to_k=wk2, to_v=wv2), weight=0.7)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    q = proj(blk.to_q, blk.x[cond])
    k2 = proj(wk2, garments.feats)[None].expand(len(cond), -1, -1)
    v2 = proj(wv2, garments.feats)[None].expand(len(cond), -1, -1)
    expected = blk.naive([], cond) + 0.7 * naive_attention(q, k2, v2, HEADS)
    torch.testing.assert_close(out[cond], expected, rtol=0, atol=ATOL)
    assert torch.equal(out[uncond], blk.plain()[uncond])


def test_strict_everything_masked_gives_plain_attention_bit_for_bit():
    blk = Block(4, seed=12)
    ref = Ref(25, weights=torch.zeros(9, dtype=DT))
    refs = ref.project(blk, dilute=False)
    assert refs is None  # nothing to attend: the host builds no layer
    layers = [] if refs is None else [R.ActivePatch(R.STRICT, refs)]
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, [1, 0], layers, K.sdpa)
    assert torch.equal(out, blk.plain())


@pytest.mark.parametrize("layout", [[1, 0], [1]], ids=str)
def test_unknown_mode_raises(layout):
    blk = Block(2, seed=13)
    with pytest.raises(ValueError, match=r"unknown mode 'add'.*concat.*strict.*blend.*dual"):
        layer = R.ActivePatch(R.mode_named("add"), Ref(26).project(blk))
        R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)


def test_indivisible_batch_raises():
    blk = Block(3, seed=14)
    layer = R.ActivePatch(R.CONCAT, Ref(27).project(blk))
    with pytest.raises(ValueError, match="cannot be split into 2 CFG chunks"):
        R.reference_attention(blk.q, blk.k, blk.v, HEADS, [1, 0], [layer], K.sdpa)


def test_end_to_end_bank_masks_to_reader():
    """Pixel masks -> MaskProjector (area rule) -> select_tokens -> merge -> project -> reader, against the
    official semantics: features times the block-mean mask weight, zero tokens kept in K/V."""
    grid = (3, 4)
    blk = Block(4, seed=15)
    g = torch.Generator().manual_seed(16)
    masks = [torch.zeros(6, 8), None, torch.zeros(6, 8)]
    masks[0][0:4, 0:4] = 1.0
    masks[0][4:6, 6:8] = 0.5
    masks[2][2:4, 2:8] = 0.25
    feats = [torch.randn(grid[0] * grid[1], C, generator=g, dtype=DT) for _ in masks]
    projector = BK.MaskProjector(masks, "area")
    captured = [BK.select_tokens(f, projector.weights(i, grid)) for i, f in enumerate(feats)]
    merged = BK.merge_captured(captured)
    with torch.no_grad():
        refs = K.project_references(merged.tokens, merged.dropped, blk.to_k, blk.to_v)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, [1, 0], [R.ActivePatch(R.CONCAT, refs)], K.sdpa)

    official = []
    for mask, f in zip(masks, feats):
        for i in range(grid[0]):
            for j in range(grid[1]):
                if mask is None:
                    weight = 1.0
                else:  # 2x2 pixel block per token
                    weight = float(mask[2 * i: 2 * i + 2, 2 * j: 2 * j + 2].sum()) / 4.0
                official.append(f[i * grid[1] + j] * weight)
    official = torch.stack(official)
    assert merged.dropped > 1
    torch.testing.assert_close(out[2:], blk.naive([official], [2, 3]), rtol=0, atol=ATOL)
    assert torch.equal(out[:2], blk.plain()[:2])


# --------------------------------------------------------------------------------- dual with region patterns
def test_dual_with_regions_confines_each_garment_and_gates_cfg():
    layout = [1, 0]
    blk = Block(4, seed=13)
    g1 = Ref(25, m=6, weights=torch.ones(6, dtype=DT))
    g2 = Ref(26, m=4, weights=torch.ones(4, dtype=DT))
    wk2, wv2 = linear(205), linear(206)
    with torch.no_grad():
        refs = K.project_references(torch.cat([g1.feats, g2.feats]), 0, wk2, wv2)
    refs = K.ProjectedReferences(refs.k, refs.v, refs.bias, (6, 4))
    allowed = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)  # N_OWN = 5 queries
    layer = R.ActivePatch(R.DUAL, refs, weight=0.7, allowed=allowed)
    out = R.reference_attention(blk.q, blk.k, blk.v, HEADS, layout, [layer], K.sdpa)
    cond, uncond = _rows(layout, 0), _rows(layout, 1)
    q = proj(blk.to_q, blk.x[cond])
    expected = blk.naive([], cond)
    for i in range(N_OWN):
        sets = [g.feats for g, ok in zip((g1, g2), allowed[i]) if ok]
        if not sets:
            continue
        f = torch.cat(sets)
        k2 = proj(wk2, f)[None].expand(len(cond), -1, -1)
        v2 = proj(wv2, f)[None].expand(len(cond), -1, -1)
        expected[:, i:i + 1] += 0.7 * naive_attention(q[:, i:i + 1], k2, v2, HEADS)
    torch.testing.assert_close(out[cond], expected, rtol=0, atol=ATOL)
    assert torch.equal(out[uncond], blk.plain()[uncond])  # joint CFG: the uncond chunk sees no garments


def test_regions_on_a_non_dual_layer_raise():
    blk = Block(2, seed=14)
    refs = Ref(27).project(blk)
    layer = R.ActivePatch(R.CONCAT, refs, allowed=torch.ones(N_OWN, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="dual mode only"):
        R.reference_attention(blk.q, blk.k, blk.v, HEADS, [0], [layer], K.sdpa)


def test_mode_table():
    """The six modes as the patch node documents them (the names are saved in workflows)."""
    assert list(R.MODES) == ["concat", "strict", "blend", "dual", "adain", "adain+attn"]
    assert [(m.joins_own_keys, m.dilutes, m.strength_is, m.attends, m.adain) for m in R.MODES.values()] == [
        (True, True, R.Strength.MASS, True, False), (True, False, R.Strength.MASS, True, False),
        (True, True, R.Strength.RATIO, True, False), (False, False, R.Strength.LAMBDA, True, False),
        (True, True, R.Strength.MASS, False, True), (True, True, R.Strength.MASS, True, True)]
    assert [m.name for m in R.MODES.values() if m.takes_regions] == ["dual"]
    assert R.mode_named("blend") is R.BLEND
