#!/usr/bin/env python
"""Soak: many API prompts queued back to back on one ComfyUI server with the pack and the tiny models.

    python bench/soak.py [--out bench/results/soak_cpu.json] [--prompts 50] [--models DIR]

The workload mixes the five example workflows (workflows/api/*.json, run small on the tiny synthetic models of
``python -m humanref tiny-models``) over seeds, reference counts (1 to 6), with and without masks and regions,
image sizes, writer timings and injection modes. The prompts go out in rounds of one prompt per workflow; the
first two rounds are the warm-up (each workflow at its largest settings, then each workflow's other variants,
so every code path has run once), the other prompts are then queued back to back in one go. What it records:

* the server process's resident memory (VmRSS of /proc/<pid>/status) when idle after the first round, after
  the warm-up and after the soak (the same workflow ran last each time), after every soak prompt, and its
  peak (VmHWM);
* that every prompt completed;
* an unpatched txt2img prompt (the same checkpoint loader, so ComfyUI's cache hands it the very model object
  the patched prompts were cloned from) run on the fresh server before the soak and again after it: its
  latent and image must be bit-identical (our patches never stay on the loaded model).

The workloads and the soak itself live in tests/e2e/workloads.py: tests/e2e/test_soak.py runs the same soak and
asserts growth < 5%; this script writes the figures as JSON. Benchmarks are never timed tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

# The workloads are shared with the e2e tier, which owns them (bench/ is a folder of scripts, not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from workloads import GROWTH_MAX, REPO, STEADY_ALLOCATOR, run_soak, soak_models

VAE_NOTE = ("tiny synthetic TAESD (VAELoader 'taesd') in place of the checkpoint's full-size VAE, except for the "
            "trained hand generator's mask head")


# ----------------------------------------------------------------------------------------------- script
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "soak_cpu.json"))
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--models", help="a folder written by `python -m humanref tiny-models` (default: write one "
                                         "into a temporary folder)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    args = parser.parse_args(argv)
    from _env import environment

    from humanref.cli.client import ComfyClient
    from humanref.cli.server import LocalComfyUI
    from humanref.pipelines.comfy_env import comfyui_path, import_comfy

    args.comfyui = comfyui_path(args.comfyui)

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="humanref-soak-") as tmp:
        models = args.models
        if not models:
            models = os.path.join(tmp, "models")
            subprocess.run([sys.executable, "-m", "humanref", "tiny-models", models, "--comfyui", args.comfyui],
                           check=True, cwd=tmp)
        import_comfy(args.comfyui)  # CPU mode, no bytecode in the ComfyUI folder (for the TAESD layout)
        models = soak_models(models, os.path.join(tmp, "soak-models"))
        os.environ.update(STEADY_ALLOCATOR)  # the server inherits it
        with LocalComfyUI(args.comfyui, models=models, start_timeout=180) as server:
            client = ComfyClient(server.url, timeout=60)
            result = run_soak(client, server.proc.pid, args.prompts)
    report = {"benchmark": "soak", "command": "python bench/soak.py " + " ".join(argv or sys.argv[1:]),
              "environment": environment("cpu (--cpu)", args.comfyui, loadavg_start=list(load),
                                         loadavg_end=list(os.getloadavg()), vae=VAE_NOTE,
                                         server_environment=STEADY_ALLOCATOR),
              **result.as_json()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"{result.prompts} prompts, {len(result.failures)} failed; VmRSS after warm-up "
          f"{result.rss_warm_kib / 1024:.1f} MiB, after the soak {result.rss_end_kib / 1024:.1f} MiB "
          f"({100 * result.growth:+.2f}%, limit {100 * GROWTH_MAX:.0f}%); unpatched output bit-identical: "
          f"{result.plain_identical}; {result.seconds:.0f} s -> {args.out}")
    ok = not result.failures and result.growth < GROWTH_MAX and result.plain_identical
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
