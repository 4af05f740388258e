"""Reference bank: token selection, merging, mask projection cache, validation and deepcopy identity."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from humanref.attention import bank as BK

DT = torch.float64


def _features(n=10, c=6, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------------------------ select_tokens
@pytest.mark.parametrize(
    "weights",
    [
        [1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.25, 1.0, 0.0, 0.9],  # soft with zeros
        [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0],  # binary
        [1.0] * 10,  # nothing masked
        [0.0] * 10,  # everything masked
    ],
)
def test_select_tokens_matches_naive(weights):
    feats = _features()
    w = torch.tensor(weights, dtype=torch.float32)  # projected masks come as float32
    got = BK.select_tokens(feats, w)
    rows = [feats[i] * float(w[i]) for i in range(10) if float(w[i]) > 0]
    expected = torch.stack(rows) if rows else torch.zeros(0, 6, dtype=DT)
    assert got.tokens.shape == expected.shape and got.tokens.dtype == DT
    torch.testing.assert_close(got.tokens, expected, rtol=0, atol=1e-12)
    assert got.dropped == sum(1 for x in weights if x == 0)
    assert got.nbytes == expected.numel() * 8


def test_select_tokens_without_weights_keeps_everything():
    feats = _features()
    got = BK.select_tokens(feats, None)
    assert torch.equal(got.tokens, feats) and got.dropped == 0


# ----------------------------------------------------------------------------------------------- merge_captured
def test_merge_captured_concatenates_and_sums_dropped():
    a = BK.CapturedTokens(_features(3, seed=1), 2)
    b = BK.CapturedTokens(_features(0, seed=2), 7)
    c = BK.CapturedTokens(_features(4, seed=3), 0)
    merged = BK.merge_captured([a, b, c])
    expected = torch.zeros(7, 6, dtype=DT)
    expected[0:3] = a.tokens
    expected[3:7] = c.tokens
    assert torch.equal(merged.tokens, expected)
    assert merged.dropped == 9


def test_merge_captured_single_entry():
    a = BK.CapturedTokens(_features(3, seed=4), 5)
    merged = BK.merge_captured([a])
    assert torch.equal(merged.tokens, a.tokens) and merged.dropped == 5


# ----------------------------------------------------------------------------------------------- MaskProjector
def test_mask_projector_without_mask_returns_none():
    proj = BK.MaskProjector([None], "parts2whole")
    assert proj.weights(0, (4, 4)) is None


def test_mask_projector_area_values():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    proj = BK.MaskProjector([None, mask], "area")
    torch.testing.assert_close(proj.weights(1, (2, 2)), torch.tensor([0.75, 0.0, 0.0, 0.5]), rtol=0, atol=1e-7)


def test_mask_projector_parts2whole_values():
    mask = torch.zeros(8, 6)
    mask[2, 4] = 1.0  # nearest resize to (4, 3) samples rows 0,2,4,6 and cols 0,2,4 -> cell (1, 2)
    proj = BK.MaskProjector([mask], "parts2whole")
    expected = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).flatten()
    assert torch.equal(proj.weights(0, (4, 3)), expected)


def test_mask_projector_caches_per_grid(monkeypatch):
    calls = []
    real = BK.project_mask

    def counting(mask, grid, rule):
        calls.append((tuple(mask.shape), grid, rule))
        return real(mask, grid, rule)

    monkeypatch.setattr(BK, "project_mask", counting)
    masks = [torch.rand(16, 12), torch.rand(16, 12)]
    proj = BK.MaskProjector(masks, "area")
    w1 = proj.weights(0, (4, 3))
    assert proj.weights(0, (4, 3)) is w1
    assert len(calls) == 1 and calls[0] == ((1, 16, 12), (4, 3), "area")
    w2 = proj.weights(0, (8, 6))
    w3 = proj.weights(1, (4, 3))
    assert len(calls) == 3
    assert w2.shape == (48,) and w3.shape == (12,)
    assert not torch.equal(w1, w3)  # per-reference entries do not collide
    assert proj.weights(1, (4, 3)) is w3 and proj.weights(0, (8, 6)) is w2 and len(calls) == 3


# ----------------------------------------------------------------------------------------------- ReferenceBank
def _bank(**kw):
    refs = (BK.ReferenceInfo("top", 0, (768, 512), True), BK.ReferenceInfo("face", 1, (512, 512), False))
    key = ("input", 1, 0)
    feats = {
        key: (BK.CapturedTokens(torch.ones(3, 4), 2), BK.CapturedTokens(torch.zeros(5, 4), 0)),
        ("middle", 0, 0): (BK.CapturedTokens(torch.ones(2, 8, dtype=torch.float16), 6),),
    }
    args = dict(references=refs, block_channels={key: 4, ("middle", 0, 0): 8}, timing="once at t=0",
                mask_rule="parts2whole", features=feats)
    args.update(kw)
    return BK.ReferenceBank(**args)


@pytest.mark.parametrize("timing", ["every step", "once at t=0"])
def test_bank_valid_timings(timing):
    assert _bank(timing=timing).timing == timing


def test_bank_unknown_timing():
    with pytest.raises(ValueError, match=r"unknown writer timing 'sometimes'.*every step.*once at t=0"):
        _bank(timing="sometimes")


def test_timing_labels_are_the_saved_combo_values():
    assert BK.TIMINGS == ("every step", "once at t=0")
    assert BK.Timing.from_label("once at t=0", "timing") is BK.Timing.ONCE
    assert _bank(timing="every step").timing is BK.Timing.EVERY_STEP  # a label given to the bank becomes a member
    with pytest.raises(ValueError, match=r"timing must be one of \('every step', 'once at t=0'\), got 'later'"):
        BK.Timing.from_label("later", "timing")


@pytest.mark.parametrize("refs", [(), []])
def test_bank_needs_references(refs):
    with pytest.raises(ValueError, match="at least one reference"):
        _bank(references=refs)


def test_bank_merged_and_sizes():
    bank = _bank()
    assert bank.cached
    merged = bank.merged(("input", 1, 0))
    expected = torch.cat([torch.ones(3, 4), torch.zeros(5, 4)])
    assert torch.equal(merged.tokens, expected) and merged.dropped == 2
    assert bank.merged(("output", 9, 0)) is None
    assert bank.nbytes() == (12 + 20) * 4 + 16 * 2


def test_bank_every_step_has_no_features():
    bank = _bank(timing="every step", features=None, writer=object())
    assert not bank.cached
    assert bank.merged(("input", 1, 0)) is None
    assert bank.nbytes() == 0


def test_bank_deepcopy_is_identity():
    bank = _bank()
    assert copy.deepcopy(bank) is bank
    holder = {"transformer_options": {"humanref": [bank, {"other": [1, 2]}]}, "x": torch.zeros(2)}
    copied = copy.deepcopy(holder)
    assert copied is not holder
    assert copied["transformer_options"]["humanref"][0] is bank
    assert copied["transformer_options"]["humanref"][1] is not holder["transformer_options"]["humanref"][1]
    assert copied["x"] is not holder["x"]


def test_bank_is_immutable():
    bank = _bank()
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.timing = "every step"


def test_bank_projections_default_and_shared_on_deepcopy():
    from humanref.attention.kernels import LinearWeights

    assert _bank().projections is None  # training-free: the reader's own to_k/to_v
    key = ("input", 1, 0)
    wk, wv = LinearWeights(torch.eye(4)), LinearWeights(2 * torch.eye(4), torch.ones(4))
    bank = _bank(projections={key: (wk, wv)})
    assert copy.deepcopy({"b": bank})["b"].projections[key][0] is wk
    x = torch.randn(3, 4)
    assert torch.equal(bank.projections[key][1](x), 2 * x + 1)
