#!/usr/bin/env python
"""Training throughput and peak memory of the hand generator trainer (``python -m humanref train hand-generator``),
with 1 and more processes (Accelerate, data parallel).

    python bench/train_hand_generator.py [--out bench/results/train_hand_generator_cuda.json] [--steps 10]
        [--processes 1,2]

With CUDA (the measurement the issue asks for): the full-size SD1.5 UNet (860 M parameters, random weights), the
full CLIP-L and VAE, 512x512 crops, batch 8 per process, the trainer's GPU defaults (bf16 autocast where
supported, else fp16; gradient checkpointing), AdamW; samples/s over the steady steps and
``torch.cuda.max_memory_allocated``; 1 process, and 2 when there are 2 GPUs.

Without CUDA it runs a REDUCED configuration (the tiny 26 M one-level UNet, 64x64 crops, batch 2 per process,
fp32) with 1 and 2 processes in the same run (2 processes: gloo; the cores shared out, or ``--cpu-threads`` each)
and says so in the JSON (``"reduced": true`` with the reason): a check that the paths run and of the
data-parallel scaling, not the number asked for.

Everything goes through the real trainer: a synthetic hand dataset in the documented folder format, the
dataset validator, ``training.loop.train`` (Accelerate, data loading, losses, backward, optimizer, logging),
started per process count as the docs start it (``python`` for 1 process, ``accelerate launch --multi_gpu
--num_processes N`` for more). Each step's speed (all processes' samples) comes from the loop's own per-step
log; the first ``--warmup`` steps are left out; medians. No files besides the JSON are kept. Benchmarks are
never timed tests.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from _env import REPO, PeakMemory, environment, on_cuda, setup_comfy

HERE = os.path.dirname(os.path.abspath(__file__))
DIRTY_PATHS = ("training", "bench/train_hand_generator.py")  # what makes a commit "-dirty" for this benchmark


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    cuda = on_cuda()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                      f"train_hand_generator_{'cuda' if cuda else 'cpu'}.json"))
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    parser.add_argument("--steps", type=int, default=10 if cuda else 4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    parser.add_argument("--batch-size", type=int, default=8 if cuda else 2, help="per process")
    parser.add_argument("--resolution", type=int, default=512 if cuda else 64)
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--unet", choices=("full", "tiny"), default="full" if cuda else "tiny")
    parser.add_argument("--workers", type=int, default=4 if cuda else 0)
    gpus = torch.cuda.device_count() if cuda else 0
    parser.add_argument("--processes", default="1,2" if not cuda or gpus >= 2 else "1",
                        help="comma list of process counts, each measured in turn (default 1,2; 1 on one GPU)")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="CPU: torch threads per process (default 0 = cores / processes, the cores shared out)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process count")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set for the launched processes
    parser.set_defaults(device="cuda" if cuda else "cpu")
    args = parser.parse_args(argv)
    try:
        args.process_counts = [int(n) for n in args.processes.split(",")]
    except ValueError:
        parser.error(f"--processes {args.processes!r}: give a comma list of numbers, e.g. 1,2")
    if any(n < 1 for n in args.process_counts) or (cuda and max(args.process_counts) > gpus):
        parser.error(f"--processes {args.processes}: each count must be 1..{gpus if cuda else 'N'}"
                     f"{' (the GPUs here)' if cuda else ''}")
    return args


@dataclass
class Measured:
    records: list[dict]  # the loop's log.jsonl
    loop_seconds: float
    setup_seconds: float
    parameters: int
    memory: dict  # PeakMemory.stop() of the training loop (the main process)
    processes: int
    threads_per_process: int


def run(args: argparse.Namespace) -> Optional[Measured]:
    """The real trainer on a synthetic base model and a synthetic dataset, in a temporary folder; in every
    process of a launched run (the main one returns the measurement, the others None)."""
    from humanref.pipelines.synthetic.base import (
        load_test_clip_vae,
        random_like,
        sd15_unet_config,
        tiny_sd15_unet_config,
        unet_shapes,
    )
    from humanref.training.base import base_from_state_dict
    from humanref.training.hands.data import HandDataConfig, HandDataset, collate, hand_samples, validate_hand_dataset
    from humanref.training.hands.trainer import HandTask, HandTrainConfig
    from humanref.training.loop import LoopConfig, is_main_process, launched_processes, train
    from humanref.training.synthetic import write_hand_dataset

    processes = launched_processes()
    unet_config = sd15_unet_config(channel_mult=(1, 2, 4, 4), num_res_blocks=2) if args.unet == "full" \
        else tiny_sd15_unet_config()
    t0 = time.monotonic()
    clip, vae = load_test_clip_vae(seed=0)
    sd = {f"model.diffusion_model.{k}": v for k, v in random_like(unet_shapes(unet_config), 0).items()}
    base = base_from_state_dict(sd, f"synthetic-sd15-{args.unet}", clip=clip, vae=vae)
    del sd
    task = HandTask(base, HandTrainConfig(resolution=args.resolution))
    params = sum(p.numel() for m in task.modules() for p in m.parameters())
    setup_s = time.monotonic() - t0
    # each process writes the same synthetic dataset into its own folder; the main one logs
    with tempfile.TemporaryDirectory(prefix="humanref-bench-train-") as tmp:
        data = os.path.join(tmp, "data")
        side = int(args.resolution * 1.25)
        write_hand_dataset(data, count=max(8, args.batch_size * processes * 2), size=(side, side))
        report = validate_hand_dataset(data, workers=1)
        if not report.ok:
            raise RuntimeError(f"the synthetic dataset does not validate:\n{report.format()}")
        dataset = HandDataset(hand_samples(data)[0], HandDataConfig(resolution=args.resolution))
        loop = LoopConfig(work_dir=os.path.join(tmp, "work"), max_steps=args.warmup + args.steps,
                          batch_size=args.batch_size, device=args.device, mixed_precision=args.mixed_precision,
                          gradient_checkpointing=args.gradient_checkpointing, workers=args.workers,
                          checkpoint_every=0, sample_every=0, log_every=1)
        peak = PeakMemory()
        start = peak.start()
        summary = train(task, dataset, collate, loop, os.path.join(tmp, "out.safetensors"))
        memory = peak.stop(start)
        if not is_main_process():
            return None
        with open(os.path.join(loop.work_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return Measured(records, summary["seconds"], setup_s, params, memory, processes, torch.get_num_threads())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str], processes: int) -> Measured:
    """This script as a worker: ``python`` for 1 process, ``accelerate launch --multi_gpu`` for more. On the
    CPU the cores are shared out (threads per process = cores / processes)."""
    with tempfile.TemporaryDirectory(prefix="humanref-bench-launch-") as tmp:
        out = os.path.join(tmp, "measured.json")
        script = [os.path.abspath(__file__), *argv, "--worker-out", out]
        if processes == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
                   "127.0.0.1", "--main_process_port", str(free_port()), *script]
        env = dict(os.environ)
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.cpu_threads or max(1, (os.cpu_count() or 1) // processes))
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{processes} process(es) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return Measured(**json.load(f))


def summarise(args: argparse.Namespace, measured: Measured) -> dict:
    """Speed and memory of one process count (all processes' samples per second)."""
    cuda = args.device == "cuda"
    steps = [r for r in measured.records if r["event"] == "step"]
    speeds = [r["samples_per_s"] for r in steps[args.warmup:]]
    global_batch = args.batch_size * measured.processes
    step_seconds = [global_batch / s for s in speeds]
    if cuda:
        memory = {"peak_memory_mb": measured.memory["cuda_max_allocated_bytes"] / 2**20,
                  "memory_kind": "torch.cuda.max_memory_allocated of the main process (UNet, mask head, VAE, AdamW "
                                 "state, activations; CLIP is managed by ComfyUI)"}
    else:
        memory = {"peak_memory_mb": measured.memory["ru_maxrss_bytes"] / 2**20,
                  "memory_kind": "peak RSS of the main process (everything: CLIP, VAE, UNet, optimizer, Python)"}
    return {
        "processes": measured.processes,
        "threads_per_process": measured.threads_per_process,
        "global_batch": global_batch,
        "measured_steps": len(speeds),
        "samples_per_s_median": statistics.median(speeds) if speeds else None,
        "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
        "step_seconds": step_seconds,
        **memory,
        "setup_seconds": measured.setup_seconds,
        "loop_seconds": measured.loop_seconds,
    }


def report(args: argparse.Namespace, measured: dict[int, Measured], env: dict, argv: Optional[list[str]]) -> dict:
    """The JSON: configuration, whether it is the issue's (or a reduced one, and why), speed and memory per
    process count."""
    from humanref.training.loop import resolve_precision

    cuda = args.device == "cuda"
    first = next(iter(measured.values()))
    start = next(r for r in first.records if r["event"] == "start")
    dtype = resolve_precision(args.mixed_precision, torch.device(args.device))
    reduced = not (cuda and args.unet == "full" and args.resolution == 512 and args.batch_size == 8)
    results = {str(n): summarise(args, m) for n, m in measured.items()}
    speeds = {n: r["samples_per_s_median"] for n, r in results.items()}
    out = {
        "benchmark": "train_hand_generator",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or [])),
        "reduced": reduced,
        "reduced_reason": ("" if not reduced else
                           "no CUDA device here: tiny UNet, 64x64, batch 2 per process, fp32 on the CPU; the 512x512 "
                           "batch-8 number needs a GPU run of this script" if not cuda else
                           "arguments differ from the issue's configuration (full UNet, 512x512, batch 8)"),
        "environment": env,
        "config": {
            "unet": args.unet, "trainable_parameters": first.parameters, "resolution": args.resolution,
            "batch_size_per_process": args.batch_size, "precision": str(dtype or torch.float32),
            "gradient_checkpointing": start["gradient_checkpointing"], "workers": args.workers,
            "optimizer": "AdamW (foreach)", "loss": "L_LDM + 0.5 MSE(mask), mask head on the x0 estimate",
            "warmup_steps": args.warmup, "parallelism": "Accelerate data parallel (DDP; gloo on the CPU)",
        },
        "results": {"samples_per_s_median": speeds, "per_processes": results},
    }
    if "1" in speeds and "2" in speeds and speeds["1"]:
        out["results"]["speedup_2_vs_1"] = speeds["2"] / speeds["1"]
    return out


def worker(args: argparse.Namespace) -> int:
    """One launched process: train, and from the main process write what was measured."""
    setup_comfy(args.comfyui)
    measured = run(args)
    if measured is not None:
        with open(args.worker_out, "w") as f:
            json.dump(asdict(measured), f)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker_out:
        return worker(args)
    setup_comfy(args.comfyui)
    env = environment(args.device, args.comfyui, DIRTY_PATHS, diffusers=__import__("diffusers").__version__,
                      accelerate=__import__("accelerate").__version__)
    measured = {}
    for n in args.process_counts:
        measured[n] = launch(args, argv, n)
        r = summarise(args, measured[n])
        print(f"{n} process(es): {r['samples_per_s_median']:.3f} samples/s", flush=True)
    result = report(args, measured, env, argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    speeds = ", ".join(f"{n} process(es) {v:.3f}" for n, v in result["results"]["samples_per_s_median"].items())
    print(f"{'REDUCED ' if result['reduced'] else ''}{args.unet} UNet, {args.resolution}px, batch {args.batch_size} "
          f"per process, {result['config']['precision']}: samples/s {speeds} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
