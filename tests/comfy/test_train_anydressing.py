"""training/ garment weights on a tiny SD1.5 base, against the inference path they are trained for.

References: the garment bank that pipelines/garments.py builds from the written file (writer features), the
dual patch of pipelines/reference.py inside a real ComfyUI sampling step (the reader's epsilon), and the
GarmentLoRAExtractor node loading the file from models/garment_weights.
"""
from __future__ import annotations

import pytest
import torch
from helpers import NOGRAD, cached_load_base, ksample, tiny_base, tiny_checkpoint, tiny_unet_ldm

SLOTS = ("upper", "lower")
H, W = 64, 48


def garment_batch(root, count=2, garment_masks=True):
    from humanref.training.anydressing.data import GarmentDataConfig, GarmentDataset, garment_samples
    from humanref.training.anydressing.trainer import collate
    from humanref.training.synthetic import write_garment_dataset

    write_garment_dataset(str(root), SLOTS, count=count, garment_masks=garment_masks)
    ds = GarmentDataset(garment_samples(str(root), SLOTS)[0], SLOTS, GarmentDataConfig(H, W))
    return collate([ds[(0, i)] for i in range(count)])


def make_task(base, **kw):
    from humanref.training.anydressing.trainer import GarmentTask, GarmentTrainConfig

    return GarmentTask(base, GarmentTrainConfig(slots=SLOTS, rank=4, height=H, width=W, **kw))


