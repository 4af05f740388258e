#!/usr/bin/env python
"""Batch wall time on 1 against 2 local ComfyUI servers (``python -m humanref batch --comfyui --workers N``).

    python bench/batch_servers.py [--rows 16] [--repeats 3] [--models DIR] [--out bench/results/batch_servers_cpu.json]

The rows are the Parts2Whole example workflow made small (tiny synthetic models of ``python -m humanref
tiny-models``, 64x96, 3 steps), one seed per row, dispatched by the batch runner's own scheduler
(humanref.cli.batch.Batch) to the servers it starts (humanref.cli.batch.LocalServers). Each configuration starts
its servers once, warms each up with one prompt (model loading is not what is measured), then runs the rows
``--repeats`` times with new seeds (ComfyUI would otherwise serve the repeats from its cache); the median wall
time is reported, from the first prompt queued to the last row's files saved.

Configurations: 1 server and 2 servers with torch's default thread count (one per core), and 1 and 2 servers
with one torch thread each (OMP_NUM_THREADS=1 in the servers' environment). On a machine with N cores a single
CPU server already runs its convolutions and matmuls on all N cores, so a second server only shares the same
cores: the speed-up is whatever one server leaves idle (Python between nodes, HTTP, PNG encoding, single-threaded
parts), and two servers at N threads each also fight over the cores. On GPUs each server gets its own device
(--cuda-device), which is where the rows per second scale with the servers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "api" / "parts2whole.json"
INPUTS = REPO / "workflows" / "inputs"
SETS = ["1.ckpt_name=humanref-tiny-sd15.safetensors", "2.release=humanref-tiny-parts2whole", "12.width=64",
        "12.height=96", "13.steps=3"]


def run_config(workers: int, threads: Optional[int], models: str, comfyui: str, rows: int, repeats: int,
               tmp: str) -> dict:
    """Start ``workers`` servers (``threads`` torch threads each, None = default), warm up, time the rows."""
    from humanref.cli.batch import Batch, LocalServers, Row, Server, Task
    from humanref.cli.client import ComfyClient
    from humanref.cli.run import Uploader, apply_sets, load_workflow, parse_sets, upload_from_dir

    saved = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    pool = LocalServers(comfyui, workers, models, True, [], 180.0, None)
    log = io.StringIO()
    try:
        started = pool.start(log)
        if len(started) != workers:
            raise RuntimeError("servers did not start:\n" + log.getvalue())
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        workflow = load_workflow(str(WORKFLOW))
        sets = parse_sets(SETS)
        servers = []
        for i, local in enumerate(started, 1):
            client = ComfyClient(local.url)
            servers.append(Server(f"s{i}", client.url, client, Uploader(client, log), local))
            warm = json.loads(json.dumps(workflow))
            upload_from_dir(warm, str(INPUTS), servers[-1].uploader)
            apply_sets(warm, sets + [("13", "seed", 10_000 + i)], servers[-1].uploader)
            client.run(warm, timeout=600)
        times, per_server = [], []
        for r in range(repeats):
            out = os.path.join(tmp, f"out-{workers}-{threads}-{r}")
            os.makedirs(out)
            tasks = [Task(Row(i, f"{i:04d}", {}, [("13", "seed", r * 1000 + i)]), f"bench{r}-{i}")
                     for i in range(1, rows + 1)]
            for s in servers:
                s.done = 0
            batch = Batch(servers, workflow, tasks, out, sets, str(INPUTS), log=log, poll=0.05)
            t0 = time.perf_counter()
            summary = batch.run()
            times.append(time.perf_counter() - t0)
            if summary.done != rows:
                raise RuntimeError(f"{summary.done}/{rows} rows done: {summary.failed}")
            per_server.append([s.done for s in servers])
        return {"servers": workers, "torch_threads_per_server": threads or "default (one per core)",
                "rows": rows, "wall_seconds": [round(t, 3) for t in times],
                "median_wall_seconds": round(statistics.median(times), 3),
                "median_seconds_per_row": round(statistics.median(times) / rows, 4),
                "rows_per_server": per_server}
    finally:
        pool.stop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "batch_servers_cpu.json"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", help="a folder written by `python -m humanref tiny-models` (default: write one "
                                         "into a temporary folder)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    args = parser.parse_args(argv)
    from _env import environment

    from humanref.pipelines.comfy_env import comfyui_path

    comfyui = comfyui_path(args.comfyui)
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="humanref-batch-bench-") as tmp:
        models = args.models
        if not models:
            models = os.path.join(tmp, "models")
            subprocess.run([sys.executable, "-m", "humanref", "tiny-models", models, "--comfyui", comfyui],
                           check=True, cwd=tmp)
        for workers, threads in ((1, None), (2, None), (1, 1), (2, 1)):
            result = run_config(workers, threads, models, comfyui, args.rows, args.repeats, tmp)
            print(f"{workers} server(s), torch threads {result['torch_threads_per_server']}: "
                  f"median {result['median_wall_seconds']:.1f} s for {args.rows} rows "
                  f"(runs {result['wall_seconds']}, rows per server {result['rows_per_server']})", flush=True)
            results.append(result)
    base = {r["torch_threads_per_server"]: r["median_wall_seconds"] for r in results if r["servers"] == 1}
    for r in results:
        r["speedup_over_1_server"] = round(base[r["torch_threads_per_server"]] / r["median_wall_seconds"], 3)
    command = "python bench/batch_servers.py " + " ".join(argv or sys.argv[1:])
    report = {"benchmark": "batch_servers", "command": command,
              "environment": environment("cpu (--cpu)", comfyui, loadavg_start=list(load),
                                         loadavg_end=list(os.getloadavg())),
              "workload": f"{WORKFLOW.relative_to(REPO)} with --set " + " ".join(SETS) + ", a seed per row",
              "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
