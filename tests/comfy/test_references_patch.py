"""pipelines/reference.py through real ComfyUI sampling on tiny SD15 models."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import LATENT, box_mask, custom_sample, ksample, make_bank, reference_images

from humanref.pipelines.references import patch as reference_mod
from humanref.pipelines.references.inputs import prepare_references
from humanref.pipelines.references.patch import ReferenceAttnReplace, apply_reference_patch, build_reference_bank


def test_patched_run_differs_and_uncond_chunk_is_unchanged(tiny_model, conds, bank):
    plain_rec, patched_rec = [], []
    plain = ksample(tiny_model, conds, LATENT, record=plain_rec)
    patched = ksample(apply_reference_patch(tiny_model, bank), conds, LATENT, record=patched_rec)
    assert torch.isfinite(patched).all()
    assert (patched - plain).abs().max() > 1e-3
    # same input at the first step: the uncond chunk is bit-identical, the cond chunk differs
    assert torch.equal(plain_rec[0][1], patched_rec[0][1])
    assert (plain_rec[0][0] - patched_rec[0][0]).abs().max() > 1e-4


def test_uncond_sees_references_when_asked(tiny_model, conds, bank):
    plain_rec, rec = [], []
    ksample(tiny_model, conds, LATENT, record=plain_rec)
    ksample(apply_reference_patch(tiny_model, bank, style_fidelity=0.0), conds, LATENT, record=rec)
    assert (plain_rec[0][1] - rec[0][1]).abs().max() > 1e-4


def test_unpatched_model_is_bit_identical_after_a_patched_run(tiny_model, conds, bank, step_bank):
    before = ksample(tiny_model, conds, LATENT)
    ksample(apply_reference_patch(tiny_model, bank), conds, LATENT)
    ksample(apply_reference_patch(tiny_model, step_bank), conds, LATENT)
    after = ksample(tiny_model, conds, LATENT)
    assert torch.equal(before, after)
    to = tiny_model.model_options.get("transformer_options", {})
    assert "attn1" not in to.get("patches_replace", {})
    assert not tiny_model.wrappers


def test_ksampler_and_sampler_custom_advanced_agree(tiny_model, conds, bank, step_bank):
    for b in (bank, step_bank):
        patched = apply_reference_patch(tiny_model, b)
        a = ksample(patched, conds, LATENT, seed=3)
        c = custom_sample(patched, conds, LATENT, seed=3)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        assert (a - custom_sample(tiny_model, conds, LATENT, seed=3)).abs().max() > 1e-3


def test_batch_two_matches_batch_one(tiny_model, conds, bank):
    patched = apply_reference_patch(tiny_model, bank)
    one = ksample(patched, conds, torch.zeros(1, 4, 6, 10), seed=9)
    two = ksample(patched, conds, torch.zeros(2, 4, 6, 10), seed=9)
    assert two.shape[0] == 2
    torch.testing.assert_close(two[:1], one, rtol=1e-3, atol=1e-3)
    assert (two[0] - two[1]).abs().max() > 1e-3


def test_cfg_one_runs_cond_only_and_still_injects(tiny_model, conds, bank):
    plain = ksample(tiny_model, conds, LATENT, cfg=1.0)
    patched = ksample(apply_reference_patch(tiny_model, bank), conds, LATENT, cfg=1.0)
    assert (patched - plain).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(1, 4, 6, 10), (1, 4, 10, 6), (1, 4, 13, 21)])
def test_any_aspect_and_latents_not_multiple_of_8(tiny_model, conds, bank, shape):
    out = ksample(apply_reference_patch(tiny_model, bank), conds, torch.zeros(shape))
    assert out.shape == shape and torch.isfinite(out).all()


def test_non_square_latent_48x80(tiny_model, conds, bank):
    out = ksample(apply_reference_patch(tiny_model, bank), conds, torch.zeros(1, 4, 48, 80), steps=1)
    assert out.shape == (1, 4, 48, 80) and torch.isfinite(out).all()


def test_bank_is_shared_not_deep_copied(tiny_model, bank):
    patched = apply_reference_patch(tiny_model, bank)
    clone = patched.clone()
    replaces = clone.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert replaces and all(isinstance(p, ReferenceAttnReplace) for p in replaces.values())
    assert all(p.patches[0].bank is bank for p in replaces.values())
    copied = copy.deepcopy(clone.model_options)
    key = next(iter(replaces))
    assert copied["transformer_options"]["patches_replace"]["attn1"][key].patches[0].bank is bank


def test_strength_zero_is_exactly_unpatched(tiny_model, conds, bank):
    plain = ksample(tiny_model, conds, LATENT)
    assert torch.equal(ksample(apply_reference_patch(tiny_model, bank, strength=0.0), conds, LATENT), plain)


def test_chained_patches_equal_one_bank_with_both_references(tiny_model, clip_vae, conds):
    clip, vae = clip_vae
    imgs = reference_images(2, (64, 48), seed=4)
    mask = box_mask((64, 48), 0, 0, 32, 48)
    refs_a = prepare_references([(1, imgs[0], mask, "face")], 768, 6)
    refs_b = prepare_references([(1, imgs[1], None, "face")], 768, 6)
    both = prepare_references([(1, imgs[0], mask, "face"), (2, imgs[1], None, "face")], 768, 6)
    bank_a, bank_b, bank_ab = (build_reference_bank(tiny_model, vae, clip, r, "once at t=0", "parts2whole")
                               for r in (refs_a, refs_b, both))
    chained = apply_reference_patch(apply_reference_patch(tiny_model, bank_a), bank_b)
    joint = apply_reference_patch(tiny_model, bank_ab)
    a = ksample(chained, conds, LATENT)
    b = ksample(joint, conds, LATENT)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert (a - ksample(apply_reference_patch(tiny_model, bank_a), conds, LATENT)).abs().max() > 1e-3


def test_reference_kv_use_the_readers_lora_patched_weights(tiny_sd15_config, conds, clip_vae):
    """A weight patch (as a LoRA loader adds) on attn1.to_k/to_v must reach the reference keys/values: the
    result equals a model whose weights really are W + delta."""
    from humanref.attention.blocks import walk_transformer_blocks
    from humanref.pipelines.synthetic.base import build_model

    cfg = tiny_sd15_config
    base = build_model(cfg, seed=1)
    bank = make_bank(base, clip_vae, count=1)
    g = torch.Generator().manual_seed(2)
    patches, sd = {}, base.model.state_dict()
    for b in walk_transformer_blocks(base.model.diffusion_model):
        for proj in ("to_k", "to_v"):
            key = f"diffusion_model.{b.path}.attn1.{proj}.weight"
            patches[key] = 0.3 * torch.randn(sd[key].shape, generator=g)
    lora = base.clone()
    lora.add_patches({k: (v,) for k, v in patches.items()}, 1.0)
    merged = build_model(cfg, seed=1)
    with torch.no_grad():
        msd = merged.model.state_dict()
        for k, v in patches.items():
            msd[k].add_(v)
    a = ksample(apply_reference_patch(lora, bank), conds, LATENT)
    b = ksample(apply_reference_patch(merged, bank), conds, LATENT)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and the LoRA matters for the reference path (the own path alone would not explain a)
    assert (a - ksample(lora, conds, LATENT)).abs().max() > 1e-3


def _count_writer_passes(monkeypatch):
    calls = []
    real = reference_mod.run_writer

    def counting(writer, sigma, *args, **kwargs):
        calls.append(sigma)
        return real(writer, sigma, *args, **kwargs)

    monkeypatch.setattr(reference_mod, "run_writer", counting)
    return calls


def test_every_step_writer_runs_once_per_active_step(tiny_model, conds, step_bank, monkeypatch):
    calls = _count_writer_passes(monkeypatch)
    ksample(apply_reference_patch(tiny_model, step_bank), conds, LATENT, steps=4)
    assert len(calls) == 4 and len(set(calls)) == 4
    calls.clear()
    ksample(apply_reference_patch(tiny_model, step_bank, start_percent=0.0, end_percent=0.5), conds, LATENT, steps=4)
    assert 1 <= len(calls) < 4


def test_cached_bank_never_runs_the_writer_while_sampling(tiny_model, conds, bank, monkeypatch):
    calls = _count_writer_passes(monkeypatch)
    ksample(apply_reference_patch(tiny_model, bank), conds, LATENT, steps=3)
    assert calls == []


def test_inactive_range_is_exactly_unpatched(tiny_model, conds, bank):
    plain = ksample(tiny_model, conds, LATENT, steps=3)
    # start at 100 %: sigma_start = 0, below every evaluated sigma (the normal schedule ends at sigma_min)
    out = ksample(apply_reference_patch(tiny_model, bank, start_percent=1.0, end_percent=1.0), conds, LATENT, steps=3)
    assert torch.equal(out, plain)


def test_modes_differ_from_each_other(tiny_model, conds, bank):
    outs = {m: ksample(apply_reference_patch(tiny_model, bank, mode=m, strength=0.5 if m == "blend" else 1.0),
                       conds, LATENT) for m in ("concat", "strict", "blend")}
    assert (outs["concat"] - outs["strict"]).abs().max() > 1e-5  # the masked reference's zero key matters
    assert (outs["concat"] - outs["blend"]).abs().max() > 1e-4


def test_sd15_bank_on_sdxl_model_is_a_clear_error(tiny_sdxl_model, bank):
    with pytest.raises(ValueError, match=r"writer of SD15 .* but model is SDXL .*block input_\d\.0 has width"):
        apply_reference_patch(tiny_sdxl_model, bank)


def test_bad_patch_inputs(tiny_model, bank):
    with pytest.raises(ValueError, match="start_percent"):
        apply_reference_patch(tiny_model, bank, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="custom_blocks"):
        apply_reference_patch(tiny_model, bank, block_set="custom", custom_blocks="input_99")


def test_block_sets_patch_only_their_blocks(tiny_model, bank):
    for block_set, kinds in (("mid+up", {"middle", "output"}), ("down-only", {"input"})):
        patched = apply_reference_patch(tiny_model, bank, block_set=block_set)
        keys = patched.model_options["transformer_options"]["patches_replace"]["attn1"].keys()
        assert {k[0] for k in keys} == kinds


def test_custom_blocks_out_of_order_capture_every_block(tiny_model, conds, step_bank, monkeypatch):
    """The writer stops after the last block in execution order, whatever order custom_blocks lists them in."""
    captured = []
    real = reference_mod.run_writer

    def recording(writer, sigma, *args, **kwargs):
        out = real(writer, sigma, *args, **kwargs)
        captured.append(set(out))
        return out

    monkeypatch.setattr(reference_mod, "run_writer", recording)
    patched = apply_reference_patch(tiny_model, step_bank, block_set="custom", custom_blocks="output_3, input_1")
    wanted = set(patched.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert {k[0] for k in wanted} == {"input", "output"}
    out = ksample(patched, conds, LATENT, steps=2)
    assert captured and all(c == wanted for c in captured)
    assert (out - ksample(tiny_model, conds, LATENT, steps=2)).abs().max() > 1e-4


def test_writer_with_extra_input_channels_is_named(tiny_sd15_config, clip_vae):
    """Found by the bad-input sweep: an inpainting-style (here 13-channel, MimicBrush's) UNet as the writer failed
    deep inside its first convolution; now the writer input is named."""
    from humanref.pipelines.synthetic.base import build_model

    writer = build_model(dict(tiny_sd15_config, in_channels=13), seed=1)
    with pytest.raises(ValueError, match="writer has a 13-channel input but the reference latents have 4 channels"):
        make_bank(writer, clip_vae)
    with pytest.raises(ValueError, match="writer has a 13-channel input"):
        make_bank(writer, clip_vae, timing="every step")
