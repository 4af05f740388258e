"""Parts2Whole nodes and pipeline in-process: loader through models/parts2whole, sampling, preprocessing
against PIL (the official code's image library), bad input."""

import numpy as np
import pytest
import torch
from helpers import ksample
from PIL import Image

from humanref.pipelines.notices import collect
from humanref.pipelines.parts2whole.pipeline import (
    LABELS,
    MASK_SOURCES,
    PartInput,
    PoseFeaturePatch,
    prepare_parts,
    prepare_pose,
)

W, H = 48, 64


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, comfy_env):
    from humanref.pipelines.synthetic.parts2whole import tiny_release_unet_config, write_release

    base = tmp_path_factory.mktemp("models") / "parts2whole"
    write_release(str(base / "tiny"), tiny_release_unet_config(), seed=9)
    (base / "not_a_release").mkdir()
    return base


@pytest.fixture
def registered(models_dir, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "parts2whole", ([str(models_dir)], set()))
    return models_dir


@pytest.fixture(scope="module")
def loaded(models_dir):
    import folder_paths

    from humanref.nodes.parts2whole import Parts2WholeLoader

    saved = folder_paths.folder_names_and_paths.get("parts2whole")
    folder_paths.folder_names_and_paths["parts2whole"] = ([str(models_dir)], set())
    try:
        return Parts2WholeLoader.execute(release="tiny", weight_dtype="fp32").result
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("parts2whole")
        else:
            folder_paths.folder_names_and_paths["parts2whole"] = saved


def _img(seed, size=(H, W), channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size[0], size[1], channels, generator=g)


def _apply(loaded, clip_vae, conds, **kw):
    from humanref.nodes.parts2whole import Parts2WholeApply

    model, ref, enc, p2w = loaded
    clip, vae = clip_vae
    args = dict(model=model, reference_unet=ref, parts2whole=p2w, image_encoder=enc, vae=vae, clip=clip,
                positive=conds[0], width=W, height=H, batch_size=1, mode="as trained", mask_source=MASK_SOURCES[0])
    args.update(kw)
    return Parts2WholeApply.execute(**args).result


def test_schemas(registered):
    from humanref.nodes.parts2whole import Parts2WholeApply, Parts2WholeLoader

    for node in (Parts2WholeLoader, Parts2WholeApply):
        node.define_schema().validate()
    loader = Parts2WholeLoader.define_schema()
    assert loader.inputs[0].options == ["tiny"]  # not_a_release has no unet/config.json
    apply = Parts2WholeApply.define_schema()
    labels = [i for i in apply.inputs if i.id.startswith("label_")]
    assert [i.default for i in labels] == list(LABELS) and all(i.options == list(LABELS) for i in labels)
    assert {i.id: i.default for i in apply.inputs if i.id in ("width", "height")} == {"width": 512, "height": 768}


def test_loader_errors(registered):
    from humanref.nodes.parts2whole import Parts2WholeLoader

    with pytest.raises(ValueError, match=r"not_a_release is not a Parts2Whole release"):
        Parts2WholeLoader.execute(release="not_a_release", weight_dtype="default")
    with pytest.raises(ValueError, match=r"release 'missing' not found .*models/parts2whole/missing/"):
        Parts2WholeLoader.execute(release="missing", weight_dtype="default")
    with pytest.raises(ValueError, match="folder name"):
        Parts2WholeLoader.execute(release="../tiny", weight_dtype="default")


