#!/usr/bin/env python
"""Cost of the reference controls against plain sampling: the AdaIN modes and attention-map recording.

    python bench/reference_controls.py [--out bench/results/reference_controls_cpu.json] [--runs 5] [--size 256]

On the full-size SD1.5 UNet layout with random weights (as bench/reference_overhead.py, whose setup and sampling
run it reuses), one reference of the target's size in a cached bank (``once at t=0``, no mask), euler, CFG 5,
batch 1. Configurations: plain; ``concat``; ``adain``; ``adain+attn``; ``concat`` with Record Reference
Attention at every step (all blocks); and with the recorder on one step only. The steady step time (every step
after the first) of each is divided by plain's and by concat's within the same repetition (configurations
interleaved, order rotated), and the median over repetitions is reported. The issue's bound: recording costs
at most one extra pass per recorded step, i.e. recording-every-step / concat <= 2.
Benchmarks are never timed tests; this writes JSON and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from _env import median, now, setup_comfy

CONFIGS = ("plain", "concat", "adain", "adain+attn", "concat + maps, every step", "concat + maps, one step")
TARGET_RECORDING_OVER_CONCAT_MAX = 2.0


def build(bench) -> dict[str, dict]:
    """The patched models, one bank for all."""
    import torch

    from humanref.pipelines.references.attention_maps import attach_record
    from humanref.pipelines.references.inputs import prepare_references
    from humanref.pipelines.references.patch import apply_reference_patch, build_reference_bank

    image = torch.rand(1, bench.size, bench.size, 3, generator=torch.Generator().manual_seed(11))
    bench.ref_images = image
    refs = prepare_references([(1, image, None, "person")], bench.size, 6)
    bank = build_reference_bank(bench.model, bench.vae, bench.clip, refs, "once at t=0", "parts2whole")
    configs = {"plain": {"kind": "plain", "patcher": bench.model}}
    for mode in ("concat", "adain", "adain+attn"):
        configs[mode] = {"kind": mode, "patcher": apply_reference_patch(bench.model, bank, mode=mode)}
    concat = configs["concat"]["patcher"]
    every, record_every = attach_record(concat)
    one, record_one = attach_record(concat, step=1)
    configs["concat + maps, every step"] = {"kind": "maps", "patcher": every, "record": record_every}
    configs["concat + maps, one step"] = {"kind": "maps", "patcher": one, "record": record_one}
    return configs


def order_for(rep: int) -> list[str]:
    others = list(CONFIGS[1:])
    r = rep % len(others)
    rot = others[r:] + others[:r]
    if rep % 2:
        rot = rot[::-1]
    return ["plain"] + rot


def summarise(runs: list[dict], steps: int) -> dict:
    by_rep: dict[int, dict[str, dict]] = {}
    for rec in runs:
        by_rep.setdefault(rec["rep"], {})[rec["config"]] = rec
    out = {}
    for name in CONFIGS:
        step = [r[name]["step_s"] for r in by_rep.values() if name in r]
        first = [r[name]["first_step_s"] for r in by_rep.values() if name in r]
        over_plain = [r[name]["step_s"] / r["plain"]["step_s"] for r in by_rep.values() if name in r]
        over_concat = [r[name]["step_s"] / r["concat"]["step_s"] for r in by_rep.values()
                       if name in r and "concat" in r]
        out[name] = {"step_s_median": median(step), "first_step_s_median": median(first),
                     "step_over_plain_median": median(over_plain), "step_over_concat_median": median(over_concat),
                     "runs": len(step)}
        if name == "concat + maps, one step":
            # one recorded step among the steady ones: its extra cost spread over them
            out[name]["note"] = f"step 1 of {steps} recorded; the others run as concat"
    verdict = out["concat + maps, every step"]["step_over_concat_median"]
    out["verdict"] = {"recording_every_step_over_concat": verdict,
                      "max": TARGET_RECORDING_OVER_CONCAT_MAX,
                      "ok": verdict is not None and verdict <= TARGET_RECORDING_OVER_CONCAT_MAX}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file (default bench/results/reference_controls_{cpu,cuda}.json)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", type=int, default=0, help="image size in pixels (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per run (the first is left out)")
    p.add_argument("--unet", choices=("full", "small"), default="full", help="small: only to check the script")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (-1: torch's default)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    opts = p.parse_args(argv)
    setup_comfy(opts.comfyui)
    import torch

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    from _env import environment, on_cuda
    from reference_overhead import Bench

    bench = Bench(argparse.Namespace(size=opts.size, steps=opts.steps, unet=opts.unet))
    bench.setup()
    configs = build(bench)
    bench.configs = configs
    device = "cuda" if on_cuda() else "cpu"
    out = opts.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"reference_controls_{device}.json")
    for name in CONFIGS:  # warm-up: every code path once
        bench.sample_run(name, steps=2)
    runs = []
    t0 = now()
    for rep in range(opts.runs):
        for name in order_for(rep):
            rec = bench.sample_run(name)
            rec["rep"] = rep
            record = configs[name].get("record")
            if record is not None:
                rec["records_per_run"] = record.records
            runs.append(rec)
            print(f"rep {rep} {name:28s} step {rec['step_s']:.3f}s first {rec['first_step_s']:.3f}s", flush=True)
    summary = summarise(runs, opts.steps)
    report = {
        "benchmark": "reference_controls",
        "command": "python bench/reference_controls.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device, opts.comfyui, threads=torch.get_num_threads(), size=bench.size,
                                   unet=opts.unet, steps=opts.steps, sampler="euler", cfg=5.0,
                                   references="1, cached (once at t=0), no mask",
                                   repetitions_seconds=round(now() - t0, 1)),
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"\n{'config':28s} {'step s':>8s} {'/plain':>7s} {'/concat':>8s}")
    for name in CONFIGS:
        s = summary[name]
        print(f"{name:28s} {s['step_s_median']:8.3f} {s['step_over_plain_median']:7.2f} "
              f"{s['step_over_concat_median']:8.2f}")
    print(f"-> {out}")
    return 0 if summary["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