@pytest.fixture(scope="module")
def comfy_model(comfy_env):
    """The same tiny UNet as a ComfyUI model (the inference side)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(tiny_unet_ldm()))


@pytest.fixture(scope="module")
def trained(clip_vae, tmp_path_factory):
    """Garment weights saved before and after a few steps on a fixed batch (noise and timesteps fixed)."""
    from humanref.training.base import SD15_SCALE, vae_encode

    base = tiny_base(clip_vae)
    folder = tmp_path_factory.mktemp("garment-train")
    batch = garment_batch(folder / "data")
    task = make_task(base, texture_max_timestep=400)
    batch["latents"] = vae_encode(base.vae, batch["person"], SD15_SCALE, torch.Generator().manual_seed(0))
    batch["garment_latents"] = task.encode_garments(batch["garments"], NOGRAD)
    task.save(str(folder / "initial.safetensors"), {})
    opt = torch.optim.AdamW(task.adapters.parameters(), lr=2e-3, foreach=True)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    history = []
    for _ in range(3):  # t > 400: no texture term here (it costs a VAE decode); tested on its own below
        loss, parts = task.compute_loss(batch, torch.Generator().manual_seed(2), NOGRAD, noise=noise,
                                        timesteps=torch.tensor([450, 700]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in parts.items()})
    task.save(str(folder / "trained.safetensors"), {})
    return task, history, folder, batch


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(trained):
    _, history, _, _ = trained
    first, last = history[0], history[-1]
    assert last["loss"] < 0.9 * first["loss"], history
    assert first["localization"] > 0 and first["texture"] == 0.0  # t > 400 for both samples


def test_the_loss_terms_and_what_trains(trained, monkeypatch):
    from humanref.training.anydressing import trainer as garments_module

    task, _, _, batch = trained
    seen = []
    real = garments_module.texture_loss

    def recording(pred, target, regions, low, high):
        seen.append(pred.shape[0])
        return real(pred, target, regions, low, high)

    monkeypatch.setattr(garments_module, "texture_loss", recording)
    with torch.no_grad():
        _, parts = task.compute_loss(batch, torch.Generator().manual_seed(2), NOGRAD,
                                     timesteps=torch.tensor([100, 700]))
    assert seen == [1]  # only the sample with t <= 400 is decoded for the texture loss
    assert float(parts["texture"]) > 0 and float(parts["localization"]) > 0
    assert float(parts["loss"]) == pytest.approx(float(parts["ldm"]) + 0.01 * float(parts["localization"])
                                                 + 0.001 * float(parts["texture"]), rel=1e-5)
    # the UNet (writer and reader) is frozen; the adapters (outside it) are all that trains
    assert not any(p.requires_grad for p in task.unet.parameters())
    assert [g["params"] for g in task.param_groups()] == [list(task.adapters.parameters())]


def test_gradient_checkpointing_gives_the_same_gradients(trained):
    """Writer captures and reader maps are side outputs of checkpointed blocks: recomputation must not change
    what the loss sees or what reaches the adapters."""
    task, _, _, batch = trained
    grads = []
    for enabled in (False, True):
        task.set_gradient_checkpointing(enabled)
        task.adapters.zero_grad()
        loss, _ = task.compute_loss(batch, torch.Generator().manual_seed(3), NOGRAD, timesteps=torch.tensor([500, 900]))
        loss.backward()
        # None: parameters nothing depends on (the last writer block's LoRA acts after the last capture)
        grads.append([None if p.grad is None else p.grad.clone() for p in task.adapters.parameters()])
    task.set_gradient_checkpointing(False)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(g is not None and bool(g.abs().max() > 0) for g in grads[0]) >= 8


def test_the_written_file_is_the_trained_model_at_inference(trained, comfy_model, clip_vae):
    """Writer: the GarmentLoRAExtractor bank from the file = the training writer's captures. Reader: one real
    ComfyUI sampling step with the dual patch = the training reader's epsilon at that x, sigma and context."""
    import nodes

    from humanref.pipelines.anydressing.pipeline import build_garment_bank, prepare_garments
    from humanref.pipelines.anydressing.weights import load_garment_weights
    from humanref.pipelines.references.patch import apply_reference_patch
    from humanref.training.anydressing.model import ReaderPass

    task, _, folder, batch = trained
    weights = load_garment_weights(str(folder / "trained.safetensors"))
    images = [((batch["garments"][0, j] + 1) / 2).permute(1, 2, 0) for j in range(2)]
    masks = [batch["garment_masks"][0, j] for j in range(2)]
    garments = prepare_garments([(j + 1, images[j][None], masks[j][None], s) for j, s in enumerate(SLOTS)], 768)
    bank = build_garment_bank(comfy_model, clip_vae[1], garments, weights)
    with torch.no_grad():
        writer = task.run_writer(task.encode_garments(batch["garments"][:1], NOGRAD),
                                 batch["garment_masks"][:1].flatten(0, 1), 2, NOGRAD)
    keys = list(bank.features)
    assert len(keys) == len(task.comfy_paths) == 4
    dropped = 0
    for i, key in enumerate(keys):
        x, wts = writer.captured[i]
        for j in range(2):
            kept = wts[j] > 0
            torch.testing.assert_close(x[j][kept] * wts[j][kept].unsqueeze(-1), bank.features[key][j].tokens,
                                       rtol=1e-4, atol=1e-4)
            dropped += bank.features[key][j].dropped
    assert dropped > 0  # the garment masks really leave tokens out on both sides

    records = []

    def wrapper(apply, args):
        out = apply(args["input"], args["timestep"], **args["c"])
        records.append((args["input"], args["timestep"], args["c"]["c_crossattn"], out))
        return out

    patched = apply_reference_patch(comfy_model, bank, mode="dual", strength=0.7).clone()
    patched.set_model_unet_function_wrapper(wrapper)
    ctx = task.text([batch["caption"][0]])
    nodes.common_ksampler(patched, 3, 1, 1.0, "euler", "normal", [[ctx, {}]], [[task.text([""]), {}]],
                          {"samples": torch.zeros(1, 4, H // 8, W // 8)})
    x, sigma, c, denoised = records[0]
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        t = comfy_model.model.model_sampling.timestep(sigma)
        reader = ReaderPass(writer, 2, 0.7, task.grids((H // 8, W // 8)))
        eps = task.reader_eps(x / (s ** 2 + 1).sqrt(), t, c, reader, NOGRAD)
        plain = task.reader_eps(x / (s ** 2 + 1).sqrt(), t, c, None, NOGRAD)
    expected = (x - denoised) / s
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-2  # the garments matter


@pytest.fixture()
def weights_folder(trained, monkeypatch):
    import folder_paths

    _, _, folder, _ = trained
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "garment_weights", ([str(folder)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def test_the_trained_file_changes_the_garment_extractors_output(weights_folder, comfy_model, clip_vae, conds):
    from humanref.nodes.anydressing import GarmentLoRAExtractor
    from humanref.nodes.references import MaskedSharedAttentionPatch

    g = torch.Generator().manual_seed(0)
    garments = {"garment_1": torch.rand(1, H, W, 3, generator=g), "slot_1": "upper",
                "garment_2": torch.rand(1, H, W, 3, generator=g), "slot_2": "lower"}
    outs, banks = [], []
    for name in ("initial.safetensors", "trained.safetensors"):
        bank = GarmentLoRAExtractor.execute(writer=comfy_model, vae=clip_vae[1], garment_weights=name, max_side=768,
                                            **garments).result[0]
        patched = MaskedSharedAttentionPatch.execute(model=comfy_model, reference_bank=bank, mode="dual", strength=0.7,
                                                     start_percent=0.0, end_percent=1.0, blocks="all",
                                                     custom_blocks="", uncond_sees_references=False).result[0]
        banks.append(bank)
        outs.append(ksample(patched, conds, torch.zeros(1, 4, H // 8, W // 8), steps=2))
    last = list(banks[0].features)[-1]
    assert (banks[0].features[last][1].tokens - banks[1].features[last][1].tokens).abs().max() > 1e-4
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_the_garments_cli_trains_end_to_end(clip_vae, tmp_path, capsys, monkeypatch):
    import os

    from humanref.cli import main
    from humanref.pipelines.anydressing.weights import load_garment_weights
    from humanref.training import base as base_module
    from humanref.training.synthetic import write_garment_dataset

    monkeypatch.setattr(base_module, "load_base", cached_load_base)
    write_garment_dataset(str(tmp_path / "data"), SLOTS, count=3)
    out = tmp_path / "dressing.safetensors"
    argv = ["train", "garments", "--data", str(tmp_path / "data"), "--base", tiny_checkpoint(clip_vae),
            "--slots", "upper,lower", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--height", str(H),
            "--width", str(W), "--rank", "2", "--batch-size", "2", "--max-steps", "2", "--workers", "0",
            "--log-every", "1", "--checkpoint-every", "1", "--sample-every", "2", "--sample-count", "1",
            "--sample-steps", "1", "--texture-max-timestep", "999"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "3 usable sample(s)" in err and "step 2/2: ldm" in err and "localization" in err
    weights = load_garment_weights(str(out))
    assert weights.slots == SLOTS and weights.rank == 2 and weights.base_model == "SD15"
    assert len(weights.widths) == 4  # every transformer block of the tiny UNet
    assert os.listdir(tmp_path / "work" / "samples") == ["step_0000002.png"]
    # a dataset problem stops the run before any model is loaded
    os.remove(str(tmp_path / "data" / "masks" / "lower" / "look_0001.png"))
    assert main(argv + ["--overwrite"]) == 1
    assert "masks/lower/look_0001.png: missing mask of the lower garment" in capsys.readouterr().err
