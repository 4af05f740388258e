"""nodes/mimicbrush.py and pipelines/mimicbrush.py through the nodes: a whole edit on the tiny synthetic
checkpoint, the crop option, untouched inputs, and the errors a user sees for bad input."""
from __future__ import annotations

import pytest
import torch

from humanref.nodes.mimicbrush import MimicBrushConditioning, MimicBrushLoader, MimicBrushPaste
from humanref.pipelines.mimicbrush.images import blur_mask

RES = 64
OPTS = dict(keep_shape=False, writer="once at t=0 (fast)", resolution=RES, crop_to_mask=False, crop_margin=16,
            depth_scale=1.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, comfy_env):
    import folder_paths

    from humanref.pipelines.synthetic.mimicbrush import mimicbrush_checkpoint

    folder = tmp_path_factory.mktemp("models_mimicbrush")
    torch.save(mimicbrush_checkpoint(seed=9), str(folder / "mimicbrush.bin"))
    folder_paths.add_model_folder_path("mimicbrush", str(folder))
    assert "mimicbrush.bin" in MimicBrushLoader.define_schema().inputs[0].options
    return MimicBrushLoader.execute("mimicbrush.bin").result


def inputs(h=40, w=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, h, w, 3, generator=g)
    mask = torch.zeros(1, h, w)
    mask[:, 12:28, 30:50] = 1.0
    reference = torch.rand(1, 30, 20, 3, generator=g)
    return image, mask, reference


def condition(loaded, clip_vae, image, mask, reference, **kw):
    model, parts = loaded
    return MimicBrushConditioning.execute(model, parts, clip_vae[1], image, mask, reference, **dict(OPTS, **kw)).result


def run_edit(loaded, clip_vae, image, mask, reference, **kw):
    import nodes

    model, pos, neg, latent, edit = condition(loaded, clip_vae, image, mask, reference, **kw)
    samples = nodes.common_ksampler(model, 3, 2, 5.0, "ddim", "ddim_uniform", pos, neg, latent)[0]["samples"]
    decoded = clip_vae[1].decode(samples)
    return latent, decoded, MimicBrushPaste.execute(decoded, edit).result[0]


def test_schemas_validate():
    for node in (MimicBrushLoader, MimicBrushConditioning, MimicBrushPaste):
        schema = node.define_schema()
        schema.validate()
        assert schema.node_id.startswith("HumanRef_MimicBrush")


