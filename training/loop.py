"""The training loop both trainers share: AdamW, mixed precision, gradient accumulation and clipping,
checkpoints in the final file layout plus an optimizer state, exact resume, sample grids, logs.

A task (``HandTask``, ``GarmentTask``) supplies the model side through a small protocol; the loop owns the
order of data (a per-epoch permutation from the seed), the per-step random generator (seeded by the step) and
the files. A checkpoint is ``checkpoints/step_NNNNNNN.safetensors`` in the very layout the nodes load (so any
checkpoint can be tried in ComfyUI) next to ``step_NNNNNNN.state.pt`` (optimizer, step, settings; read back
with ``weights_only``).
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

STATE_FORMAT = "humanref-training-state"
STATE_VERSION = 1
PRECISIONS = ("auto", "no", "fp16", "bf16")


class TrainingTask(Protocol):
    kind: str

    def modules(self) -> Sequence[torch.nn.Module]: ...  # put in train() mode; the trainable ones
    def param_groups(self) -> list[dict]: ...
    def to(self, device: torch.device) -> None: ...
    def set_gradient_checkpointing(self, enabled: bool) -> None: ...
    def compute_loss(self, batch: dict, generator: torch.Generator, autocast: Any) -> tuple[Tensor, dict]: ...
    def save(self, path: str, metadata: dict) -> None: ...
    def load(self, path: str) -> None: ...
    def sample_grid(self, batch: dict, generator: torch.Generator, autocast: Any) -> Tensor: ...
    def settings(self) -> dict: ...  # what a resumed run must match (kind, resolution, slots, rank, ...)


@dataclass
class LoopConfig:
    work_dir: str
    max_steps: int
    batch_size: int
    lr_warmup_steps: int = 0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    device: str = "auto"
    mixed_precision: str = "auto"
    gradient_checkpointing: Optional[bool] = None  # None: on with CUDA
    workers: int = 0
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 500
    sample_count: int = 4
    log_every: int = 10
    resume: Optional[str] = None

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "sample_every", "log_every", "lr_warmup_steps", "workers", "sample_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build / machine")
    return device


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = fp32). CPU always trains in fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "no":
        return None
    if device.type != "cuda":
        raise ValueError(f"--mixed-precision {name} needs a CUDA device (CPU training runs in fp32); use "
                         "--mixed-precision no or auto")
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--mixed-precision bf16: this GPU does not support bfloat16; use fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]):
    """A factory of autocast contexts (a fresh one per use)."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random numbers of one optimisation step (noise, timesteps, dropouts): a function of seed and step."""
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1)


class EpochSampler(Sampler):
    """(epoch, index) pairs: a fresh permutation of the dataset per epoch, from the seed; can start mid-way."""

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.start = start  # examples already consumed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 65_537 + epoch))
            for i in order[offset:].tolist():
                yield (epoch, i)
            position = (epoch + 1) * self.size

    def __len__(self) -> int:  # infinite in practice; DataLoader only needs a number
        return sys.maxsize


def checkpoint_paths(work_dir: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(work_dir, "checkpoints", "step_*.state.pt")):
        try:
            found.append((int(os.path.basename(path)[5:12]), path))
        except ValueError:
            continue
    return sorted(found)


def find_resume(resume: str, work_dir: str) -> tuple[str, str]:
    """(weights .safetensors, state .state.pt) for --resume latest | a checkpoint file | a checkpoints folder."""
    if resume == "latest" or os.path.isdir(resume):
        base = work_dir if resume == "latest" else (os.path.dirname(resume.rstrip("/"))
                                                   if os.path.basename(resume.rstrip("/")) == "checkpoints"
                                                   else resume)
        found = checkpoint_paths(base)
        if not found:
            raise ValueError(f"--resume {resume}: no checkpoints in {os.path.join(base, 'checkpoints')}")
        state = found[-1][1]
    elif resume.endswith(".state.pt"):
        state = resume
    elif resume.endswith(".safetensors"):
        state = resume[: -len(".safetensors")] + ".state.pt"
    else:
        raise ValueError(f"--resume {resume}: give 'latest', a checkpoints folder or a step_N.safetensors file")
    weights = state[: -len(".state.pt")] + ".safetensors"
    for path in (state, weights):
        if not os.path.isfile(path):
            raise ValueError(f"--resume: {path} does not exist")
    return weights, state