def test_sampling_uses_parts_pose_and_modes(loaded, clip_vae, conds):
    model = loaded[0]
    before = dict(model.model_options["transformer_options"]) if "transformer_options" in model.model_options else {}
    parts = dict(image_1=_img(1), mask_1=torch.ones(1, H, W), image_5=_img(2), label_5="face")
    patched, positive, latent = _apply(loaded, clip_vae, conds, pose=_img(3), **parts)
    assert latent["samples"].shape == (1, 4, H // 8, W // 8)
    assert positive is conds[0]
    assert (model.model_options.get("transformer_options", {})) == before  # the input model is untouched
    to = patched.model_options["transformer_options"]
    assert len(to["patches_replace"]["attn1"]) == 7 and len(to["patches_replace"]["attn2"]) == 7
    assert len(to["patches"]["input_block_patch"]) == 1
    neg = conds[1]
    base = ksample(model, (conds[0], neg), latent["samples"], cfg=3.5, steps=2, sampler="ddim",)
    out = ksample(patched, (positive, neg), latent["samples"], cfg=3.5, steps=2, sampler="ddim")
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-3
    no_pose = _apply(loaded, clip_vae, conds, **parts)[0]
    out_np = ksample(no_pose, (positive, neg), latent["samples"], cfg=3.5, steps=2, sampler="ddim")
    assert (out - out_np).abs().max() > 1e-3
    released, pos_r, _ = _apply(loaded, clip_vae, conds, pose=_img(3), mode="as released", **parts)
    assert pos_r is not conds[0]
    clip = clip_vae[0]
    first = clip.encode_from_tokens(clip.tokenize(LABELS[0]))
    assert torch.equal(pos_r[0][0], first)  # the prompt is replaced by the first part's label
    out_r = ksample(released, (pos_r, neg), latent["samples"], cfg=3.5, steps=2, sampler="ddim")
    assert (out - out_r).abs().max() > 1e-3


def test_bad_input(loaded, clip_vae, conds):
    with pytest.raises(ValueError, match="no part images"):
        _apply(loaded, clip_vae, conds)
    with pytest.raises(ValueError, match="mask_2 is connected but image_2 is not"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), mask_2=torch.ones(1, H, W))
    with pytest.raises(ValueError, match=r"label_1 is 'hat'; Parts2Whole knows only the six labels"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), label_1="hat")
    with pytest.raises(ValueError, match=r"7 part images were given \(image_1: 4, image_2: 3\) but Parts2Whole "
                                         "takes at most 6"):
        _apply(loaded, clip_vae, conds, image_1=torch.cat([_img(i) for i in range(4)]),
               image_2=torch.cat([_img(i) for i in range(3)]))
    with pytest.raises(ValueError, match="pose has 2 images"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), pose=torch.cat([_img(1), _img(2)]))
    with pytest.raises(ValueError, match=r"mask_1 is empty"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), mask_1=torch.zeros(1, H, W))
    with pytest.raises(ValueError, match="multiples of 8"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), width=50)
    with pytest.raises(ValueError, match="parts2whole must come from the Parts2Whole loader"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), parts2whole="x")


def _pil_reference(rgba: np.ndarray, width: int, height: int):
    """The official preprocessing with PIL: RGBA, resize (bicubic), composite over white, alpha = mask."""
    img = np.asarray(Image.fromarray(rgba, "RGBA").resize((width, height))).astype(np.float32) / 255.0
    alpha = img[..., 3:4]
    return img[..., :3] * alpha + (1 - alpha), alpha[..., 0]


