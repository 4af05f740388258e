"""HandGenerator both backends on tiny models, the trained layout loader/converter, and the canvas node."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from humanref.pipelines.hands.condition import downscale_condition, hand_condition, keypoint_mask
from humanref.pipelines.hands.generator import SamplingOptions, generate_trained, generate_training_free, plan
from humanref.pipelines.hands.keypoints import parse_pose, select_person

SIZE = 64  # crop side in tests: an 8x8 latent


def pose(far: bool = True):
    """Normalised POSE_KEYPOINT with two hands, far apart (two crops) or close (one crop)."""
    def hand(cx, cy):
        pts = [(cx, cy, 1.0)]
        for f in range(5):
            for j in range(4):
                pts.append((cx + (f - 2) * 0.02, cy - 0.02 * (j + 1), 0.9))
        return [v for p in pts for v in p]

    body = [0.0] * 54
    return [{"people": [{"pose_keypoints_2d": body, "hand_left_keypoints_2d": hand(0.3, 0.5),
                         "hand_right_keypoints_2d": hand(0.8 if far else 0.38, 0.5)}],
             "canvas_width": 160, "canvas_height": 120}]


def crops(far=True):
    frame, person = select_person(parse_pose(pose(far)))
    return plan(frame, person, SIZE, 1.5)


@pytest.fixture(scope="module")
def hand_file(comfy_env, tmp_path_factory):
    from humanref.pipelines.synthetic.hands import write_tiny_hand_generator

    path = tmp_path_factory.mktemp("hands") / "tiny-hands.safetensors"
    write_tiny_hand_generator(str(path))
    return str(path)


def record_concat(model, store):
    import comfy.patcher_extension as pe

    rec = model.clone()

    def wrapper(executor, x, t, c_concat=None, *args, **kwargs):
        store.append(c_concat)
        return executor(x, t, c_concat, *args, **kwargs)

    rec.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "humanref_test_concat", wrapper)
    return rec


def test_trained_checkpoint_loads_and_generates_image_and_mask(hand_file, clip_vae, conds):
    from dataclasses import replace

    from humanref.pipelines.hands.weights import load_hand_generator

    _, vae = clip_vae
    weights = load_hand_generator(hand_file)
    assert weights.model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 15
    hands = crops(far=True)
    assert len(hands.crops) == 2
    seen: list = []
    recorded = replace(weights, model=record_concat(weights.model, seen))
    captured: list = []  # the decoder's own middle-block output during vae.decode (a forward hook, test only)
    handle = vae.first_stage_model.decoder.mid.block_2.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        images, masks = generate_trained(recorded, conds[0], conds[1], vae, hands, SamplingOptions(steps=2, cfg=3.0))
    finally:
        handle.remove()
    assert images.shape == (2, SIZE, SIZE, 3) and masks.shape == (2, SIZE, SIZE)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    # the 11 condition channels reach the UNet: the condition downscaled bilinearly to the latent, per crop
    cond = torch.stack([hand_condition(hands.person, c) for c in hands.crops])
    expected = downscale_condition(cond, SIZE // 8, SIZE // 8)
    assert seen and all(c is not None and c.shape[1:] == (11, 8, 8) for c in seen)
    for c in seen:
        for k in range(c.shape[0] // 2):
            assert torch.allclose(c[2 * k:2 * k + 2].float(), expected, atol=1e-6)
    # the mask is the head (re-implemented here with functional ops) on the decoder's middle-block output
    h = captured[0].float()
    for i, layer in enumerate((0, 2, 4, 6)):
        conv = weights.head.layers[layer]
        h = F.conv_transpose2d(h, conv.weight, conv.bias, stride=2)
        if i < 3:
            h = F.silu(h)
    ref = F.avg_pool2d(h, 2).clamp(0, 1)[:, 0]
    assert torch.allclose(masks, ref, atol=1e-5)
    assert (masks - masks.mean()).abs().max() > 0  # not a constant


def test_layout_errors(tmp_path, comfy_env):
    from safetensors.torch import save_file

    from humanref.pipelines.hands.weights import load_hand_generator, split_checkpoint

    with pytest.raises(ValueError, match="metadata format"):
        split_checkpoint({}, {"format": "other"}, "x.safetensors")
    with pytest.raises(ValueError, match="expected 15"):
        split_checkpoint({"unet.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                          "mask_head.0.weight": torch.zeros(1)},
                         {}, "x")
    with pytest.raises(ValueError, match="diffusers key names"):
        split_checkpoint({"unet.conv_in.weight": torch.zeros(320, 15, 3, 3)}, {}, "x")
    with pytest.raises(ValueError, match="no mask_head"):
        split_checkpoint({"unet.input_blocks.0.0.weight": torch.zeros(320, 15, 3, 3)}, {}, "x")
    with pytest.raises(ValueError, match="unexpected keys"):
        split_checkpoint({"vae.x": torch.zeros(1)}, {}, "x")
    bad = tmp_path / "bad_head.safetensors"
    save_file({"unet.input_blocks.0.0.weight": torch.zeros(320, 15, 3, 3),
               "mask_head.0.weight": torch.zeros(512, 256, 3, 3)}, str(bad))
    with pytest.raises(ValueError, match="mask_head"):
        load_hand_generator(str(bad))


def test_converter_from_diffusers_round_trips(tiny_sd15_config, tmp_path):
    import comfy.utils

    from humanref.pipelines.hands.weights import (
        MaskHead,
        convert_diffusers,
        head_state_dict,
        mask_head_from_state_dict,
        split_checkpoint,
    )
    from humanref.pipelines.loading.comfy_unet import unet_shapes
    from humanref.pipelines.synthetic.base import random_like

    cfg = dict(tiny_sd15_config, in_channels=15)
    ldm = random_like(unet_shapes(cfg), 3)
    to_ldm = comfy.utils.unet_to_diffusers(cfg)
    diffusers_sd = {d: ldm[k] for d, k in to_ldm.items() if k in ldm}  # a diffusers-format fine-tune
    head = MaskHead()
    head_sd = {k.removeprefix("mask_head."): v for k, v in head_state_dict(head).items()}  # a bare nn.Sequential
    sd, meta = convert_diffusers(diffusers_sd, head_sd)
    unet, hsd, meta = split_checkpoint(sd, meta, "converted")
    assert set(unet) == set(ldm) and all(torch.equal(unet[k], ldm[k]) for k in ldm)
    assert meta["format"] == "humanref-hand-generator"
    loaded = mask_head_from_state_dict(hsd)
    x = torch.randn(1, 512, 2, 2)
    assert torch.equal(loaded(x), head(x)) and loaded(x).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="expected 15"):
        bad = dict(diffusers_sd, **{"conv_in.weight": torch.zeros(32, 4, 3, 3)})
        convert_diffusers(bad, head_sd)

    # the same conversion from files, through `python -m humanref convert-hand-generator`
    from comfyenv import COMFYUI_PATH
    from safetensors.torch import load_file, save_file

    from humanref.cli import main as cli_main

    save_file({k: v.contiguous() for k, v in diffusers_sd.items()}, tmp_path / "unet.safetensors")
    torch.save(head_sd, tmp_path / "head.pt")
    out = tmp_path / "hand.safetensors"
    argv = ["convert-hand-generator", str(tmp_path / "unet.safetensors"), str(tmp_path / "head.pt"), str(out),
            "--comfyui", COMFYUI_PATH]
    assert cli_main(argv) == 0
    written = load_file(out)
    assert set(written) == set(sd) and all(torch.equal(written[k], sd[k]) for k in sd)
    with pytest.raises(SystemExit):  # an existing output is never overwritten
        cli_main(argv)


def test_training_free_backend_and_canvas(tiny_model, clip_vae, conds, controlnet):
    from humanref.pipelines.hands.canvas import assemble_canvas, body_skeleton

    _, vae = clip_vae
    hands = crops(far=False)
    assert len(hands.crops) == 1 and hands.crops[0].hands == ("left", "right")
    opts = SamplingOptions(seed=3, steps=2, cfg=3.0)
    images, masks = generate_training_free(tiny_model, conds[0], conds[1], vae, controlnet, hands, opts)
    assert images.shape == (1, SIZE, SIZE, 3)
    assert torch.equal(masks[0], keypoint_mask(hands.person, hands.crops[0], 8.0 * SIZE / 512))
    plain = generate_training_free(tiny_model, conds[0], conds[1], vae, controlnet, hands, opts, strength=0.0)[0]
    assert (plain - images).abs().max() > 1e-3  # the ControlNet acts
    with pytest.raises(ValueError, match="needs an OpenPose ControlNet"):
        generate_training_free(tiny_model, conds[0], conds[1], vae, None, hands, opts)
    canvas, keep = assemble_canvas(images, masks, hands)
    assert canvas.shape == (1, 120, 160, 3) and keep.shape == (1, 120, 160)
    assert keep.max() == 1 and torch.all(canvas[keep == 0] == 0.5)
    wrist = hands.person.left_hand[0]
    assert keep[0, int(wrist[1]), int(wrist[0])] == 1  # the mask sits on the skeleton's hand
    assert body_skeleton(hands).shape == (1, 120, 160, 3)
    with pytest.raises(ValueError, match="one per crop"):
        assemble_canvas(images, masks[:, :32], hands)
