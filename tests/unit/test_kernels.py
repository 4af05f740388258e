"""Injection kernels against naive float64 references written out here.

The reference semantics are the OFFICIAL ones (methods.md 1.3, 2.4, 3.1): Parts2Whole multiplies the reference
features by the per-token mask weight and keeps every zeroed token in the K/V sequence (key = W_k.0 (+ b_k),
value = W_v.0 (+ b_v)); the naive references below build exactly that sequence, token by token, and never call
the engine to get an expected value.
"""
from __future__ import annotations

import math

import pytest
import torch
from naive import linear as naive_linear  # noqa: F401
from naive import naive_attention, proj

from humanref.attention import kernels as K
from humanref.attention import reader as R

ATOL = 1e-10  # float64 everywhere: the equivalences are exact up to rounding
DT = torch.float64
HEADS, DIM = 8, 40  # SD1.5: 8 heads of 40 at the 320-wide level
C = HEADS * DIM


# ----------------------------------------------------------------------------------------------- naive helpers
def naive_attn_fn(q, k, v, heads):
    return naive_attention(q, k, v, heads)


def linear(seed, bias, c=C):
    return naive_linear(seed, bias, c)


def make_weights(kind, n, g):
    """Per-token mask weights of one reference."""
    if kind == "none":  # no token masked
        return torch.ones(n, dtype=DT)
    if kind == "all":  # every token masked out
        return torch.zeros(n, dtype=DT)
    if kind == "binary":
        w = (torch.rand(n, generator=g, dtype=DT) < 0.4).to(DT)
        w[0], w[1] = 1.0, 0.0  # at least one kept and one dropped
        return w
    if kind == "soft":
        w = torch.rand(n, generator=g, dtype=DT)
        w[torch.rand(n, generator=g, dtype=DT) < 0.3] = 0.0
        w[0], w[1], w[2] = 0.0, 1.0, 0.37  # a dropped, a full and a fractional token at least
        return w
    raise AssertionError(kind)


def naive_kept(features, weights):
    """Kept tokens scaled by their weight, and the count of dropped ones, with an explicit loop."""
    rows = [features[i] * weights[i] for i in range(features.shape[0]) if weights[i] > 0]
    kept = torch.stack(rows) if rows else features.new_zeros(0, features.shape[1])
    return kept, sum(1 for i in range(features.shape[0]) if weights[i] == 0)


