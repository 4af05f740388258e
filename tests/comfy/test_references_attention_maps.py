"""Attention maps through real ComfyUI sampling on the tiny SD15 model: recording never changes the picture, the
record holds the last run, known answers (a reference of weight 0 takes nothing, a dual region keeps its garment
inside it), the step and block choices, the nodes' outputs and their errors."""
from __future__ import annotations

import pytest
import torch
from helpers import LATENT, custom_sample, ksample, make_bank

from humanref.nodes.references import ReferenceAttentionMaps, ReferenceAttentionRecorder
from humanref.pipelines.references.attention_maps import attach_record, render_maps
from humanref.pipelines.references.patch import apply_reference_patch


@pytest.fixture(scope="module")
def bank(tiny_model, clip_vae):
    return make_bank(tiny_model, clip_vae, count=2)


def patched(model, bank, **kw):
    args = dict(mode="concat", strength=1.0, start_percent=0.0, end_percent=1.0, blocks="all", custom_blocks="")
    args.update(kw)
    return apply_reference_patch(model, bank, args.pop("mode"), args.pop("strength"), args.pop("start_percent"),
                                 args.pop("end_percent"), args.pop("blocks"), args.pop("custom_blocks"), **args)


def test_recording_never_changes_the_picture_and_gives_one_map_per_reference(tiny_model, conds, bank):
    plain = ksample(patched(tiny_model, bank), conds, LATENT)
    before, record_before = attach_record(tiny_model)  # recorder first, patch after
    after_model, record_after = attach_record(patched(tiny_model, bank), blocks="all")  # patch first
    assert torch.equal(ksample(patched(before, bank), conds, LATENT), plain)
    assert torch.equal(ksample(after_model, conds, LATENT), plain)
    for record in (record_before, record_after):
        maps = record.maps()
        assert maps.shape == (1, 2, LATENT.shape[2], LATENT.shape[3])
        assert [r.label for r in record.references] == ["face", "upper body clothes"]
        assert record.steps_seen == {0, 1, 2} and record.steps == 3
        total = maps.sum(dim=1)  # shares of one softmax, with the target's own keys taking the rest
        assert float(maps.min()) >= 0.0 and float(total.max()) < 1.0 and float(maps.mean()) > 0.01
    torch.testing.assert_close(record_before.maps(), record_after.maps(), atol=0, rtol=0)


def test_the_record_holds_the_last_run_only(tiny_model, conds, bank):
    model, record = attach_record(patched(tiny_model, bank))
    ksample(model, conds, LATENT, seed=1)
    first = record.maps().clone()
    ksample(model, conds, LATENT, seed=2)
    assert not torch.equal(record.maps(), first)
    ksample(model, conds, LATENT, seed=1)
    assert torch.equal(record.maps(), first) and record.runs == 3


def test_a_reference_of_weight_zero_takes_no_attention_and_a_heavier_one_takes_more(tiny_model, conds, bank):
    shares = {}
    for weights in ("1, 1", "0, 1", "3, 1"):
        model, record = attach_record(patched(tiny_model, bank, reference_weights=weights))
        ksample(model, conds, LATENT)
        shares[weights] = record.maps()[0].mean(dim=(1, 2))
    assert float(shares["0, 1"][0]) == 0.0 and float(shares["0, 1"][1]) > 0.0
    assert float(shares["3, 1"][0]) > float(shares["1, 1"][0]) > 0.0


def test_a_dual_region_keeps_its_garment_inside_it(tiny_model, conds, bank):
    """Reference 1 may act only in the left half of the picture: its map is exactly 0 on the right edge."""
    h, w = LATENT.shape[2] * 8, LATENT.shape[3] * 8
    regions = torch.ones(2, h, w)
    regions[0, :, w // 2:] = 0.0
    model, record = attach_record(patched(tiny_model, bank, mode="dual", strength=0.7, regions=regions))
    custom_sample(model, conds, LATENT)
    maps = record.maps()[0]
    assert float(maps[0, :, -2:].abs().max()) == 0.0 and float(maps[0, :, :2].min()) > 0.0
    assert float(maps[1, :, -2:].min()) > 0.0  # the other reference may go anywhere


def test_step_and_block_choices(tiny_model, conds, bank):
    model, record = attach_record(patched(tiny_model, bank), blocks="output", step=1)
    ksample(model, conds, LATENT)
    assert record.steps_seen == {1}
    every, all_blocks = attach_record(patched(tiny_model, bank))
    ksample(every, conds, LATENT)
    assert record.records < all_blocks.records
    assert not torch.equal(record.maps(), all_blocks.maps())


def test_the_nodes_draw_a_heatmap_and_a_mask_per_reference(tiny_model, conds, bank):
    model, record = ReferenceAttentionRecorder.execute(patched(tiny_model, bank), "all", -1).result
    ksample(model, conds, LATENT)
    images = torch.rand(1, 48, 80, 3)
    heatmaps, masks, captions = ReferenceAttentionMaps.execute(record, images, 0.6, "per map").result
    assert heatmaps.shape == (2, 48, 80, 3) and masks.shape == (2, 48, 80)
    assert [float(m.max()) for m in masks] == [1.0, 1.0]
    assert captions.splitlines()[0].startswith("face: peak") and "upper body clothes" in captions
    raw = render_maps(record, images, 0.0, "none")
    torch.testing.assert_close(raw[0][:, 20:], images.expand(2, -1, -1, -1)[:, 20:], atol=0.5 / 255 + 1e-6,
                               rtol=0)  # opacity 0: the picture (8-bit, below the caption)
    assert float(raw[1].max()) < 1.0  # shares, not stretched
    no_image = render_maps(record, None)[0]
    assert no_image.shape == (2, LATENT.shape[2] * 8, LATENT.shape[3] * 8, 3)


def test_what_went_wrong_when_nothing_was_recorded(tiny_model, conds, bank):
    _, fresh = attach_record(tiny_model)
    with pytest.raises(ValueError, match="no sampler has run with the recorded model"):
        render_maps(fresh, None)
    model, late = attach_record(patched(tiny_model, bank), step=5)
    ksample(model, conds, LATENT)
    with pytest.raises(ValueError, match="step is 5, but the sampler ran 3 steps"):
        render_maps(late, None)
    adain, statistics_only = attach_record(patched(tiny_model, bank, mode="adain"))
    ksample(adain, conds, LATENT)
    with pytest.raises(ValueError, match="acted through adain only, which moves feature statistics"):
        render_maps(statistics_only, None)
    unpatched, empty = attach_record(tiny_model)
    ksample(unpatched, conds, LATENT)
    with pytest.raises(ValueError, match="no reference acted"):
        render_maps(empty, None)
    model, record = attach_record(patched(tiny_model, bank))
    ksample(model, conds, LATENT)
    with pytest.raises(ValueError, match="images: a batch of 3 pictures for 1 sampled images"):
        render_maps(record, torch.rand(3, 48, 80, 3))
