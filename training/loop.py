"""The training loop both trainers share, on Hugging Face Accelerate: one code path for a CPU, one GPU, several
GPUs or several machines (``python -m humanref train ...`` is one process; ``accelerate launch -m humanref train
...`` runs any number, DDP).

Accelerate owns what is not specific to these models: the processes and devices, mixed precision (autocast and
the fp16 gradient scaler), gradient accumulation (no gradient sync on the accumulating micro-batches), gradient
clipping and the sharding of the data over the processes. The loop owns what is: the order of the data (a
per-epoch permutation from the seed, one global stream that Accelerate deals out batch by batch), the per-step
random generators (a function of seed, step and process index), the AdamW groups and linear warm-up, the files
and the sample grids. A task (``HandTask``, ``GarmentTask``) supplies the model side through a small protocol.

A checkpoint is ``checkpoints/step_NNNNNNN.safetensors`` in the very layout the nodes load (so any checkpoint can
be tried in ComfyUI) next to ``step_NNNNNNN.state.pt`` (optimizer, scaler, step, examples consumed, settings;
read back with ``weights_only``); the main process writes them. Resuming on the same number of processes ends
bit-identical to an uninterrupted run. Ctrl-C asks every process to stop after the current step (the processes
agree on which one), then the main process saves a checkpoint.
"""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

STATE_FORMAT = "humanref-training-state"
STATE_VERSION = 2  # 2 adds "examples" (the data position) and "processes"; 1 (single process) is still read
PRECISIONS = ("auto", "no", "fp16", "bf16")
# process p's step seeds are offset by p * this; torch's CPU generator keeps the seed mod 2**32, and modulo 2**32 no
# two processes' seeds meet within 10 M steps (checked for up to 278 processes)
PROCESS_SEED_STRIDE = 0x9E3779B1


class TrainingTask(Protocol):
    kind: str
    # optional ``unused_parameters = True``: some trainable parameters get no gradient in a step (DDP then
    # looks for them in every step's graph)

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
    batch_size: int  # per process
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


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun, mpirun) started; 1 for a plain run."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def is_main_process() -> bool:
    """Rank 0 of a launched run (from the launcher's environment, before any process group exists)."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build / machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the trainers run on cpu or cuda")
    if device.index is not None and launched_processes() > 1:
        raise ValueError(f"--device {name}: with several processes Accelerate gives each its GPU; give --device cuda "
                         "and choose the GPUs with CUDA_VISIBLE_DEVICES or accelerate launch --gpu_ids")
    return device


def pin_process_device(name: str) -> torch.device:
    """The device of ``--device`` for this process, made current before anything (ComfyUI's CLIP, the VAE) is
    placed: a launched process's own GPU (LOCAL_RANK), as Accelerate will choose it."""
    device = resolve_device(name)
    if device.type == "cuda":
        if launched_processes() > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    return device


def end_processes() -> None:
    """Close the process group of a launched run (the command's last step; torch warns at exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The random numbers of one optimisation step on one process (noise, timesteps, dropouts): a function of
    seed, step and process index (process 0 draws what a single-process run draws)."""
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1 + process * PROCESS_SEED_STRIDE)