def test_preprocessing_matches_pil():
    g = np.random.default_rng(0)
    rgba = g.integers(0, 256, (90, 70, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[20:70, 10:60, 3] = 255
    t = torch.from_numpy(rgba.astype(np.float32) / 255.0)[None]
    expect_img, expect_mask = _pil_reference(rgba, W, H)
    # a 4-channel IMAGE: alpha composited over white, alpha as the mask
    part = prepare_parts([PartInput(1, t, None, "face")], H, W)[0]
    assert part.reference.image.shape == (H, W, 3) and part.clip_image.shape == (90, 70, 3)
    assert np.abs(part.reference.image.numpy() - expect_img).mean() < 0.03
    assert np.abs(part.reference.mask.numpy() - expect_mask).mean() < 0.03
    # LoadImage: RGB + MASK = 1 - alpha
    part2 = prepare_parts([PartInput(1, t[..., :3], 1.0 - t[..., 3], "face")], H, W, MASK_SOURCES[1])[0]
    assert torch.allclose(part2.reference.image, part.reference.image, atol=1e-5)
    assert torch.allclose(part2.reference.mask, part.reference.mask, atol=1e-5)
    # a part mask: no compositing, the mask resized to the output
    part3 = prepare_parts([PartInput(1, t[..., :3], t[..., 3], "face")], H, W)[0]
    rgb_only = np.asarray(Image.fromarray(rgba[..., :3]).resize((W, H))).astype(np.float32) / 255.0
    assert np.abs(part3.reference.image.numpy() - rgb_only).mean() < 0.03
    assert torch.allclose(part3.reference.mask, part.reference.mask, atol=1e-5)


def test_pose_resizing():
    from humanref.pipelines.parts2whole.pose_guider import PoseGuider

    pose = prepare_pose(_img(1, (100, 80)), H, W)
    assert pose.shape == (1, 3, H, W)
    guider = PoseGuider(32)
    for p in guider.parameters():
        torch.nn.init.normal_(p, std=0.1)
    patch = PoseFeaturePatch(guider, pose)
    h = torch.zeros(2, 32, H // 8, W // 8)
    out = patch(h, {"block": ("input", 0)})
    assert torch.allclose(out[0], guider(pose)[0]) and torch.equal(out[0], out[1])
    assert patch(h, {"block": ("input", 1)}) is h
    with collect() as warnings:
        other = patch(torch.zeros(1, 32, 4, 4), {"block": ("input", 0)})
    assert other.shape == (1, 32, 4, 4) and "the pose is stretched to the image" in warnings[0]


def test_an_earlier_attn2_replace_is_kept(loaded):
    """An attn2 replace set before (IP-Adapter style) gives the text part; the image term is added to it."""
    from humanref.attention.decoupled import decoupled_cross_attention, pad_image_tokens, project_image_tokens
    from humanref.pipelines.parts2whole.pipeline import DecoupledAttn2Replace, apply_decoupled

    model, _, _, release = loaded
    calls = []

    def earlier(q, k, v, extra_options):
        calls.append(q.shape)
        return torch.full_like(q, 0.5)

    clone = model.clone()
    clone.set_model_attn2_replace(earlier, "middle", 0, 0)
    tokens = torch.randn(2, release.image_dim)
    apply_decoupled(clone, release, tokens)
    patch = clone.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    assert isinstance(patch, DecoupledAttn2Replace) and patch.inner is earlier
    q = torch.randn(2, 4, 64)
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "attn_precision": None}
    out = patch(q, torch.randn(2, 77, 64), torch.randn(2, 77, 64), extra)
    wk, wv = release.decoupled[("middle", 0, 0)]

    def sdpa(q, k, v, heads):
        b, n, c = q.shape
        q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    expect = decoupled_cross_attention(q, torch.full_like(q, 0.5),
                                       project_image_tokens(pad_image_tokens(tokens), wk, wv), 8, [1, 0], sdpa)
    assert calls and torch.allclose(out, expect, atol=1e-5)
    assert torch.equal(out[0], torch.full_like(q[0], 0.5))  # the negative pass: the earlier result only


def test_reference_unet_of_another_model_is_named(loaded, clip_vae, conds):
    """Found by the bad-input sweep: a reference_unet that does not match the model failed in the bank check, whose
    message talks about a reference_bank the Parts2Whole node does not have."""
    from humanref.pipelines.synthetic.base import build_model, sd15_unet_config

    other = build_model(sd15_unet_config(model_channels=64, channel_mult=(1,)), seed=2)
    with pytest.raises(ValueError, match=r"reference_unet is SD15 \(.*\) but model is SD15 \(.*\): connect the "
                                         "model and reference_unet outputs of the same Parts2Whole Loader"):
        _apply(loaded, clip_vae, conds, image_1=_img(1), reference_unet=other)
