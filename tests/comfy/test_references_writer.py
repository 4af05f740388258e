"""pipelines/writer.py: what the writer captures is exactly the norm1 output of every block (observed
independently with forward hooks), masked by the Parts2Whole rule computed naively here."""
from __future__ import annotations

import math

import pytest
import torch
from naive import naive_parts2whole

from humanref.attention.bank import MaskProjector
from humanref.attention.blocks import walk_transformer_blocks
from humanref.pipelines.references.writer import WriterInputs, group_references, label_conds, run_writer


@pytest.fixture(scope="module")
def writer_setup(tiny_model, clip_vae):
    clip, _ = clip_vae
    model = tiny_model.model
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(1, 4, 10, 6, generator=g), torch.randn(1, 4, 10, 6, generator=g),
               torch.randn(1, 4, 7, 11, generator=g)]
    labels = ["face", "shoes", "face"]
    conds = [label_conds(model, clip, lab, lat, torch.device("cpu")) for lab, lat in zip(labels, latents)]
    mask = torch.zeros(80, 48)
    mask[20:60, 8:30] = 1.0
    masks = [mask, None, None]
    return latents, conds, masks


def hooked_norm1(model, x, sigma, conds):
    """norm1 outputs per block key by forward hooks: an observation path independent of attn1_patch."""
    blocks = walk_transformer_blocks(model.diffusion_model)
    seen, handles = {}, []
    for b in blocks:
        mod = model.diffusion_model.get_submodule(b.path).norm1
        handles.append(mod.register_forward_hook(lambda m, i, o, key=b.key: seen.__setitem__(key, o.detach().clone())))
    try:
        with torch.no_grad():
            model.apply_model(x, torch.full((x.shape[0],), sigma), **conds)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_groups_batch_references_of_equal_shape(writer_setup):
    latents, conds, _ = writer_setup
    groups = group_references(latents, conds)
    assert sorted(g.indices for g in groups) == [(0, 1), (2,)]
    assert groups[0].latents.shape[0] == len(groups[0].indices)


def test_capture_at_t0_is_norm1_output_masked_by_official_rule(tiny_model, writer_setup):
    latents, conds, masks = writer_setup
    inputs = WriterInputs(tiny_model, group_references(latents, conds), MaskProjector(masks, "parts2whole"), 3)
    feats = run_writer(inputs, 0.0)
    blocks = walk_transformer_blocks(tiny_model.model.diffusion_model)
    assert set(feats) == {b.key for b in blocks}
    for idx in range(3):
        seen = hooked_norm1(tiny_model.model, latents[idx], 0.0, conds[idx])
        for b in blocks:
            cap = feats[b.key][idx]
            ref = seen[b.key][0]
            if masks[idx] is None:
                assert cap.dropped == 0
                torch.testing.assert_close(cap.tokens, ref, rtol=1e-5, atol=1e-5)
                continue
            n = ref.shape[0]
            # the block grid of the UNet for a 10x6 latent (80x48 px mask)
            grids = {10 * 6: (10, 6), 5 * 3: (5, 3), 3 * 2: (3, 2)}
            h, w = grids[n]
            weights = naive_parts2whole(masks[idx][None], (h, w))[0].float()
            keep = weights > 0
            assert cap.dropped == int((~keep).sum())
            torch.testing.assert_close(cap.tokens, ref[keep] * weights[keep, None], rtol=1e-5, atol=1e-5)


def test_every_step_capture_uses_the_noised_reference(tiny_model, writer_setup):
    latents, conds, _ = writer_setup
    inputs = WriterInputs(tiny_model, group_references(latents[:1], conds[:1]), MaskProjector([None], "area"), 1,
                          seed=11)
    sigma = 3.5
    feats = run_writer(inputs, sigma)
    noise = inputs.noise_for(0, torch.device("cpu"), torch.float32)
    x = latents[0] + sigma * noise  # EPS noise scaling
    seen = hooked_norm1(tiny_model.model, x, sigma, conds[0])
    for key, entries in feats.items():
        torch.testing.assert_close(entries[0].tokens, seen[key][0], rtol=1e-5, atol=1e-5)
    again = run_writer(inputs, sigma)  # fixed noise: a second pass is identical
    for key in feats:
        assert torch.equal(feats[key][0].tokens, again[key][0].tokens)


def test_writer_stops_after_the_last_block_it_needs(tiny_model, writer_setup):
    latents, conds, _ = writer_setup
    blocks = walk_transformer_blocks(tiny_model.model.diffusion_model)
    ran = []
    handles = [tiny_model.model.diffusion_model.get_submodule(b.path).norm1.register_forward_hook(
        lambda m, i, o, key=b.key: ran.append(key)) for b in blocks]
    try:
        inputs = WriterInputs(tiny_model, group_references(latents[:1], conds[:1]), MaskProjector([None], "area"), 1)
        feats = run_writer(inputs, 0.0, keys=(blocks[0].key,))
    finally:
        for h in handles:
            h.remove()
    assert set(feats) == {blocks[0].key}
    assert ran == [blocks[0].key]  # no later block ran


def test_clean_option_feeds_the_unmodified_latents_at_the_current_timestep(tiny_model, writer_setup):
    """MimicBrush: the UNet's input is exactly the clean latents while its timestep is sigma's (hooks observe
    conv_in's input and the timestep embedding's input independently of the writer code)."""
    latents, conds, _ = writer_setup
    inputs = WriterInputs(tiny_model, group_references(latents[:1], conds[:1]), MaskProjector([None], "area"), 1,
                          seed=11, clean=True)
    sigma = 3.5
    unet = tiny_model.model.diffusion_model
    seen = {}
    handles = [unet.input_blocks[0][0].register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].clone())),
               unet.time_embed[0].register_forward_hook(lambda m, i, o: seen.__setitem__("emb", i[0].clone()))]
    try:
        feats = run_writer(inputs, sigma)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["x"], latents[0], rtol=1e-6, atol=1e-6)
    expected_t = tiny_model.model.model_sampling.timestep(torch.tensor([sigma])).float()
    with torch.no_grad():
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
        emb = timestep_embedding(expected_t, unet.model_channels)
    torch.testing.assert_close(seen["emb"], emb, rtol=1e-6, atol=1e-6)
    assert 0 < float(expected_t) < 999
    # the same features as an un-hooked forward of the clean latents with sigma's scaling undone
    scaled = latents[0] * math.sqrt(sigma ** 2 + 1.0)
    ref = hooked_norm1(tiny_model.model, scaled, sigma, conds[0])
    for key, entries in feats.items():
        torch.testing.assert_close(entries[0].tokens, ref[key][0], rtol=1e-5, atol=1e-5)
    noised = run_writer(WriterInputs(tiny_model, inputs.groups, inputs.projector, 1, seed=11), sigma)
    assert any(not torch.allclose(noised[k][0].tokens, feats[k][0].tokens) for k in feats)  # default unchanged
