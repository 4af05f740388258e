"""Issue 14's reference controls through real ComfyUI sampling on the tiny SD15 model: AdaIN against forward
hooks that apply the written-out definition (tests/naive.py) to the same UNet blocks, per-reference weights,
the strength curve, style fidelity, and the errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import LATENT, box_mask, ksample, reference_images
from naive import naive_adain, naive_parts2whole

from humanref.attention.adain import default_adain_blocks
from humanref.pipelines.references.inputs import prepare_references
from humanref.pipelines.references.patch import apply_reference_patch, build_reference_bank
from humanref.pipelines.references.writer import encode_images, label_conds

SIZE = (64, 48)
LABELS = ("face", "upper body clothes")


def references():
    images = reference_images(2, SIZE, seed=5)
    masks = [box_mask(SIZE, 8, 4, 48, 40), None]
    return [(i + 1, img, m, label) for i, (img, m, label) in enumerate(zip(images, masks, LABELS))]


@pytest.fixture(scope="module")
def two_refs(tiny_model, clip_vae):
    clip, vae = clip_vae
    return build_reference_bank(tiny_model, vae, clip, prepare_references(references(), 768, 6), "once at t=0",
                                "parts2whole")


def unet_modules(unet):
    """The last layer of each UNet block: its output is the block's output (ComfyUI runs a block layer by layer,
    so a hook on the block itself never fires)."""
    found = {("input", i): list(m)[-1] for i, m in enumerate(unet.input_blocks)}
    found[("middle", 0)] = list(unet.middle_block)[-1]
    found.update({("output", i): list(m)[-1] for i, m in enumerate(unet.output_blocks)})
    return found


def adain_points(model):
    unet = model.model.diffusion_model
    return default_adain_blocks("SD15", len(unet.input_blocks), len(unet.output_blocks))


def reference_maps(model, clip_vae, points):
    """Each reference's block outputs by a plain writer forward at t = 0, captured with forward hooks."""
    clip, vae = clip_vae
    base = model.model
    modules = unet_modules(base.diffusion_model)
    maps = {p: [] for p in points}
    for _, image, mask, label in references():
        latent = encode_images(vae, base, [image[0]])[0]
        conds = label_conds(base, clip, label, latent, torch.device("cpu"))
        seen: dict = {}
        hooks = [modules[p].register_forward_hook(
            lambda mod, args, out, p=p, seen=seen: seen.__setitem__(p, out.detach())) for p in points]
        try:
            with torch.no_grad():
                base.apply_model(latent, torch.zeros(1), **conds)
        finally:
            for h in hooks:
                h.remove()
        for p in points:
            grid = tuple(seen[p].shape[-2:])
            weights = None if mask is None else naive_parts2whole(mask, grid)[0].reshape(grid)
            maps[p].append((seen[p][0], weights))
    return maps


def sample_with_hooks(model, conds, maps, weights, extra=None):
    """Sampling the plain model (or ``extra`` patched on it) with the definition applied at every block output."""
    modules = unet_modules(model.model.diffusion_model)

    def hook(point):
        def apply(mod, args, out):
            refs = maps[point]
            moved = naive_adain(out, [m for m, _ in refs], [w for _, w in refs], weights)
            return moved.to(out.dtype)
        return apply

    hooks = [modules[p].register_forward_hook(hook(p)) for p in maps]
    try:
        return ksample(extra if extra is not None else model, conds, LATENT)
    finally:
        for h in hooks:
            h.remove()


def test_adain_is_the_definition_at_the_anchors_blocks(tiny_model, clip_vae, conds, two_refs):
    points = adain_points(tiny_model)
    assert points == (("input", 2), ("input", 3), ("middle", 0), ("output", 0), ("output", 1), ("output", 2))
    assert set(two_refs.stats) >= set(points)
    maps = reference_maps(tiny_model, clip_vae, points)
    patched = apply_reference_patch(tiny_model, two_refs, mode="adain", strength=0.8, style_fidelity=0.0,
                                    reference_weights="1, 0.5")
    out = ksample(patched, conds, LATENT)
    expected = sample_with_hooks(tiny_model, conds, maps, [0.8, 0.4])
    plain = ksample(tiny_model, conds, LATENT)
    assert (out - plain).abs().max() > 1e-2  # AdaIN changes the picture
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-3, atol=2e-3)


def test_adain_attn_is_adain_plus_concat(tiny_model, clip_vae, conds, two_refs):
    maps = reference_maps(tiny_model, clip_vae, adain_points(tiny_model))
    both = ksample(apply_reference_patch(tiny_model, two_refs, mode="adain+attn", style_fidelity=0.0), conds,
                   LATENT)
    concat = apply_reference_patch(tiny_model, two_refs, mode="concat", style_fidelity=0.0)
    expected = sample_with_hooks(tiny_model, conds, maps, [1.0, 1.0], extra=concat)
    torch.testing.assert_close(both, expected.to(both.dtype), rtol=1e-3, atol=2e-3)