class EpochSampler(Sampler):
    """(epoch, index) pairs: a fresh permutation of the dataset per epoch, from the seed; can start mid-way.

    One global stream: Accelerate deals its batches out to the processes in turn (batch i to process
    i mod N), so N processes with batch b see, per step, the examples one process with batch N * b sees."""

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
                    keep: int, metadata: dict, examples: int = 0, processes: int = 1) -> str:
    """The weights in the nodes' layout and the state to resume from (call on the main process only)."""
    folder = os.path.join(work_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"step_{step:07d}")
    task.save(stem + ".safetensors", dict(metadata, step=str(step)))
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "examples": examples,
             "processes": processes, "settings": task.settings(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else {}}
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
    if state.get("version") not in (1, STATE_VERSION):
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
    """log.jsonl and the progress lines; silent on every process but the main one."""

    def __init__(self, work_dir: str, stream: Any = None, enabled: bool = True) -> None:
        self.path = os.path.join(work_dir, "log.jsonl")
        self.stream = stream  # None: sys.stderr at the time of writing
        self.enabled = enabled

    def __call__(self, record: dict, text: Optional[str] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if text is not None:
            print(text, file=self.stream or sys.stderr, flush=True)


class TaskModule(torch.nn.Module):
    """The task's trainable modules as one module whose forward is the task's loss: what Accelerate wraps (DDP
    registers the gradient all-reduce on these parameters and needs the loss computed in its forward)."""

    def __init__(self, task: TrainingTask) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(task.modules())
        self.task = task

    def forward(self, batch: dict, generator: torch.Generator, autocast: Any) -> tuple[Tensor, dict]:
        return self.task.compute_loss(batch, generator, autocast)


class StopRequest:
    """Ctrl-C (SIGINT) while training: the first one asks to stop after the current step, so that no process is
    left in the middle of an optimizer update or a collective; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop now)", file=sys.stderr,
              flush=True)

    def __enter__(self) -> StopRequest:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class _Run:
    """What the steps of one :func:`train` call share."""

    task: TrainingTask
    config: LoopConfig
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # TaskModule as Accelerate prepared it (DDP with several processes)
    optimizer: torch.optim.Optimizer
    trainable: list[Tensor]
    log: Log
    metadata: dict
    step: int = 0
    examples: int = 0  # taken from the data stream by all processes together
    updating: bool = False  # inside the optimizer update: the weights are not those of a step
    last: dict = field(default_factory=dict)  # the last step's losses and gradient norm
    step_seconds: list[float] = field(default_factory=list)  # since the last log line
    last_checkpoint: Optional[str] = None

    @property
    def per_step(self) -> int:
        """Examples per optimizer step, all processes together."""
        return self.config.batch_size * self.config.gradient_accumulation * self.accelerator.num_processes

    def checkpoint(self) -> Optional[str]:
        """Written by the main process; the others only note the path."""
        path = os.path.join(self.config.work_dir, "checkpoints", f"step_{self.step:07d}.safetensors")
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.task, self.optimizer, self.accelerator.scaler, self.step,
                                   self.config.work_dir, self.config.keep_checkpoints, self.metadata, self.examples,
                                   self.accelerator.num_processes)
        self.last_checkpoint = path
        return path


def make_accelerator(config: LoopConfig, unused_parameters: bool = False) -> Any:
    """The Accelerator of one run: device, processes, mixed precision, gradient accumulation.

    ``--mixed-precision`` decides (``auto``: bf16 on CUDA where supported, else fp16; fp32 on the CPU), also
    under ``accelerate launch``. Runs that take the whole machine as one process may call :func:`train` again
    with other settings (Accelerate's process-wide state is reset first); launched processes never reset it.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    device = resolve_device(config.device)
    dtype = resolve_precision(config.mixed_precision, device)
    if launched_processes() == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # Accelerate's single process runs on the current CUDA device
    precision = {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                              gradient_accumulation_steps=config.gradient_accumulation, rng_types=[],
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])
    supported = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type not in supported:
        raise ValueError(f"accelerate launch: {accelerator.distributed_type.value} is not supported by the trainers "
                         "(they call the model's parts directly, which sharded FSDP/DeepSpeed engines do not "
                         "allow); SD1.5 fits one GPU: use data parallel (accelerate launch --multi_gpu)")
    return accelerator


def _optimizer(task: TrainingTask, config: LoopConfig) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """AdamW over the task's groups (each remembers its base lr for the warm-up)."""
    groups = task.param_groups()
    for g in groups:
        g.setdefault("weight_decay", config.weight_decay)
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, foreach=True)
    return optimizer, [p for g in groups for p in g["params"]]