def test_whole_edit_keeps_the_image_outside_the_blurred_mask(loaded, clip_vae):
    image, mask, reference = inputs()
    model_before = loaded[0].model_options
    latent, decoded, out = run_edit(loaded, clip_vae, image, mask, reference)
    assert latent["samples"].shape == (1, 4, RES // 8, RES // 8) and decoded.shape == (1, RES, RES, 3)
    assert out.shape == image.shape
    alpha = blur_mask(mask)[0]
    assert torch.equal(out[0][alpha == 0], image[0][alpha == 0])  # untouched where the official alpha is 0
    assert float((out[0][mask[0] > 0] - image[0][mask[0] > 0]).abs().mean()) > 0.01  # edited inside
    assert loaded[0].model_options is model_before
    assert "wrappers" not in str(model_before.get("transformer_options", {}).keys())


def test_crop_to_mask_edits_only_a_square_around_the_mask(loaded, clip_vae):
    image, mask, reference = inputs(h=96, w=160)
    model, pos, neg, latent, edit = condition(loaded, clip_vae, image, mask, reference, crop_to_mask=True)
    box = edit.box
    assert (box.height, box.width) == (20 + 32, 20 + 32)  # max(16, 20) + 2 * 16 margin
    _, _, out = run_edit(loaded, clip_vae, image, mask, reference, crop_to_mask=True)
    outside = torch.ones(96, 160, dtype=torch.bool)
    outside[box.top:box.bottom, box.left:box.right] = False
    assert torch.equal(out[0][outside], image[0][outside])


def test_conditioning_carries_image_prompt_and_nine_channels(loaded, clip_vae):
    image, mask, reference = inputs()
    _, pos, neg, latent, _ = condition(loaded, clip_vae, image, mask, reference)
    assert pos[0][0].shape == (1, 257, 768) and neg[0][0].shape == (1, 257, 768)
    assert not torch.allclose(pos[0][0], neg[0][0])
    concat = pos[0][1]["noise_concat"]
    assert concat.shape == (1, 9, RES // 8, RES // 8) and torch.equal(concat, neg[0][1]["noise_concat"])
    assert set(concat[0, 0].unique().tolist()) <= {0.0, 1.0} and float(concat[0, 0].sum()) > 0


def test_keep_shape_uses_the_depth_and_off_uses_the_black_depth(loaded, clip_vae):
    image, mask, reference = inputs()
    depth = torch.rand(1, 20, 36, 3)  # half size, same aspect: resized
    on = condition(loaded, clip_vae, image, mask, reference, keep_shape=True, depth=depth)[1][0][1]["noise_concat"]
    off = condition(loaded, clip_vae, image, mask, reference)[1][0][1]["noise_concat"]
    black = condition(loaded, clip_vae, image, mask, reference,
                      depth_of_black=torch.full((1, 20, 20, 3), 0.3))[1][0][1]["noise_concat"]
    assert torch.equal(on[:, :5], off[:, :5]) and not torch.allclose(on[:, 5:], off[:, 5:])
    assert not torch.allclose(black[:, 5:], off[:, 5:])


@pytest.mark.parametrize("change,message", [
    (lambda i, m, r: (i, m[:, :20], r), r"mask is 72x20 but image is 72x40"),
    (lambda i, m, r: (i, m * 0, r), r"mask is empty"),
    (lambda i, m, r: (torch.cat([i, i]), m, r), r"image has 2 images"),
    (lambda i, m, r: (i, m, r[..., :2]), r"reference must be an IMAGE"),
])
def test_bad_input_names_the_input(loaded, clip_vae, change, message):
    image, mask, reference = change(*inputs())
    with pytest.raises(ValueError, match=message):
        condition(loaded, clip_vae, image, mask, reference)


def test_bad_depth_and_model_are_clear_errors(loaded, clip_vae, tiny_model):
    image, mask, reference = inputs()
    with pytest.raises(ValueError, match="keep_shape is on but depth is not connected"):
        condition(loaded, clip_vae, image, mask, reference, keep_shape=True)
    with pytest.raises(ValueError, match="depth is 40x40 but image is 72x40"):
        condition(loaded, clip_vae, image, mask, reference, keep_shape=True, depth=torch.rand(1, 40, 40, 3))
    with pytest.raises(ValueError, match="4-channel input"):
        MimicBrushConditioning.execute(tiny_model, loaded[1], clip_vae[1], image, mask, reference, **OPTS)


def test_reference_with_alpha_is_composited_over_white(loaded, clip_vae):
    image, mask, reference = inputs()
    rgba = torch.cat([reference, torch.zeros(1, 30, 20, 1)], dim=-1)  # fully transparent
    white = torch.ones(1, 30, 20, 3)
    a = condition(loaded, clip_vae, image, mask, rgba)[1][0][0]
    b = condition(loaded, clip_vae, image, mask, white)[1][0][0]
    torch.testing.assert_close(a, b)


def test_conditioning_reports_its_stages(loaded, clip_vae, monkeypatch):
    """Issue 12, item 4: MimicBrush Conditioning moved no progress bar; now one step per stage, in order."""
    import comfy.utils

    from humanref.pipelines.mimicbrush.pipeline import SETUP_STAGES

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total)))
    condition(loaded, clip_vae, *inputs())
    assert seen == [(i, len(SETUP_STAGES)) for i in range(1, len(SETUP_STAGES) + 1)] and len(SETUP_STAGES) == 4
