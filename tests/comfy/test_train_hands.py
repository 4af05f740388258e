"""training/ hand generator on a tiny SD1.5 base (320-channel one-level UNet, the session's CLIP and VAE).

References: ComfyUI's own UNet for the diffusers conversion; the written file loaded by the node's loader and
run by ComfyUI (UNet with c_concat, mask head on the VAE decoder) for the trained model; an uninterrupted run
for resuming.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import NOGRAD, cached_load_base, tiny_base, tiny_checkpoint, tiny_unet_ldm

from humanref.training.base import SD15_SCALE, base_from_state_dict, build_unet


def hand_batch(root, count=2, resolution=64, **config):
    from humanref.training.hands.data import HandDataConfig, HandDataset, collate, hand_samples
    from humanref.training.synthetic import write_hand_dataset

    write_hand_dataset(str(root), count=count)
    ds = HandDataset(hand_samples(str(root))[0], HandDataConfig(resolution=resolution, **config))
    return collate([ds[(0, i)] for i in range(count)])


@pytest.fixture(scope="module")
def base(clip_vae):
    return tiny_base(clip_vae)


def test_the_diffusers_unet_is_comfyuis_unet(base):
    import comfy.sd

    unet = build_unet(base)
    comfy_unet = comfy.sd.load_diffusion_model_state_dict(dict(tiny_unet_ldm())).model.diffusion_model.float()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 768, generator=g)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, comfy_unet(x, t, ctx), rtol=1e-4, atol=1e-4)


def test_base_checks(clip_vae):
    from humanref.pipelines.loading.comfy_unet import unet_shapes
    from humanref.pipelines.synthetic.base import random_like, sdxl_unet_config

    sdxl = {f"model.diffusion_model.{k}": v for k, v in random_like(unet_shapes(sdxl_unet_config()), 0).items()}
    with pytest.raises(ValueError, match="the trainers fine-tune SD1.5 checkpoints"):
        base_from_state_dict(sdxl, "xl.safetensors", *clip_vae)
    with pytest.raises(ValueError, match="not a single-file SD checkpoint"):
        base_from_state_dict({"conv_in.weight": torch.zeros(1)}, "unet.safetensors", *clip_vae)


def test_conv_in_keeps_the_latent_channels(base):
    from humanref.training.hands.trainer import HandTask, HandTrainConfig

    task = HandTask(base, HandTrainConfig(resolution=64))
    w = task.unet.conv_in.weight.detach()
    assert w.shape[1] == 15 and torch.equal(w[:, :4], base.unet["conv_in.weight"])
    assert w[:, 4:].abs().max() > 0
    zeros = HandTask(base, HandTrainConfig(resolution=64, conv_in_init="zeros")).unet.conv_in.weight.detach()
    assert not zeros[:, 4:].any()


def train_steps(task, batch, steps, lr):
    opt = torch.optim.AdamW([p for g in task.param_groups() for p in g["params"]], lr=lr, foreach=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["latents"].shape, generator=g)
    timesteps = torch.tensor([150, 650])
    history = []
    for _ in range(steps):
        loss, parts = task.compute_loss(batch, torch.Generator().manual_seed(1), NOGRAD, noise=noise,
                                        timesteps=timesteps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in parts.items()})
    return history


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """The tiny generator saved before and after a few steps on a fixed batch (noise and timesteps fixed)."""
    from humanref.training.base import vae_encode
    from humanref.training.hands.trainer import HandTask, HandTrainConfig

    folder = tmp_path_factory.mktemp("hand-train")
    batch = hand_batch(folder / "data", mask_dropout=0.0)
    batch["latents"] = vae_encode(base.vae, batch["image"], SD15_SCALE, torch.Generator().manual_seed(0))
    task = HandTask(base, HandTrainConfig(resolution=64, mask_head_lr=1e-3))
    task.save(str(folder / "initial.safetensors"), {})
    history = train_steps(task, batch, 4, lr=3e-4)
    task.save(str(folder / "trained.safetensors"), {"step": "4"})
    return task, history, folder, batch


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(trained):
    _, history, _, _ = trained
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"], history
    assert last["ldm"] < first["ldm"] and last["mask"] < first["mask"], history
    assert first["loss"] == pytest.approx(first["ldm"] + 0.5 * first["mask"], rel=1e-5)


def test_the_written_file_is_the_trained_model_in_comfyui(trained, clip_vae):
    """Loaded by the node's loader, ComfyUI's UNet (condition as c_concat) and the mask head on the VAE
    decoder give what the training model gives."""
    from humanref.pipelines.hands.weights import load_hand_generator, predict_mask

    task, _, folder, batch = trained
    weights = load_hand_generator(str(folder / "trained.safetensors"))
    assert weights.metadata["mask_activation"] == "clamp" and weights.metadata["step"] == "4"
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    cond = torch.rand(2, 11, 8, 8, generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        comfy_eps = weights.model.model.diffusion_model.float()(torch.cat([x, cond], 1), t, ctx)
        torch.testing.assert_close(task.predict(x, cond, t, ctx), comfy_eps, rtol=1e-4, atol=1e-4)
        samples = torch.randn(2, 4, 8, 8, generator=g)  # ComfyUI latents (unscaled)
        expected = task.mask_logits(samples * SD15_SCALE).clamp(0, 1)
    torch.testing.assert_close(predict_mask(weights.head, clip_vae[1], samples), expected, rtol=1e-4, atol=1e-4)


def test_the_trained_file_changes_the_hand_generator_nodes_output(trained, clip_vae, conds):
    from humanref.nodes.hands import HandGenerator
    from humanref.pipelines.hands.weights import load_hand_generator

    _, _, folder, _ = trained
    pose = {"people": [{"pose_keypoints_2d": [0.0] * 54,
                        "hand_left_keypoints_2d": [v for j in range(21) for v in (40 + 2 * (j % 5), 60 - 2 * j, 1.0)]}],
            "canvas_width": 120, "canvas_height": 100}
    outs = []
    for name in ("initial", "trained"):
        gen = load_hand_generator(str(folder / f"{name}.safetensors"))
        res = HandGenerator.execute(model=None, positive=conds[0], negative=conds[1], vae=clip_vae[1], person=0,
                                    seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
                                    resolution=64, crop_scale=1.5, control_strength=1.0, mask_dilation=8.0,
                                    heatmap_sigma=0.0, min_confidence=0.3, coordinates="pixels", width=0, height=0,
                                    pose_json=__import__("json").dumps(pose), hand_generator=gen).result
        outs.append(res)
    assert outs[0][0].shape == outs[1][0].shape == (1, 64, 64, 3)
    assert (outs[0][0] - outs[1][0]).abs().max() > 1e-3
    assert (outs[0][1] - outs[1][1]).abs().max() > 1e-4


def test_the_hand_generator_cli_trains_resumes_and_writes_everything(clip_vae, tmp_path, capsys, monkeypatch):
    """`python -m humanref train hand-generator` end to end on the tiny checkpoint: checkpoints, a sample grid,
    the file; then resumed from the last checkpoint (exactness of resuming: tests/unit/test_train_loop.py)."""
    from humanref.cli import main
    from humanref.pipelines.hands.weights import load_hand_generator
    from humanref.training import base as base_module
    from humanref.training.synthetic import write_hand_dataset

    # the checkpoint is really read, once per session: the runs share what was read
    monkeypatch.setattr(base_module, "load_base", cached_load_base)
    write_hand_dataset(str(tmp_path / "data"), count=3)
    work, out = tmp_path / "work", tmp_path / "hands.safetensors"
    common = ["train", "hand-generator", "--data", str(tmp_path / "data"), "--base", tiny_checkpoint(clip_vae),
              "--out", str(out), "--work-dir", str(work), "--resolution", "64", "--batch-size", "2", "--lr", "1e-4",
              "--workers", "0", "--log-every", "1", "--checkpoint-every", "1", "--sample-count", "1",
              "--sample-steps", "1"]
    assert main(common + ["--max-steps", "2", "--sample-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "3 usable sample(s)" in err and "step 2/2: loss" in err and "mask" in err
    assert sorted(os.listdir(work / "checkpoints")) == ["step_0000001.safetensors", "step_0000001.state.pt"]
    assert os.listdir(work / "samples") == ["step_0000002.png"]
    assert load_hand_generator(str(work / "checkpoints" / "step_0000001.safetensors")).metadata["step"] == "1"
    assert load_hand_generator(str(out)).metadata["step"] == "2"
    # an existing output is refused before anything is loaded; --resume continues from the last checkpoint
    assert main(common + ["--max-steps", "3"]) == 2
    assert "exists; give --overwrite" in capsys.readouterr().err
    assert main(common + ["--max-steps", "3", "--sample-every", "0", "--resume", "latest", "--overwrite"]) == 0
    assert "at step 1" in capsys.readouterr().err
    assert load_hand_generator(str(out)).metadata["step"] == "3"