def test_adain_leaves_the_uncond_chunk_alone_at_full_style_fidelity(tiny_model, conds, two_refs):
    plain_rec, rec = [], []
    ksample(tiny_model, conds, LATENT, record=plain_rec)
    ksample(apply_reference_patch(tiny_model, two_refs, mode="adain"), conds, LATENT, record=rec)
    assert torch.equal(plain_rec[0][1], rec[0][1])  # uncond untouched (style_fidelity 1, the default)
    assert (plain_rec[0][0] - rec[0][0]).abs().max() > 1e-4


def test_every_step_bank_takes_its_statistics_at_each_step(tiny_model, clip_vae, conds, two_refs):
    clip, vae = clip_vae
    step_bank = build_reference_bank(tiny_model, vae, clip, prepare_references(references(), 768, 6),
                                     "every step", "parts2whole")
    once = ksample(apply_reference_patch(tiny_model, two_refs, mode="adain"), conds, LATENT)
    step = ksample(apply_reference_patch(tiny_model, step_bank, mode="adain"), conds, LATENT)
    assert torch.isfinite(step).all() and (step - once).abs().max() > 1e-4  # noised statistics differ


def test_a_zero_weight_leaves_that_reference_out(tiny_model, clip_vae, conds, two_refs):
    clip, vae = clip_vae
    second = build_reference_bank(tiny_model, vae, clip, prepare_references(references()[1:], 768, 6),
                                  "once at t=0", "parts2whole")
    for mode in ("concat", "adain"):
        weighted = ksample(apply_reference_patch(tiny_model, two_refs, mode=mode, reference_weights="face=0"),
                           conds, LATENT)
        alone = ksample(apply_reference_patch(tiny_model, second, mode=mode), conds, LATENT)
        torch.testing.assert_close(weighted, alone, rtol=1e-3, atol=1e-3)  # a batch of two vs one in the writer


def test_linear_in_starts_at_zero_strength(tiny_model, conds, two_refs):
    plain_rec, rec = [], []
    ksample(tiny_model, conds, LATENT, record=plain_rec)
    ksample(apply_reference_patch(tiny_model, two_refs, weight_type="linear in"), conds, LATENT, record=rec)
    assert torch.equal(plain_rec[0][0], rec[0][0])  # first step: progress 0, factor 0, the references are off
    out_rec = []
    ksample(apply_reference_patch(tiny_model, two_refs, weight_type="linear out"), conds, LATENT, record=out_rec)
    assert (plain_rec[0][0] - out_rec[0][0]).abs().max() > 1e-4  # linear out: full strength at the first step


def test_style_fidelity_between_mixes_the_uncond_pass(tiny_model, conds, two_refs):
    recs = {}
    for fidelity in (0.0, 0.5, 1.0):
        recs[fidelity] = []
        ksample(apply_reference_patch(tiny_model, two_refs, style_fidelity=fidelity), conds, LATENT,
                record=recs[fidelity])
    first = {f: r[0][1] for f, r in recs.items()}  # the uncond prediction at the first step (same input)
    assert (first[0.5] - first[1.0]).abs().max() > 1e-5 and (first[0.5] - first[0.0]).abs().max() > 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="adain", block_set="custom", custom_blocks="output_3"), r"AdaIN cannot act on block output_3"),
    (dict(mode="adain+attn", block_set="custom", custom_blocks="input_0"), r"names no block with self-attention"),
    (dict(reference_weights="1, 2, 3"), r"reference_weights has 3 weights but the bank has 2 references"),
    (dict(reference_weights="shoes=2"), r"no reference is labelled 'shoes'"),
    (dict(reference_weights="face=1, 2"), r"either one number per reference or label=weight pairs"),
    (dict(weight_type="sometimes"), r"weight_type must be one of"),
    (dict(style_fidelity=1.5), r"style_fidelity must be in 0..1"),
])
def test_bad_controls_name_the_input(tiny_model, two_refs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_reference_patch(tiny_model, two_refs, **kwargs)


def test_a_bank_without_statistics_is_refused_for_adain(tiny_model, two_refs):
    old = dataclasses.replace(two_refs, stats=None)
    with pytest.raises(ValueError, match=r"holds no statistics for block input_2"):
        apply_reference_patch(tiny_model, old, mode="adain")
    apply_reference_patch(tiny_model, old, mode="concat")  # attention modes do not need them


def test_adain_on_a_once_bank_warns_and_an_every_step_bank_does_not(tiny_model, clip_vae, two_refs):
    """The likeness benchmark found that clean-reference statistics at every step wash the picture out."""
    from humanref.pipelines import notices

    clip, vae = clip_vae
    step_bank = build_reference_bank(tiny_model, vae, clip, prepare_references(references(), 768, 6),
                                     "every step", "parts2whole")
    for mode in ("adain", "adain+attn"):
        with notices.collect() as warnings:
            apply_reference_patch(tiny_model, two_refs, mode=mode)
        assert len(warnings) == 1 and "timing 'every step'" in warnings[0] and warnings[0].startswith(mode)
        with notices.collect() as warnings:
            apply_reference_patch(tiny_model, step_bank, mode=mode)
            apply_reference_patch(tiny_model, two_refs, mode="concat")
        assert warnings == []