def save_checkpoint(task: TrainingTask, optimizer: torch.optim.Optimizer, scaler: Any, step: int, work_dir: str,
                    keep: int, metadata: dict) -> str:
    folder = os.path.join(work_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"step_{step:07d}")
    task.save(stem + ".safetensors", dict(metadata, step=str(step)))
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "settings": task.settings(),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {}}
    torch.save(state, stem + ".state.pt.part")
    os.replace(stem + ".state.pt.part", stem + ".state.pt")
    for _step, path in checkpoint_paths(work_dir)[:-keep]:
        for p in (path, path[: -len(".state.pt")] + ".safetensors"):
            if os.path.exists(p):
                os.remove(p)
    return stem + ".safetensors"


def load_state(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a HumanRef training state (format {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')} is not supported")
    return state


def save_png(image: Tensor, path: str) -> None:
    """[H, W, 3] in 0..1 -> PNG."""
    from PIL import Image

    a = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    Image.fromarray(a).save(path)


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class Log:
    def __init__(self, work_dir: str, stream: Any = None) -> None:
        self.path = os.path.join(work_dir, "log.jsonl")
        self.stream = stream  # None: sys.stderr at the time of writing

    def __call__(self, record: dict, text: Optional[str] = None) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if text is not None:
            print(text, file=self.stream or sys.stderr, flush=True)


@dataclass
class _Run:
    """What the steps of one :func:`train` call share."""

    task: TrainingTask
    config: LoopConfig
    device: torch.device
    autocast: Any
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    trainable: list[Tensor]
    log: Log
    metadata: dict
    step: int = 0
    last: dict = field(default_factory=dict)  # the last step's losses and gradient norm
    step_seconds: list[float] = field(default_factory=list)  # since the last log line
    last_checkpoint: Optional[str] = None

    @property
    def per_step(self) -> int:
        return self.config.batch_size * self.config.gradient_accumulation

    def checkpoint(self) -> str:
        self.last_checkpoint = save_checkpoint(self.task, self.optimizer, self.scaler, self.step,
                                               self.config.work_dir, self.config.keep_checkpoints, self.metadata)
        return self.last_checkpoint


def _optimizer(task: TrainingTask, config: LoopConfig, device: torch.device, dtype: Optional[torch.dtype]
               ) -> tuple[torch.optim.Optimizer, Optional[torch.amp.GradScaler], list[Tensor]]:
    """AdamW over the task's groups (each remembers its base lr for the warm-up), a scaler for fp16."""
    groups = task.param_groups()
    for g in groups:
        g.setdefault("weight_decay", config.weight_decay)
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, foreach=True)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return optimizer, scaler, [p for g in groups for p in g["params"]]


def _resume(run: _Run) -> None:
    """Weights, optimizer and scaler state and the step of ``--resume``; the settings must match this run's."""
    weights, state_path = find_resume(run.config.resume, run.config.work_dir)
    state = load_state(state_path)
    if state["settings"] != run.task.settings():
        raise ValueError(f"--resume {state_path}: the checkpoint was trained with {state['settings']}, this run "
                         f"has {run.task.settings()}; resume with the same settings")
    run.task.load(weights)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    run.log({"event": "resume", "step": run.step, "from": weights}, f"resumed from {weights} at step {run.step}")


def _optimizer_step(run: _Run, batches: Iterator[dict]) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation`` batches; returns the mean loss parts."""
    config, optimizer, scaler = run.config, run.optimizer, run.scaler
    factor = min(1.0, (run.step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    optimizer.zero_grad(set_to_none=True)
    gen = step_generator(config.seed, run.step)
    totals: dict[str, float] = {}
    for _ in range(config.gradient_accumulation):
        batch = _move(next(batches), run.device)
        loss, parts = run.task.compute_loss(batch, gen, run.autocast)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {run.step}: the loss is {float(loss)} ({parts}); lower --lr, or use "
                                     "--mixed-precision bf16/no instead of fp16")
        scaled = loss / config.gradient_accumulation
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v) / config.gradient_accumulation
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm if config.max_grad_norm > 0
                                               else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    run.step += 1
    run.last = dict(totals, grad_norm=float(grad_norm))
    return totals


def _periodic(run: _Run, losses: dict[str, float], sample_batch: Optional[dict]) -> None:
    """After a step: the log line, the checkpoint and the sample grid that are due."""
    config, step = run.config, run.step
    if config.log_every and (step % config.log_every == 0 or step == config.max_steps):
        speed = run.per_step * len(run.step_seconds) / max(sum(run.step_seconds), 1e-9)
        run.step_seconds.clear()
        text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        run.log({"event": "step", "step": step, **run.last, "lr": run.optimizer.param_groups[0]["lr"],
                 "samples_per_s": speed}, f"step {step}/{config.max_steps}: {text} ({speed:.2f} samples/s)")
    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
        path = run.checkpoint()
        run.log({"event": "checkpoint", "step": step, "path": path}, f"checkpoint {path}")
    if sample_batch is not None and (step % config.sample_every == 0 or step == config.max_steps):
        _samples(run, sample_batch)


def _samples(run: _Run, sample_batch: dict) -> None:
    """The sample grid of this step (always from the same seed), modules in eval mode meanwhile."""
    path = os.path.join(run.config.work_dir, "samples", f"step_{run.step:07d}.png")
    modules = run.task.modules()
    for m in modules:
        m.eval()
    with torch.no_grad():
        grid = run.task.sample_grid(_move(sample_batch, run.device), torch.Generator().manual_seed(run.config.seed),
                                    run.autocast)
    for m in modules:
        m.train()
    save_png(grid, path)
    run.log({"event": "samples", "step": run.step, "path": path}, f"samples {path}")


def train(task: TrainingTask, dataset: Any, collate: Any, config: LoopConfig, out_path: str,
          metadata: Optional[dict] = None, log_stream: Any = None) -> dict:
    """Run the loop to config.max_steps and write ``out_path``; returns a summary (last losses, speed, files)."""
    config.check()
    device = resolve_device(config.device)
    dtype = resolve_precision(config.mixed_precision, device)
    checkpointing = device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing
    os.makedirs(os.path.join(config.work_dir, "samples"), exist_ok=True)
    log = Log(config.work_dir, log_stream)

    task.to(device)
    task.set_gradient_checkpointing(checkpointing)
    optimizer, scaler, trainable = _optimizer(task, config, device, dtype)
    run = _Run(task, config, device, autocast_for(device, dtype), optimizer, scaler, trainable, log,
               dict(metadata or {}))
    if config.resume:
        _resume(run)
    loader = DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate, num_workers=config.workers,
                        sampler=EpochSampler(len(dataset), config.seed, start=run.step * run.per_step),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)
    sample_batch = None
    if config.sample_every and config.sample_count:
        sample_batch = collate([dataset[(0, i % len(dataset))] for i in range(config.sample_count)])
    for m in task.modules():
        m.train()
    log({"event": "start", "kind": task.kind, "step": run.step, "max_steps": config.max_steps,
         "device": str(device), "precision": str(dtype or torch.float32), "gradient_checkpointing": checkpointing,
         "loop": asdict(config), "settings": task.settings()},
        f"{task.kind}: {len(dataset)} samples, steps {run.step}..{config.max_steps}, batch {config.batch_size} x "
        f"{config.gradient_accumulation}, {device}, {dtype or torch.float32}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}")
    t_start, samples_seen = time.monotonic(), 0
    try:
        while run.step < config.max_steps:
            t0 = time.monotonic()
            losses = _optimizer_step(run, batches)
            samples_seen += run.per_step
            run.step_seconds.append(time.monotonic() - t0)
            _periodic(run, losses, sample_batch)
    except KeyboardInterrupt:
        if run.step > 0:
            path = run.checkpoint()
            log({"event": "interrupted", "step": run.step, "path": path},
                f"interrupted: saved {path}; continue with --resume latest")
        raise
    task.save(out_path, dict(run.metadata, step=str(run.step)))
    elapsed = time.monotonic() - t_start
    summary = {"event": "done", "step": run.step, "out": out_path, "last": run.last, "seconds": elapsed,
               "samples_per_s": samples_seen / elapsed if elapsed > 0 else 0.0, "last_checkpoint": run.last_checkpoint}
    log(summary, f"wrote {out_path} after {run.step} steps")
    return summary
