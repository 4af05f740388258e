#!/usr/bin/env python
"""Training throughput and peak memory of the hand generator trainer (``python -m humanref train hand-generator``).

    python bench/train_hand_generator.py [--out bench/results/train_hand_generator_cuda.json] [--steps 10]

With CUDA (the measurement the issue asks for): the full-size SD1.5 UNet (860 M parameters, random weights), the
full CLIP-L and VAE, 512x512 crops, batch 8, the trainer's GPU defaults (bf16 autocast where supported, else
fp16; gradient checkpointing), AdamW; samples/s over the steady steps and ``torch.cuda.max_memory_allocated``.

Without CUDA it runs a REDUCED configuration (the tiny 26 M one-level UNet, 64x64 crops, batch 2, fp32) and
says so in the JSON (``"reduced": true`` with the reason): a check that the path runs, not the number asked for.

Everything goes through the real trainer: a synthetic hand dataset in the documented folder format, the
dataset validator, ``training.loop.train`` (data loading, losses, backward, optimizer, logging). Each step's
time comes from the loop's own per-step log; the first ``--warmup`` steps are left out. No files besides the
JSON are kept. Benchmarks are never timed tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from humanref.pipelines.comfy_env import import_comfy

HERE = os.path.dirname(os.path.abspath(__file__))


def commit() -> str:
    try:
        root = os.path.dirname(HERE)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "bench/train_hand_generator.py"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                      f"train_hand_generator_{'cuda' if cuda else 'cpu'}.json"))
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    parser.add_argument("--steps", type=int, default=10 if cuda else 3, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    parser.add_argument("--batch-size", type=int, default=8 if cuda else 2)
    parser.add_argument("--resolution", type=int, default=512 if cuda else 64)
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--unet", choices=("full", "tiny"), default="full" if cuda else "tiny")
    parser.add_argument("--workers", type=int, default=4 if cuda else 0)
    args = parser.parse_args(argv)
    import_comfy(args.comfyui, cpu=not cuda)
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    from humanref.pipelines.synthetic.base import tiny_sd15_unet_config
    from humanref.pipelines.synthetic.base import load_test_clip_vae, random_like, sd15_unet_config, unet_shapes
    from humanref.training.base import base_from_state_dict
    from humanref.training.datasets import hand_samples, validate_hand_dataset
    from humanref.training.hands.trainer import HandTask, HandTrainConfig
    from humanref.training.hands.data import HandDataConfig, HandDataset, collate
    from humanref.training.loop import LoopConfig, resolve_precision, train
    from humanref.training.synthetic import write_hand_dataset

    unet_config = sd15_unet_config(channel_mult=(1, 2, 4, 4), num_res_blocks=2) if args.unet == "full" \
        else tiny_sd15_unet_config()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.monotonic()
    clip, vae = load_test_clip_vae(seed=0)
    sd = {f"model.diffusion_model.{k}": v for k, v in random_like(unet_shapes(unet_config), 0).items()}
    base = base_from_state_dict(sd, f"synthetic-sd15-{args.unet}", clip=clip, vae=vae)
    del sd
    task = HandTask(base, HandTrainConfig(resolution=args.resolution))
    params = sum(p.numel() for m in task.modules() for p in m.parameters())
    setup_s = time.monotonic() - t0
    with tempfile.TemporaryDirectory(prefix="humanref-bench-train-") as tmp:
        data = os.path.join(tmp, "data")
        side = int(args.resolution * 1.25)
        write_hand_dataset(data, count=max(8, args.batch_size * 2), size=(side, side))
        report = validate_hand_dataset(data)
        if not report.ok:
            print(report.format(), file=sys.stderr)
            return 1
        dataset = HandDataset(hand_samples(data)[0], HandDataConfig(resolution=args.resolution))
        loop = LoopConfig(work_dir=os.path.join(tmp, "work"), max_steps=args.warmup + args.steps,
                          batch_size=args.batch_size, device=str(device), mixed_precision=args.mixed_precision,
                          gradient_checkpointing=args.gradient_checkpointing, workers=args.workers,
                          checkpoint_every=0, sample_every=0, log_every=1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        summary = train(task, dataset, collate, loop, os.path.join(tmp, "out.safetensors"))
        with open(os.path.join(loop.work_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    steps = [r for r in records if r["event"] == "step"]
    start = next(r for r in records if r["event"] == "start")
    measured = steps[args.warmup:]
    speeds = [r["samples_per_s"] for r in measured]
    step_seconds = [args.batch_size / s for s in speeds]
    dtype = resolve_precision(args.mixed_precision, device)
    if cuda:
        memory = {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                  "memory_kind": "torch.cuda.max_memory_allocated (UNet, mask head, VAE, AdamW state, activations; "
                                 "CLIP is managed by ComfyUI)"}
    else:
        memory = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "memory_kind": "process peak RSS (everything: CLIP, VAE, UNet, optimizer, Python)"}
    reduced = not (cuda and args.unet == "full" and args.resolution == 512 and args.batch_size == 8)
    result = {
        "benchmark": "train_hand_generator",
        "command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(HERE))] + (argv or sys.argv[1:])),
        "reduced": reduced,
        "reduced_reason": ("" if not reduced else
                           "no CUDA device here: tiny UNet, 64x64, batch 2, fp32 on the CPU; the 512x512 batch-8 "
                           "number needs a GPU run of this script" if not cuda else
                           "arguments differ from the issue's configuration (full UNet, 512x512, batch 8)"),
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__, "humanref_commit": commit(),
            "device": str(device), "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "config": {
            "unet": args.unet, "trainable_parameters": params, "resolution": args.resolution,
            "batch_size": args.batch_size, "precision": str(dtype or torch.float32),
            "gradient_checkpointing": start["gradient_checkpointing"], "workers": args.workers,
            "optimizer": "AdamW (foreach)", "loss": "L_LDM + 0.5 MSE(mask), mask head on the x0 estimate",
            "warmup_steps": args.warmup, "measured_steps": len(measured),
        },
        "results": {
            "samples_per_s_median": statistics.median(speeds) if speeds else None,
            "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
            "step_seconds": step_seconds,
            **memory,
            "setup_seconds": setup_s,
            "loop_seconds": summary["seconds"],
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    r = result["results"]
    print(f"{'REDUCED ' if reduced else ''}{args.unet} UNet, {args.resolution}px, batch {args.batch_size}, "
          f"{result['config']['precision']}: {r['samples_per_s_median']:.3f} samples/s, peak "
          f"{r['peak_memory_mb']:.0f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