def _resume(task: TrainingTask, config: LoopConfig, optimizer: torch.optim.Optimizer, accelerator: Any
            ) -> tuple[int, int, str]:
    """Weights, optimizer and scaler state of ``--resume`` (every process reads them); the settings must match
    this run's. Returns (step, examples consumed, weights file)."""
    weights, state_path = find_resume(config.resume, config.work_dir)
    state = load_state(state_path)
    if state["settings"] != task.settings():
        raise ValueError(f"--resume {state_path}: the checkpoint was trained with {state['settings']}, this run "
                         f"has {task.settings()}; resume with the same settings")
    task.load(weights)
    optimizer.load_state_dict(state["optimizer"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    # version 1 states come from single-process runs: the position is step x batch x accumulation
    examples = int(state.get("examples", step * config.batch_size * config.gradient_accumulation))
    return step, examples, weights


def _optimizer_step(run: _Run, batches: Iterator[dict]) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation`` batches per process; returns this process's mean loss
    parts. Accelerate scales the loss, skips the gradient all-reduce until the last micro-batch, unscales fp16
    gradients before clipping and steps the scaler."""
    config, optimizer, accelerator = run.config, run.optimizer, run.accelerator
    factor = min(1.0, (run.step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    gen = step_generator(config.seed, run.step, accelerator.process_index)
    totals: dict[str, float] = {}
    grad_norm = None
    for micro in range(config.gradient_accumulation):
        batch = next(batches)
        with accelerator.accumulate(run.model):
            loss, parts = run.model(batch, gen, accelerator.autocast)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {run.step}: the loss is {float(loss)} ({parts}); lower --lr, or use "
                                         "--mixed-precision bf16/no instead of fp16")
            accelerator.backward(loss)
            if accelerator.sync_gradients != (micro == config.gradient_accumulation - 1):
                raise RuntimeError(f"step {run.step}: Accelerate's accumulation is out of step with the loop")
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm
                                                        if config.max_grad_norm > 0 else math.inf)
                run.updating = True
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.updating = False
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v) / config.gradient_accumulation
    run.step += 1
    run.examples += run.per_step
    run.last = dict(totals, grad_norm=float(grad_norm))
    return totals


def _mean_over_processes(run: _Run, losses: dict[str, float]) -> dict[str, float]:
    if run.accelerator.num_processes == 1 or not losses:
        return losses
    values = torch.tensor(list(losses.values()), dtype=torch.float64, device=run.accelerator.device)
    return dict(zip(losses, run.accelerator.reduce(values, reduction="mean").tolist()))


def _stop_agreed(run: _Run, stop: StopRequest) -> bool:
    """Whether any process was asked to stop: the same answer on every process, so all stop after one step."""
    if run.accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)


def _periodic(run: _Run, losses: dict[str, float], sample_batch: Optional[dict]) -> None:
    """After a step: the log line, the checkpoint and the sample grid that are due (every process calls it)."""
    config, step = run.config, run.step
    if config.log_every and (step % config.log_every == 0 or step == config.max_steps):
        losses = _mean_over_processes(run, losses)
        speed = run.per_step * len(run.step_seconds) / max(sum(run.step_seconds), 1e-9)
        run.step_seconds.clear()
        text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        run.log({"event": "step", "step": step, **run.last, **losses, "lr": run.optimizer.param_groups[0]["lr"],
                 "samples_per_s": speed}, f"step {step}/{config.max_steps}: {text} ({speed:.2f} samples/s)")
    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
        path = run.checkpoint()
        run.log({"event": "checkpoint", "step": step, "path": path}, f"checkpoint {path}")
    if sample_batch is not None and (step % config.sample_every == 0 or step == config.max_steps):
        _samples(run, sample_batch)


def _samples(run: _Run, sample_batch: dict) -> None:
    """The sample grid of this step (always from the same seed), modules in eval mode meanwhile; main process."""
    path = os.path.join(run.config.work_dir, "samples", f"step_{run.step:07d}.png")
    modules = run.task.modules()
    for m in modules:
        m.eval()
    with torch.no_grad():
        grid = run.task.sample_grid(_move(sample_batch, run.accelerator.device),
                                    torch.Generator().manual_seed(run.config.seed), run.accelerator.autocast)
    for m in modules:
        m.train()
    save_png(grid, path)
    run.log({"event": "samples", "step": run.step, "path": path}, f"samples {path}")


def train(task: TrainingTask, dataset: Any, collate: Any, config: LoopConfig, out_path: str,
          metadata: Optional[dict] = None, log_stream: Any = None) -> dict:
    """Run the loop to config.max_steps and write ``out_path`` (main process); returns a summary (last losses,
    speed, files) on every process. Call it in every process of a launched run, with the same arguments."""
    config.check()
    accelerator = make_accelerator(config, bool(getattr(task, "unused_parameters", False)))
    device = accelerator.device
    main = accelerator.is_main_process
    checkpointing = device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing
    if main:
        os.makedirs(os.path.join(config.work_dir, "samples"), exist_ok=True)
    log = Log(config.work_dir, log_stream, enabled=main)

    task.to(device)
    task.set_gradient_checkpointing(checkpointing)
    optimizer, trainable = _optimizer(task, config)
    step = examples = 0
    resumed_from = None
    if config.resume:
        step, examples, resumed_from = _resume(task, config, optimizer, accelerator)
    model, optimizer = accelerator.prepare(TaskModule(task), optimizer)
    run = _Run(task, config, accelerator, model, optimizer, trainable, log, dict(metadata or {}), step=step,
               examples=examples)
    if resumed_from is not None:
        log({"event": "resume", "step": run.step, "from": resumed_from},
            f"resumed from {resumed_from} at step {run.step}")
    loader = accelerator.prepare(DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                                            num_workers=config.workers, pin_memory=device.type == "cuda",
                                            sampler=EpochSampler(len(dataset), config.seed, start=run.examples)))
    batches = iter(loader)
    sample_batch = None
    if main and config.sample_every and config.sample_count:
        sample_batch = collate([dataset[(0, i % len(dataset))] for i in range(config.sample_count)])
    for m in task.modules():
        m.train()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    log({"event": "start", "kind": task.kind, "step": run.step, "max_steps": config.max_steps,
         "device": str(device), "processes": accelerator.num_processes, "precision": str(dtype),
         "gradient_checkpointing": checkpointing, "loop": asdict(config), "settings": task.settings()},
        f"{task.kind}: {len(dataset)} samples, steps {run.step}..{config.max_steps}, batch {config.batch_size} x "
        f"{config.gradient_accumulation} x {accelerator.num_processes} process(es), {device}, {dtype}, gradient "
        f"checkpointing {'on' if checkpointing else 'off'}")
    t_start, samples_seen = time.monotonic(), 0
    try:
        with StopRequest() as stop:
            while run.step < config.max_steps:
                t0 = time.monotonic()
                losses = _optimizer_step(run, batches)
                samples_seen += run.per_step
                run.step_seconds.append(time.monotonic() - t0)
                _periodic(run, losses, sample_batch)
                if run.step < config.max_steps and _stop_agreed(run, stop):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # the weights are those of run.step unless the interrupt came inside the update; no collectives here
        if run.step > 0 and not run.updating:
            path = run.checkpoint()
            log({"event": "interrupted", "step": run.step, "path": path},
                f"interrupted: saved {path}; continue with --resume latest")
        raise
    finally:
        batches.close()
        loader.end()  # Accelerate's registry of active loaders (the stream is infinite, it never ends by itself)
    if main:
        task.save(out_path, dict(run.metadata, step=str(run.step)))
    accelerator.wait_for_everyone()  # every process returns once the file exists
    elapsed = time.monotonic() - t_start
    summary = {"event": "done", "step": run.step, "out": out_path, "last": run.last, "seconds": elapsed,
               "samples_per_s": samples_seen / elapsed if elapsed > 0 else 0.0, "processes": accelerator.num_processes,
               "last_checkpoint": run.last_checkpoint}
    log(summary, f"wrote {out_path} after {run.step} steps")
    return summary
