"""training/loop.py on Accelerate with several processes: 2 CPU processes (gloo, started by ``accelerate launch``
as in the docs) against 1 process in this one.

References: the single-process run of the same model and data with the batch of both processes together (the
gradient of a mean over 2b examples is the mean of the two b-example gradients, so only the rounding of the
sums differs), the same comparison in float64 (where that rounding vanishes), the data order of
``EpochSampler`` and the seed formula of ``step_generator`` for what each process saw and drew, and an
uninterrupted 2-process run for a resumed one (bit-identical).

This file is also the worker the launcher starts: ``python this_file.py MODE FOLDER``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from humanref.training.loop import EpochSampler, LoopConfig, step_generator, train

SEED = 11
STEPS = 5
LR = 0.02


class Data(torch.utils.data.Dataset):
    """Random regression examples; an item remembers its (epoch, index) so the test can see the sharding."""

    def __init__(self, size=13):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        epoch, i = item
        return {"x": self.x[i], "y": self.y[i], "id": epoch * 1000 + i}


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items]),
            "id": [i["id"] for i in items]}


class MLPTask:
    """A 4-8-1 tanh MLP on a deterministic loss; records the examples and the step generator's first draw of
    every compute_loss call. ``sigint_at`` = (rank, call): that process sends itself Ctrl-C in that call."""

    kind = "mlp"

    def __init__(self, dtype=torch.float32, sigint_at=None, rank=0):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
        self.dtype = dtype
        self.sigint_at = sigint_at
        self.rank = rank
        self.calls = []  # (ids, first draw)

    def modules(self):
        return [self.model]

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": LR}]

    def to(self, device):
        self.model.to(device)

    def set_gradient_checkpointing(self, enabled):
        pass

    def compute_loss(self, batch, generator, autocast):
        self.calls.append((list(batch["id"]), float(torch.rand(1, generator=generator))))
        if self.sigint_at == (self.rank, len(self.calls)):
            os.kill(os.getpid(), signal.SIGINT)
        with autocast():
            pred = self.model(batch["x"].to(self.dtype))[:, 0]
        loss = ((pred - batch["y"].to(self.dtype)) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def save(self, path, metadata):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, path,
                  metadata={k: str(v) for k, v in metadata.items()})

    def load(self, path):
        self.model.load_state_dict(load_file(path))

    def sample_grid(self, batch, generator, autocast):
        return torch.rand(4, 6, 3, generator=generator)

    def settings(self):
        return {"kind": self.kind, "dtype": str(self.dtype)}


class UnusedParameterTask(MLPTask):
    """A trainable module that never reaches the loss (as the garment writer's last LoRA): DDP must be told."""

    unused_parameters = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.idle = torch.nn.Linear(2, 2).to(self.dtype)

    def modules(self):
        return [self.model, self.idle]

    def param_groups(self):
        return [{"params": list(self.model.parameters()) + list(self.idle.parameters()), "lr": LR}]


def config(work, batch, accumulation=1, **kw):
    base = dict(work_dir=str(work), max_steps=STEPS, batch_size=batch, gradient_accumulation=accumulation,
                checkpoint_every=0, sample_every=0, log_every=1, seed=SEED, max_grad_norm=1.0, device="cpu")
    base.update(kw)
    return LoopConfig(**base)


# ---- the worker (run by accelerate launch) ---------------------------------------------------------------------
RUNS = {  # name: (dtype, batch per process, accumulation)
    "fp32": (torch.float32, 2, 1),
    "fp64": (torch.float64, 2, 1),
    "fp32_accum": (torch.float32, 2, 2),
}


def worker(mode: str, folder: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    record = {}
    if mode == "train":
        for name, (dtype, batch, accumulation) in RUNS.items():
            task = MLPTask(dtype, rank=rank)
            train(task, Data(), collate, config(os.path.join(folder, name), batch, accumulation),
                  os.path.join(folder, f"{name}.safetensors"))
            record[name] = task.calls
        task = UnusedParameterTask(torch.float32, rank=rank)
        train(task, Data(), collate, config(os.path.join(folder, "unused"), 2),
              os.path.join(folder, "unused.safetensors"))
        record["unused"] = [float((p - q).abs().max()) for p, q in zip(task.idle.parameters(),
                                                                       UnusedParameterTask().idle.parameters())]
        # rank 1 alone gets Ctrl-C during its 3rd step: both processes stop after step 3, rank 0 saves it
        task = MLPTask(torch.float32, sigint_at=(1, 3), rank=rank)
        try:
            train(task, Data(), collate, config(os.path.join(folder, "interrupted"), 2),
                  os.path.join(folder, "interrupted.safetensors"))
            record["interrupted"] = "not interrupted"
        except KeyboardInterrupt:
            record["interrupted"] = len(task.calls)
    else:  # resume the interrupted run in fresh processes
        task = MLPTask(torch.float32, rank=rank)
        train(task, Data(), collate, config(os.path.join(folder, "interrupted"), 2, resume="latest"),
              os.path.join(folder, "resumed.safetensors"))
        record["resumed"] = task.calls
    with open(os.path.join(folder, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(record, f)


# ---- the tests ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, folder) -> list[dict]:
    """``accelerate launch --multi_gpu --num_processes 2`` of this file; the trainer asks for the CPU (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(free_port()), __file__, mode, str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = []
    for rank in (0, 1):
        with open(os.path.join(folder, f"{mode}_rank{rank}.json")) as f:
            records.append(json.load(f))
    return records


def params(path) -> torch.Tensor:
    sd = load_file(str(path))
    return torch.cat([sd[k].flatten().double() for k in sorted(sd)])


def test_two_processes_equal_one_with_both_batches_and_resume_exactly(tmp_path):
    two = launch("train", tmp_path)
    torch.set_num_threads(1)
    one = {}
    for name, (dtype, batch, accumulation) in RUNS.items():
        task = MLPTask(dtype)
        train(task, Data(), collate, config(tmp_path / f"one_{name}", batch * 2 * accumulation),
              str(tmp_path / f"one_{name}.safetensors"))
        one[name] = task.calls

    # the data: per step, the two processes together took the single process's batch, without overlap
    for name, (_, batch, accumulation) in RUNS.items():
        stream = iter(EpochSampler(len(Data()), SEED))
        for step in range(STEPS):
            expected = [e * 1000 + i for e, i in (next(stream) for _ in range(2 * batch * accumulation))]
            assert one[name][step][0] == expected
            seen = [i for rank in (0, 1) for ids, _ in two[rank][name][step * accumulation:(step + 1) * accumulation]
                    for i in ids]
            assert sorted(seen) == sorted(expected) and len(set(seen)) == len(seen), (name, step)
    # the random numbers: each process its own generator per step, process 0 the single-process one
    for rank in (0, 1):
        for step in range(STEPS):
            draw = float(torch.rand(1, generator=step_generator(SEED, step, rank)))
            assert two[rank]["fp32"][step][1] == draw
    assert two[0]["fp32"][0][1] == one["fp32"][0][1] != two[1]["fp32"][0][1]

    # the weights. float64: the two ways of averaging the gradient differ by rounding only (~1e-16 relative),
    # which 5 AdamW steps keep far below 1e-12. float32: rounding of ~6e-8 relative per gradient; an AdamW step
    # moves a parameter by at most ~lr, and a relative change d of the gradient changes the step by about d lr
    # (m / sqrt(v) is scale-free), so after 5 steps the difference is a few 5 * lr * 6e-8 ~ 1e-8, plus the
    # rounding of the parameters themselves (~6e-8 of values ~0.5) -> atol 1e-6. The runs must also have moved
    # (by > 1e-3), so an equality that would hold without training is not what is measured.
    start = MLPTask(torch.float64).model.state_dict()
    start = torch.cat([start[k].flatten().double() for k in sorted(start)])
    for name in RUNS:
        a, b = params(tmp_path / f"{name}.safetensors"), params(tmp_path / f"one_{name}.safetensors")
        diff = float((a - b).abs().max())
        print(f"{name}: max |2 processes - 1 process| = {diff:.3e}")
        assert float((b - start).abs().max()) > 1e-3
        assert diff <= (1e-12 if name == "fp64" else 1e-6), (name, diff)
    # a trainable module outside the loss: trained along, left as it was (same weights as the plain run)
    assert two[0]["unused"] == two[1]["unused"] == [0.0, 0.0]
    assert torch.equal(params(tmp_path / "unused.safetensors"), params(tmp_path / "fp32.safetensors"))
    # a different data order gives a clearly different result (the comparison can fail)
    task = MLPTask(torch.float32)
    train(task, Data(), collate, config(tmp_path / "other", 4, seed=SEED + 1), str(tmp_path / "other.safetensors"))
    assert float((params(tmp_path / "other.safetensors") - params(tmp_path / "fp32.safetensors")).abs().max()) > 1e-4

    # Ctrl-C on one process: both stopped after step 3 (rank 1 had started no 4th step), the main one saved it
    assert two[0]["interrupted"] == two[1]["interrupted"] == 3
    work = tmp_path / "interrupted"
    assert sorted(os.listdir(work / "checkpoints")) == ["step_0000003.safetensors", "step_0000003.state.pt"]
    events = [json.loads(line) for line in open(work / "log.jsonl")]
    assert [e["step"] for e in events if e["event"] == "interrupted"] == [3]
    assert not (tmp_path / "interrupted.safetensors").exists()
    # resumed in fresh processes: steps 3 and 4 on the same data and random numbers, the same final weights
    resumed = launch("resume", tmp_path)
    for rank in (0, 1):
        assert resumed[rank]["resumed"] == two[rank]["fp32"][3:]
    assert torch.equal(params(tmp_path / "resumed.safetensors"), params(tmp_path / "fp32.safetensors"))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
