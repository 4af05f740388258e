"""Attention maps (attention/maps.py) against a naive float64 softmax over an explicit key sequence.

The naive side lays every key out token by token (own keys, each reference's kept tokens, one explicit zero key
per masked-out token, a reference weight as a mass multiplier on its keys) and sums the probabilities of each
reference's kept tokens; it never calls the engine's projection or share code.
"""
from __future__ import annotations

import pytest
import torch
from naive import linear, naive_attention_probs, proj

from humanref.attention import maps as M
from humanref.attention.kernels import project_parts
from humanref.attention.reader import ActivePatch, mode_named

DT = torch.float64
HEADS, DIM = 4, 8
C = HEADS * DIM
ATOL = 1e-10


def naive_shares(q, own_k, groups, heads, allowed=None):
    """groups: per reference (keys [n, C], mass multiplier); extra entries (keys, mass, None) belong to none.

    Returns [B, Nq, references] with each reference's summed softmax probability, averaged over heads.
    ``allowed`` [Nq, references] bool: the references a query may see (own keys then must be empty).
    """
    b = q.shape[0]
    keys = [own_k] if own_k is not None else []
    owners = [-1] * (own_k.shape[1] if own_k is not None else 0)
    masses = [1.0] * len(owners)
    refs = 0
    for g in groups:
        tokens, mass, owner = g if len(g) == 3 else (*g, refs)
        keys.append(tokens.unsqueeze(0).expand(b, -1, -1))
        owners += [owner if owner is not None else -1] * tokens.shape[0]
        masses += [mass] * tokens.shape[0]
        if len(g) == 2:
            refs += 1
    k = torch.cat(keys, dim=1)
    owners = torch.tensor(owners)
    bias = torch.tensor(masses, dtype=DT).log()
    key_allowed = None
    if allowed is not None:
        key_allowed = allowed[:, owners.clamp(min=0)] & (owners >= 0)[None, :]
    probs = naive_attention_probs(q, k, heads, logit_bias=bias, allowed=key_allowed)  # [B, h, Nq, Nk]
    out = torch.zeros(b, q.shape[1], refs, dtype=DT)
    for r in range(refs):
        out[..., r] = probs[..., owners == r].sum(-1).mean(1)
    return out


def reference_parts(seed, sizes, dropped, weights):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, C, generator=g, dtype=DT), d, w) for n, d, w in zip(sizes, dropped, weights)]


def explicit_groups(parts, to_k, dilute=True):
    """Each reference's projected kept keys with its weight, plus its masked-out tokens as explicit zero keys."""
    groups, zeros = [], []
    zero_key = proj(to_k, torch.zeros(1, C, dtype=DT))
    for tokens, d, w in parts:
        groups.append((proj(to_k, tokens), w))
        if dilute and d:
            zeros.append((zero_key.expand(d, -1), w, None))
    return groups + zeros


def setup(seed=0, b=2, nq=12, nk=12):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, C, generator=g, dtype=DT)
    k = torch.randn(b, nk, C, generator=g, dtype=DT)
    return q, k, linear(seed + 1, True, C).double(), linear(seed + 2, True, C).double()


@pytest.mark.parametrize("mode", ["concat", "strict", "adain+attn"])
def test_mass_modes_match_the_explicit_key_sequence(mode):
    q, k, to_k, to_v = setup()
    m = mode_named(mode)
    parts = reference_parts(3, sizes=(5, 0, 7), dropped=(4, 6, 2), weights=(1.5, 1.0, 0.5))
    refs = project_parts(parts, to_k, to_v, strength=0.8, dilute=m.dilutes)
    (shares,) = M.reference_shares(q, k, HEADS, [ActivePatch(m, refs)])
    groups = explicit_groups(parts, to_k, m.dilutes)
    groups = [(t, w * 0.8) for t, w in groups[:3]] + [(t, w * 0.8, None) for t, w, _ in groups[3:]]
    expected = naive_shares(q, k, groups, HEADS)
    assert shares.shape == (2, 12, 3)
    torch.testing.assert_close(shares, expected, atol=ATOL, rtol=0)
    assert float(shares[..., 1].abs().max()) == 0.0  # no kept token at this block: no share


