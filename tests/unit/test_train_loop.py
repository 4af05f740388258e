"""training/loop.py with a small task (a linear model on random data) in place of a diffusion model: the
files it writes, exact resume (the same final weights as an uninterrupted run), settings checks, interrupts."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from humanref.training.loop import LoopConfig, train


class Data(torch.utils.data.Dataset):
    def __init__(self, size=5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        epoch, i = item
        return {"x": self.x[i], "y": self.y[i], "epoch": epoch}


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items]),
            "epoch": [i["epoch"] for i in items]}


class LinearTask:
    kind = "linear"

    def __init__(self, interrupt_at=None, rank=1):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.calls = 0
        self.interrupt_at = interrupt_at
        self.rank = rank

    def modules(self):
        return [self.model]

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 0.05}]

    def to(self, device):
        self.model.to(device)

    def set_gradient_checkpointing(self, enabled):
        pass

    def compute_loss(self, batch, generator, autocast):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        noise = 0.1 * torch.randn(batch["y"].shape, generator=generator)  # the step's own random numbers
        with autocast():
            pred = self.model(batch["x"])[:, 0]
        loss = ((pred - batch["y"] - noise) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def save(self, path, metadata):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, path,
                  metadata={k: str(v) for k, v in metadata.items()})

    def load(self, path):
        self.model.load_state_dict(load_file(path))

    def sample_grid(self, batch, generator, autocast):
        return torch.rand(4, 6, 3, generator=generator)

    def settings(self):
        return {"kind": self.kind, "rank": self.rank}


def config(work, **kw):
    base = dict(work_dir=str(work), max_steps=5, batch_size=2, checkpoint_every=2, keep_checkpoints=2,
                sample_every=3, sample_count=2, log_every=1, seed=7)
    base.update(kw)
    return LoopConfig(**base)


def test_files_checkpoints_and_exact_resume(tmp_path):
    work = tmp_path / "work"
    summary = train(LinearTask(), Data(), collate, config(work), str(tmp_path / "a.safetensors"), {"note": "x"})
    assert summary["step"] == 5 and summary["last_checkpoint"].endswith("step_0000004.safetensors")
    assert sorted(os.listdir(work / "checkpoints")) == ["step_0000002.safetensors", "step_0000002.state.pt",
                                                        "step_0000004.safetensors", "step_0000004.state.pt"]
    assert sorted(os.listdir(work / "samples")) == ["step_0000003.png", "step_0000005.png"]
    events = [json.loads(line)["event"] for line in open(work / "log.jsonl")]
    assert events[0] == "start" and events.count("step") == 5 and events[-1] == "done"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x", "step": "5"}
    # from the step-2 checkpoint: same data order, random numbers and optimizer state -> the same weights
    resumed = train(LinearTask(), Data(), collate, config(work, resume=str(work / "checkpoints" /
                                                                            "step_0000002.safetensors")),
                    str(tmp_path / "b.safetensors"))
    assert resumed["step"] == 5
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different run from the start differs (the test can fail)
    other = train(LinearTask(), Data(), collate, config(tmp_path / "w2", seed=8), str(tmp_path / "c.safetensors"))
    assert other["step"] == 5
    c = load_file(str(tmp_path / "c.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_other_settings_and_interrupts_save_a_checkpoint(tmp_path):
    work = tmp_path / "work"
    train(LinearTask(), Data(), collate, config(work, max_steps=3), str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="resume with the same settings"):
        train(LinearTask(rank=2), Data(), collate, config(work, resume="latest"), str(tmp_path / "b.safetensors"))
    work2 = tmp_path / "work2"
    with pytest.raises(KeyboardInterrupt):
        train(LinearTask(interrupt_at=4), Data(), collate, config(work2, checkpoint_every=0, sample_every=0),
              str(tmp_path / "c.safetensors"))
    assert sorted(os.listdir(work2 / "checkpoints")) == ["step_0000003.safetensors", "step_0000003.state.pt"]
    assert not (tmp_path / "c.safetensors").exists()
    done = train(LinearTask(), Data(), collate, config(work2, checkpoint_every=0, sample_every=0, resume="latest"),
                 str(tmp_path / "c.safetensors"))
    assert done["step"] == 5


def test_bad_loop_settings():
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        config("w", batch_size=0).check()
    with pytest.raises(ValueError, match="--mixed-precision must be one of"):
        config("w", mixed_precision="fp8").check()
    with pytest.raises(ValueError, match="--device 'gpu0' is not a torch device"):
        train(LinearTask(), Data(), collate, config("w", device="gpu0"), "x.safetensors")