class Case:
    """Target hidden states x [B, N, C], the block's to_q/to_k/to_v, and references with masks."""

    def __init__(self, kinds, batch=2, n_own=6, n_ref=12, bias=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = 1.5 * torch.randn(batch, n_own, C, generator=g, dtype=DT)
        self.to_q, self.to_k, self.to_v = linear(seed + 1, bias), linear(seed + 2, bias), linear(seed + 3, bias)
        self.feats = [torch.randn(n_ref + i, C, generator=g, dtype=DT) for i in range(len(kinds))]
        self.weights = [make_weights(kind, f.shape[0], g) for kind, f in zip(kinds, self.feats)]
        with torch.no_grad():
            self.q, self.k, self.v = self.to_q(self.x), self.to_k(self.x), self.to_v(self.x)

    # official: every reference token kept, multiplied by its weight (zeros stay in the sequence)
    def official_ref_tokens(self, strict=False):
        rows = []
        for f, w in zip(self.feats, self.weights):
            for i in range(f.shape[0]):
                if strict and w[i] == 0:
                    continue
                rows.append(f[i] * w[i])
        return torch.stack(rows) if rows else torch.zeros(0, C, dtype=DT)

    def naive_concat(self, strict=False, strength=1.0):
        refs = self.official_ref_tokens(strict)
        outs = []
        for b in range(self.x.shape[0]):
            ctx = torch.cat([self.x[b], refs], dim=0)  # K/V source = [own tokens, reference tokens]
            q = proj(self.to_q, self.x[b])
            kk, vv = proj(self.to_k, ctx), proj(self.to_v, ctx)
            mass = torch.cat([torch.ones(self.x.shape[1], dtype=DT), torch.full((refs.shape[0],), strength, dtype=DT)])
            outs.append(naive_attention(q[None], kk[None], vv[None], HEADS, mass=mass))
        return torch.cat(outs, dim=0)

    def naive_plain(self):
        return naive_attention(proj(self.to_q, self.x), proj(self.to_k, self.x), proj(self.to_v, self.x), HEADS)

    def merged_kept(self):
        kept, dropped = [], 0
        for f, w in zip(self.feats, self.weights):
            t, d = naive_kept(f, w)
            kept.append(t)
            dropped += d
        return torch.cat(kept, dim=0), dropped

    def project(self, strength=1.0, dilute=True, merged=True):
        with torch.no_grad():
            if merged:
                tokens, dropped = self.merged_kept()
                r = K.project_references(tokens, dropped, self.to_k, self.to_v, strength=strength, dilute=dilute)
                return [] if r is None else [r]
            out = []
            for f, w in zip(self.feats, self.weights):
                tokens, dropped = naive_kept(f, w)
                r = K.project_references(tokens, dropped, self.to_k, self.to_v, strength=strength, dilute=dilute)
                if r is not None:
                    out.append(r)
            return out


# --------------------------------------------------------------------------------------------------------- sdpa
@pytest.mark.parametrize("heads,dim", [(1, 8), (2, 4), (8, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_matches_naive_per_head_softmax(heads, dim, with_bias):
    g = torch.Generator().manual_seed(heads * 10 + dim)
    c = heads * dim
    q = 2 * torch.randn(2, 5, c, generator=g, dtype=DT)
    k = 2 * torch.randn(2, 7, c, generator=g, dtype=DT)
    v = torch.randn(2, 7, c, generator=g, dtype=DT)
    bias = None
    if with_bias:
        bias = 3 * torch.randn(7, generator=g, dtype=DT)
        bias[3] = -40.0  # a key that is practically switched off
    out = K.sdpa(q, k, v, heads, bias)
    assert out.shape == (2, 5, c) and out.dtype == DT
    torch.testing.assert_close(out, naive_attention(q, k, v, heads, logit_bias=bias), rtol=0, atol=ATOL)


def test_sdpa_bias_changes_the_result():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 16, generator=g, dtype=DT) for _ in range(3))
    bias = torch.tensor([0.0, 2.0, 0.0, -1.0], dtype=DT)
    assert (K.sdpa(q, k, v, 2, bias) - K.sdpa(q, k, v, 2)).abs().max() > 1e-3


def test_sdpa_without_bias_is_plain_attention():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 24, generator=g, dtype=DT) for _ in range(3))
    torch.testing.assert_close(K.sdpa(q, k, v, 3), naive_attention(q, k, v, 3), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------- concat (dilute): the proof
KIND_SETS = [
    ("binary",),
    ("soft",),
    ("binary", "soft", "binary"),  # several references, each with its own mask
    ("soft", "all"),  # one reference with every token masked out
    ("all",),
    ("all", "all"),
    ("none",),  # no token masked: no zero key at all
    ("none", "binary"),
]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("proj_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "per-ref"])
def test_concat_equals_official_zero_token_semantics(kinds, proj_bias, merged):
    case = Case(kinds, batch=2, bias=proj_bias, seed=len(kinds) + 7 * proj_bias)
    refs = case.project(dilute=True, merged=merged)
    out = K.joint_attention(case.q, case.k, case.v, HEADS, refs, K.sdpa)
    torch.testing.assert_close(out, case.naive_concat(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attn_fn", [K.sdpa, naive_attn_fn], ids=["sdpa", "naive_attn"])
def test_concat_batch_and_attn_fn(batch, attn_fn):
    case = Case(("binary", "soft"), batch=batch, bias=True, seed=11)
    out = K.joint_attention(case.q, case.k, case.v, HEADS, case.project(), attn_fn)
    assert out.shape == (batch, case.x.shape[1], C)
    torch.testing.assert_close(out, case.naive_concat(), rtol=0, atol=ATOL)


def test_concat_no_mask_uses_attn_fn_on_plain_concatenation():
    case = Case(("none", "none"), batch=2, seed=12)
    calls = []

    def spy(q, k, v, heads):
        calls.append(k.shape[1])
        return naive_attention(q, k, v, heads)

    out = K.joint_attention(case.q, case.k, case.v, HEADS, case.project(), spy)
    assert calls == [case.x.shape[1] + sum(f.shape[0] for f in case.feats)]
    torch.testing.assert_close(out, case.naive_concat(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("proj_bias", [False, True], ids=["nobias", "bias"])
def test_concat_dilution_is_observable(proj_bias):
    """The test data discriminates: keeping the zero tokens differs clearly from dropping them."""
    case = Case(("binary", "all"), bias=proj_bias, seed=13)
    assert (case.naive_concat() - case.naive_concat(strict=True)).abs().max() > 1e-3


def test_project_references_single_zero_key_layout():
    case = Case(("binary", "all"), bias=True, seed=14)
    tokens, dropped = case.merged_kept()
    r = K.project_references(tokens, dropped, case.to_k, case.to_v)
    assert dropped > 1 and r.length == tokens.shape[0] + 1  # kept tokens plus ONE zero token
    assert r.k.shape == (1, tokens.shape[0] + 1, C) and r.v.shape == r.k.shape
    # the zero token projects to the projection bias
    torch.testing.assert_close(r.k[0, -1], case.to_k.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(r.v[0, -1], case.to_v.bias.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("strength,dropped", [(1.0, 7), (0.5, 0), (0.5, 7), (3.7, 1000)])
def test_reference_bias_is_exact_log_mass(strength, dropped):
    """bias = log(strength) per kept token, log(strength) + log(dropped) on the single zero key, at the
    precision of the keys (float64 here): this is what makes the single-zero-key trick exact."""
    lin_k, lin_v = linear(61, False, c=8), linear(62, False, c=8)
    tokens = torch.randn(3, 8, generator=torch.Generator().manual_seed(63), dtype=DT)
    r = K.project_references(tokens, dropped, lin_k, lin_v, strength=strength)
    expected = [math.log(strength)] * 3 + ([math.log(strength) + math.log(dropped)] if dropped else [])
    assert r.bias is not None and r.length == len(expected)
    torch.testing.assert_close(r.bias.to(DT), torch.tensor(expected, dtype=DT), rtol=0, atol=1e-12)


def test_project_references_no_dropped_no_bias():
    case = Case(("none",), seed=15)
    tokens, dropped = case.merged_kept()
    r = K.project_references(tokens, dropped, case.to_k, case.to_v)
    assert dropped == 0 and r.length == tokens.shape[0] and r.bias is None


# ------------------------------------------------------------------------------------------------------ strict
@pytest.mark.parametrize("kinds", [("binary",), ("soft",), ("binary", "all", "soft"), ("none",)],
                         ids=lambda k: "+".join(k))
@pytest.mark.parametrize("proj_bias", [False, True], ids=["nobias", "bias"])
def test_strict_excludes_masked_tokens(kinds, proj_bias):
    case = Case(kinds, bias=proj_bias, seed=21)
    refs = case.project(dilute=False)
    out = K.joint_attention(case.q, case.k, case.v, HEADS, refs, K.sdpa)
    torch.testing.assert_close(out, case.naive_concat(strict=True), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kinds", [("all",), ("all", "all")], ids=lambda k: "+".join(k))
def test_strict_everything_masked_is_plain_attention_bit_for_bit(kinds):
    case = Case(kinds, bias=True, seed=22)
    tokens, dropped = case.merged_kept()
    assert tokens.shape[0] == 0 and dropped > 0
    assert K.project_references(tokens, dropped, case.to_k, case.to_v, dilute=False) is None
    refs = case.project(dilute=False, merged=False)
    assert refs == []
    plain = K.sdpa(case.q, case.k, case.v, HEADS)
    assert torch.equal(K.joint_attention(case.q, case.k, case.v, HEADS, refs, K.sdpa), plain)
    torch.testing.assert_close(plain, case.naive_plain(), rtol=0, atol=ATOL)


def test_dilute_everything_masked_still_dilutes():
    """Concat semantics with every reference token masked: the zero tokens still take softmax mass."""
    case = Case(("all",), bias=False, seed=23)
    refs = case.project(dilute=True)
    assert len(refs) == 1 and refs[0].length == 1
    out = K.joint_attention(case.q, case.k, case.v, HEADS, refs, K.sdpa)
    expected = case.naive_concat()
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (expected - case.naive_plain()).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- strength
@pytest.mark.parametrize("strength", [0.5, 2.0, 3.7])
@pytest.mark.parametrize("dilute", [True, False], ids=["dilute", "strict"])
@pytest.mark.parametrize("kinds", [("binary", "soft"), ("none",)], ids=lambda k: "+".join(k))
def test_strength_multiplies_reference_attention_mass(strength, dilute, kinds):
    case = Case(kinds, bias=True, seed=31)
    refs = case.project(strength=strength, dilute=dilute)
    out = K.joint_attention(case.q, case.k, case.v, HEADS, refs, K.sdpa)
    expected = case.naive_concat(strict=not dilute, strength=strength)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (expected - case.naive_concat(strict=not dilute)).abs().max() > 1e-4


@pytest.mark.parametrize("strength", [0.0, -1.0])
def test_strength_zero_gives_no_references(strength):
    case = Case(("binary",), seed=32)
    tokens, dropped = case.merged_kept()
    assert K.project_references(tokens, dropped, case.to_k, case.to_v, strength=strength) is None
    assert K.project_references(tokens, dropped, case.to_k, case.to_v, strength=strength, dilute=False) is None


# ------------------------------------------------------------------------------------------------------- blend
@pytest.mark.parametrize("ratio", [0.5, 0.3])
@pytest.mark.parametrize("kinds", [("none",), ("binary",)], ids=lambda k: "+".join(k))
def test_blend_matches_mimicbrush_formula(ratio, kinds):
    case = Case(kinds, bias=False, seed=41)
    (refs,) = case.project(dilute=True)
    out = K.blend_attention(case.q, case.k, case.v, HEADS, refs, ratio, K.sdpa)
    expected = ratio * case.naive_concat() + (1 - ratio) * case.naive_plain()
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_blend_ratio_one_is_concat_and_zero_is_plain():
    case = Case(("soft",), bias=True, seed=42)
    (refs,) = case.project(dilute=True)
    one = K.blend_attention(case.q, case.k, case.v, HEADS, refs, 1.0, K.sdpa)
    zero = K.blend_attention(case.q, case.k, case.v, HEADS, refs, 0.0, K.sdpa)
    torch.testing.assert_close(one, case.naive_concat(), rtol=0, atol=ATOL)
    torch.testing.assert_close(zero, case.naive_plain(), rtol=0, atol=ATOL)


# -------------------------------------------------------------------------------------------------------- dual
def dual_attention(case, refs, lam):
    """The reader's dual mode on one group of rows: Attn(x, x) + lambda * the dual term."""
    return R.compose(case.q, case.k, case.v, HEADS, [R.ActivePatch(R.DUAL, refs, weight=lam)], K.sdpa)


def naive_dual(case, garments, wk2, wv2, lam):
    plain = case.naive_plain()
    q = proj(case.to_q, case.x)
    b = q.shape[0]
    k2 = proj(wk2, garments)[None].expand(b, -1, -1)
    v2 = proj(wv2, garments)[None].expand(b, -1, -1)
    return plain + lam * naive_attention(q, k2, v2, HEADS)


@pytest.mark.parametrize("proj_bias", [False, True], ids=["nobias", "bias"])
def test_dual_matches_anydressing_formula(proj_bias):
    case = Case(("none", "none"), bias=False, seed=51)
    garments = torch.cat(case.feats, dim=0)  # F_all: garments concatenated along tokens
    wk2, wv2 = linear(101, proj_bias), linear(102, proj_bias)  # W' != W
    with torch.no_grad():
        refs = K.project_references(garments, 0, wk2, wv2)
    out = dual_attention(case, refs, 0.7)
    expected = naive_dual(case, garments, wk2, wv2, 0.7)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    # the separate projections matter: the same formula with W instead of W' is different
    assert (expected - naive_dual(case, garments, case.to_k, case.to_v, 0.7)).abs().max() > 1e-3


def test_dual_lambda_zero_is_plain_attention():
    case = Case(("none",), seed=52)
    garments = case.feats[0]
    wk2, wv2 = linear(103, False), linear(104, False)
    with torch.no_grad():
        refs = K.project_references(garments, 0, wk2, wv2)
    out = dual_attention(case, refs, 0.0)
    assert torch.equal(out, K.sdpa(case.q, case.k, case.v, HEADS))
    torch.testing.assert_close(out, case.naive_plain(), rtol=0, atol=ATOL)


def test_dual_term_with_strength():
    case = Case(("none",), seed=53)
    garments = case.feats[0]
    wk2, wv2 = linear(105, True), linear(106, True)
    with torch.no_grad():
        refs = K.project_references(garments, 0, wk2, wv2, strength=2.0)
    out = K.dual_term(case.q, HEADS, refs, K.sdpa)
    q = proj(case.to_q, case.x)
    b = q.shape[0]
    # a uniform strength on every key of a separate attention cancels in the softmax
    expected = naive_attention(q, proj(wk2, garments)[None].expand(b, -1, -1),
                               proj(wv2, garments)[None].expand(b, -1, -1), HEADS)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------ dual with per-garment region masks
def naive_region_dual(q, garments, wk2, wv2, allowed):
    """Per query, per head: softmax over the keys of the garments this query may see; 0 when it sees none.

    ``garments``: list of token tensors [M_g, C]; ``allowed`` [Nq, G] bool. Written out query by query.
    """
    b, nq, c = q.shape
    d = c // HEADS
    keys = [proj(wk2, g) for g in garments]
    values = [proj(wv2, g) for g in garments]
    out = torch.zeros(b, nq, c, dtype=DT)
    for bi in range(b):
        for i in range(nq):
            ks = [keys[g] for g in range(len(garments)) if allowed[i, g]]
            vs = [values[g] for g in range(len(garments)) if allowed[i, g]]
            if not ks or sum(k.shape[0] for k in ks) == 0:
                continue
            kk, vv = torch.cat(ks), torch.cat(vs)
            for h in range(HEADS):
                cols = slice(h * d, (h + 1) * d)
                logits = (kk[:, cols] @ q[bi, i, cols].to(DT)) / math.sqrt(d)
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                out[bi, i, cols] = p @ vv[:, cols]
    return out


def region_case(seed, sizes=(5, 7, 4), n_q=6, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, C, generator=g, dtype=DT)
    garments = [torch.randn(m, C, generator=g, dtype=DT) for m in sizes]
    wk2, wv2 = linear(seed + 1, True), linear(seed + 2, True)
    with torch.no_grad():
        refs = K.project_references(torch.cat(garments), 0, wk2, wv2)
    refs = K.ProjectedReferences(refs.k, refs.v, refs.bias, tuple(sizes))
    return q, garments, wk2, wv2, refs


ALLOWED = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)


def test_region_dual_term_matches_naive_per_query_softmax():
    q, garments, wk2, wv2, refs = region_case(61)
    out = K.region_dual_term(q, HEADS, refs, ALLOWED, K.sdpa)
    torch.testing.assert_close(out, naive_region_dual(q, garments, wk2, wv2, ALLOWED), rtol=0, atol=ATOL)
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))  # a query in no region sees no garment


def test_region_dual_term_all_allowed_is_the_plain_dual_term_bit_for_bit():
    q, garments, wk2, wv2, refs = region_case(62)
    allowed = torch.ones(q.shape[1], 3, dtype=torch.bool)
    assert torch.equal(K.region_dual_term(q, HEADS, refs, allowed, K.sdpa),
                       K.dual_term(q, HEADS, refs, K.sdpa))
    assert torch.equal(K.region_dual_term(q, HEADS, refs, None, K.sdpa),
                       K.dual_term(q, HEADS, refs, K.sdpa))


def test_region_dual_term_uses_attn_fn_and_keeps_the_bias():
    q, garments, wk2, wv2, refs = region_case(63)
    bias = torch.linspace(-1.0, 1.0, refs.length, dtype=DT)
    biased = K.ProjectedReferences(refs.k, refs.v, bias, refs.segments)
    out = K.region_dual_term(q, HEADS, biased, ALLOWED, naive_attn_fn)
    # expected: the same per-query softmax with each key's mass multiplied by exp(bias)
    b = q.shape[0]
    expected = torch.zeros_like(q)
    owners = torch.repeat_interleave(torch.arange(3), torch.tensor(refs.segments))
    for i in range(q.shape[1]):
        keys = [j for j in range(refs.length) if ALLOWED[i, owners[j]]]
        if not keys:
            continue
        idx = torch.tensor(keys)
        expected[:, i:i + 1] = naive_attention(q[:, i:i + 1], refs.k[:, idx].expand(b, -1, -1),
                                               refs.v[:, idx].expand(b, -1, -1), HEADS, logit_bias=bias[idx])
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_region_dual_term_garment_without_tokens_at_this_block():
    q, garments, wk2, wv2, refs = region_case(64, sizes=(5, 0, 4))
    out = K.region_dual_term(q, HEADS, refs, ALLOWED, K.sdpa)
    torch.testing.assert_close(out, naive_region_dual(q, garments, wk2, wv2, ALLOWED), rtol=0, atol=ATOL)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))  # only garment 1 allowed, and it has no tokens


def test_region_dual_term_bad_shapes():
    q, _, _, _, refs = region_case(65)
    with pytest.raises(ValueError, match="region pattern"):
        K.region_dual_term(q, HEADS, refs, ALLOWED[:, :2], K.sdpa)
    bad = K.ProjectedReferences(refs.k, refs.v, None, (1, 2))
    with pytest.raises(ValueError, match="segments"):
        K.region_dual_term(q, HEADS, bad, ALLOWED[:, :2], K.sdpa)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_weights_is_x_w_transposed_plus_b(bias):
    lin = linear(70, bias)
    w = K.LinearWeights(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
    x = torch.randn(2, 5, C, dtype=DT)
    torch.testing.assert_close(w(x), proj(lin, x), rtol=0, atol=ATOL)
    # stored in float16, used in the input's dtype
    half = K.LinearWeights(w.weight.half(), None if w.bias is None else w.bias.half())
    assert half(x.float()).dtype == torch.float32