def test_two_mass_patches_share_one_softmax_and_a_blend_patch_gets_its_own():
    q, k, to_k, to_v = setup(1)
    p1 = reference_parts(5, (4,), (0,), (1.0,))
    p2 = reference_parts(6, (3, 2), (0, 0), (1.0, 2.0))
    p3 = reference_parts(7, (6,), (0,), (1.0,))
    a = ActivePatch(mode_named("concat"), project_parts(p1, to_k, to_v))
    b = ActivePatch(mode_named("strict"), project_parts(p2, to_k, to_v, dilute=False))
    c = ActivePatch(mode_named("blend"), project_parts(p3, to_k, to_v), weight=0.5)
    sa, sb, sc = M.reference_shares(q, k, HEADS, [a, b, c])
    g1, g2, g3 = explicit_groups(p1, to_k), explicit_groups(p2, to_k, False), explicit_groups(p3, to_k)
    joint = naive_shares(q, k, g1 + g2, HEADS)
    torch.testing.assert_close(sa, joint[..., :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(sb, joint[..., 1:], atol=ATOL, rtol=0)
    with_blend = naive_shares(q, k, [(t, w, None) for t, w in g1 + g2] + g3, HEADS)
    torch.testing.assert_close(sc, with_blend, atol=ATOL, rtol=0)


def test_dual_shares_are_its_separate_softmax_and_regions_shut_references_out():
    q, _, to_k, to_v = setup(2)
    parts = reference_parts(8, (5, 4), (0, 0), (1.0, 0.5))
    refs = project_parts(parts, to_k, to_v, dilute=False, weight_values=True)
    (free,) = M.reference_shares(q, None, HEADS, [ActivePatch(mode_named("dual"), refs)])
    groups = [(proj(to_k, t), 1.0) for t, _, _ in parts]  # weights scale dual values, not masses
    torch.testing.assert_close(free, naive_shares(q, None, groups, HEADS), atol=ATOL, rtol=0)
    allowed = torch.zeros(12, 2, dtype=torch.bool)
    allowed[:6, 0] = True
    allowed[4:10, 1] = True  # rows 4, 5 see both; 10, 11 none
    (regioned,) = M.reference_shares(q, None, HEADS, [ActivePatch(mode_named("dual"), refs, allowed=allowed)])
    torch.testing.assert_close(regioned, naive_shares(q, None, groups, HEADS, allowed), atol=ATOL, rtol=0)
    assert float(regioned[:, 6:, 0].abs().max()) == 0.0 and float(regioned[:, :4, 1].abs().max()) == 0.0
    assert float(regioned[:, 10:].abs().max()) == 0.0


def test_query_chunks_give_the_same_shares():
    q, k, to_k, to_v = setup(3, nq=40)
    refs = project_parts(reference_parts(9, (6, 3), (2, 0), (1.0, 1.0)), to_k, to_v)
    patch = [ActivePatch(mode_named("concat"), refs)]
    (whole,) = M.reference_shares(q, k, HEADS, patch)
    (chunked,) = M.reference_shares(q, k, HEADS, patch, chunk_elements=2 * HEADS * 60 * 3)  # 3 queries a chunk
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)


def test_a_reference_that_matches_one_region_lands_there():
    """The constructed case: the target's left half asks for direction a, its right half for b; the
    reference's keys are a, the target's own keys b. The reference's share is ~1 on the left, ~0 on the right."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(C, generator=g, dtype=DT)
    b = torch.randn(C, generator=g, dtype=DT)
    b = b - (b @ a) / (a @ a) * a  # orthogonal to a
    a, b = a / a.norm() * 12, b / b.norm() * 12
    h, w = 4, 6
    left = torch.arange(h * w) % w < w // 2
    q = torch.where(left[:, None], a, b).unsqueeze(0)
    own = b.expand(1, 10, C)
    identity = lambda t: t  # noqa: E731
    refs = project_parts([(a.expand(8, C), 0, 1.0)], identity, identity)
    (shares,) = M.reference_shares(q, own, HEADS, [ActivePatch(mode_named("concat"), refs)])
    record = M.AttentionRecord()
    record.add((h, w), [(M.RecordedReference("p", 0, "shoes"), shares[..., 0])], step=0)
    heat = record.maps()[0, 0]
    assert heat.shape == (h, w)
    assert float(heat[:, :w // 2].min()) > 0.95 and float(heat[:, w // 2:].max()) < 0.05


def test_the_record_averages_blocks_and_steps_on_the_finest_grid():
    record = M.AttentionRecord(blocks="output", step=1)
    shoes, face = M.RecordedReference("p", 0, "shoes"), M.RecordedReference("p", 1, "face")
    assert record.wants(("output", 3, 0), 1) and not record.wants(("input", 1, 0), 1)
    assert not record.wants(("output", 3, 0), 0)
    record.add((2, 3), [(shoes, torch.full((1, 6), 0.5))], step=1)
    record.add((4, 6), [(shoes, torch.full((1, 24), 1.0)), (face, torch.full((1, 24), 0.25))], step=1)
    maps = record.maps()
    assert maps.shape == (1, 2, 4, 6)
    torch.testing.assert_close(maps[0, 0], torch.full((4, 6), 0.75))  # (0.5 upsampled + 1) / 2 records
    torch.testing.assert_close(maps[0, 1], torch.full((4, 6), 0.125))  # seen at one of two records
    assert [r.label for r in record.references] == ["shoes", "face"]
    record.start_run()
    with pytest.raises(ValueError, match="nothing was recorded"):
        record.maps()


def test_a_record_survives_the_deepcopy_of_every_model_clone():
    import copy

    record = M.AttentionRecord()
    assert copy.deepcopy({"r": record})["r"] is record
