"""Soak: 50 API prompts queued back to back on a fresh server of its own (the workload is workloads.py, which
bench/soak.py runs as a benchmark).

The five example workflows, run small on the tiny models, over seeds, 1 to 6 references or parts or garments,
with and without masks and regions, several image sizes, both writer timings and every injection mode. Every
prompt completes; the server's resident memory after the soak is within 5% of its value after the warm-up
(two rounds: every workflow at its largest settings, then its other variants); and the unpatched txt2img graph
gives bit-identical latent and image before and after the soak, on the
very model object the patched prompts were cloned from (ComfyUI's cache hands it over: the checkpoint loader
is cached, the sampler runs). Set HUMANREF_SOAK_RESULTS=FILE to keep the figures as JSON (bench/soak.py writes
bench/results/soak_cpu.json).
"""
import json
import os

import pytest
import workloads
from e2e_support import running_server

PROMPTS = 50


@pytest.fixture(scope="module")
def soak_server(tiny_models, tmp_path_factory):
    """A fresh server: the tiny models plus a tiny synthetic TAESD (models/vae_approx)."""
    models = workloads.soak_models(str(tiny_models), str(tmp_path_factory.mktemp("soak-models")))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in workloads.STEADY_ALLOCATOR.items():
            mp.setenv(key, value)  # the server inherits it
        with running_server(models) as server:
            mp.undo()
            yield server


def test_the_plan_mixes_workflows_counts_masks_and_sizes():
    jobs = [job for jobs in workloads.soak_plan(PROMPTS) for job in jobs]
    assert len(jobs) == PROMPTS
    assert {j.workflow for j in jobs} == set(workloads.WORKFLOWS)
    counts = {j.options.get("refs") or j.options.get("parts") or j.options.get("garments") for j in jobs
              if j.workflow in ("references", "parts2whole", "anydressing")}
    assert counts == {1, 2, 3, 4, 5, 6}
    assert {j.options.get("masks") for j in jobs if "masks" in j.options} == {True, False}
    assert len({j.options["size"] for j in jobs if "size" in j.options}) >= 5
    assert len({j.options["seed"] for j in jobs}) >= 10
    for job in jobs:  # each prompt is a valid graph of the workflow's nodes
        prompt = job.prompt()
        for node in prompt.values():
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in prompt, (job.describe(), value)


def test_soak(soak_server, tmp_path):
    from humanref.cli.client import ComfyClient

    client = ComfyClient(soak_server.url, timeout=60)
    result = workloads.run_soak(client, soak_server.proc.pid, prompts=PROMPTS, log=print)
    figures = result.as_json()
    out = os.environ.get("HUMANREF_SOAK_RESULTS") or str(tmp_path / "soak.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"benchmark": "soak", "command": "pytest tests/e2e/test_soak.py", **figures}, f, indent=1)
    print(json.dumps({k: figures[k] for k in ("vmrss_mib", "growth_after_warmup", "seconds")}))
    assert result.failures == []
    assert len(result.jobs) == PROMPTS
    assert result.growth < workloads.GROWTH_MAX, figures["vmrss_mib"]
    # the unpatched graph: bit-identical latent and pixels on the fresh server and after 50 patched prompts ...
    assert result.plain_identical, result.plain
    # ... computed by the sampler again (not taken from the cache) on the cached checkpoint's model object
    cached = result.plain["cached_nodes_after"]
    assert "1" in cached and "13" not in cached, cached
    assert soak_server.alive()
