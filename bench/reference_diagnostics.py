"""Why a reference_overhead configuration costs what it does: run after the measurement, mainly when a target
is missed (``python bench/reference_overhead.py``; ``--no-diagnostics`` skips them, ``--no-profile`` the profiles).

* the reader's attention call against plain attention per block (the real kernels) and the K/V projection;
* a writer pass alone per every-step configuration, and what cutting the writer's forward after its last
  captured block would save;
* floors built from those kernels;
* a torch.profiler table of a 2-step run for the configurations that missed their target.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from _env import median, on_cuda, time_once

if TYPE_CHECKING:
    from reference_overhead import Bench


def reader_diagnostics(bench: Bench, inner: int) -> dict:
    """The real reader call against plain attention per block (batch = cond + uncond rows), and its parts.

    Minimum over ``inner`` interleaved timings per shape."""
    import comfy.ldm.modules.attention as ca

    from humanref.attention.kernels import project_references, sdpa
    from humanref.attention.reader import CONCAT, ActivePatch, reference_attention

    chunks = bench.chunks or [1, 0]
    b = len(chunks)
    out: dict = {"cond_or_uncond": chunks, "configs": {}}
    gen = torch.Generator(device="cpu").manual_seed(5)
    totals = {name: {"reader_minus_plain_s": 0.0, "kv_projection_s": 0.0} for name in bench.keys
              if not name.startswith("every_step")}
    split = {"plain_batch2_s": 0.0, "two_batch1_s": 0.0}
    biased = {name: 0.0 for name in totals}

    def host_attn(q, k, v, heads):
        return ca.optimized_attention(q, k, v, heads, transformer_options={})

    with torch.no_grad():
        for row, info in zip(bench.block_rows, bench.blocks):
            n, c, heads = row["tokens"], row["channels"], row["heads"]
            q = torch.randn(b, n, c, generator=gen).to(bench.device, bench.dtype)
            k = torch.randn(b, n, c, generator=gen).to(bench.device, bench.dtype)
            v = torch.randn(b, n, c, generator=gen).to(bench.device, bench.dtype)
            attn1 = bench.unet.get_submodule(info.path).attn1
            layers = {}
            for name in totals:
                merged = bench.configs[name]["bank"].merged(info.key)
                tokens = merged.tokens.to(bench.device, bench.dtype)
                tp = []
                for _ in range(inner):
                    tp.append(time_once(lambda: project_references(tokens, merged.dropped, attn1.to_k,
                                                                  attn1.to_v)))
                totals[name]["kv_projection_s"] += min(tp)
                refs = project_references(tokens, merged.dropped, attn1.to_k, attn1.to_v)
                layers[name] = (refs, [ActivePatch(CONCAT, refs)])
            host_attn(q, k, v, heads)
            tp_plain, t_split = [], []
            t_reader = {name: [] for name in totals}
            t_bias = {name: [] for name in totals}
            for _ in range(inner):
                tp_plain.append(time_once(lambda: host_attn(q, k, v, heads)))
                t_split.append(time_once(lambda: (host_attn(q[:1], k[:1], v[:1], heads),
                                                  host_attn(q[1:], k[1:], v[1:], heads))))
                for name, (refs, active) in layers.items():
                    t_reader[name].append(time_once(
                        lambda: reference_attention(q, k, v, heads, chunks, active, host_attn)))
                    if refs.bias is not None:  # the same key set through ComfyUI's kernel, no bias
                        kk = torch.cat([k[:1], refs.k], dim=1)
                        vv = torch.cat([v[:1], refs.v], dim=1)
                        t_bias[name].append(
                            time_once(lambda: sdpa(q[:1], kk, vv, heads, torch.zeros(kk.shape[1])))
                            - time_once(lambda: host_attn(q[:1], kk, vv, heads)))
            split["plain_batch2_s"] += min(tp_plain)
            split["two_batch1_s"] += min(t_split)
            for name in totals:
                totals[name]["reader_minus_plain_s"] += min(t_reader[name]) - min(tp_plain)
                if t_bias[name]:
                    biased[name] += min(t_bias[name])
    for name in totals:
        totals[name]["sdpa_bias_minus_optimized_attention_s"] = biased[name] if bench.configs[name].get(
            "masked") else None
        out["configs"][name] = totals[name]
    out["cfg_split"] = split
    out["note"] = ("reader_minus_plain_s: sum over blocks of the reader's attention call (per-chunk split, "
                   "key concat, kernel) minus plain attention of the same batch; compare with the floor's "
                   "attention_delta_s. sdpa_bias_minus_optimized_attention_s: what the biased SDPA path "
                   "costs against optimized_attention on the same (cond) keys.")
    return out


def writer_diagnostics(bench: Bench, inner: int) -> dict:
    """A writer pass alone per reference count (the per-step cost every-step mode adds besides attention),
    and what stopping the writer's forward right after its last captured block would save (1 reference)."""
    from humanref.pipelines.references.writer import run_writer

    out: dict = {}
    with torch.no_grad():
        for name, cfg in bench.configs.items():
            if cfg["kind"] == "every_step":
                writer = cfg["bank"].writer
                ts = [time_once(lambda: run_writer(writer, 3.0)) for _ in range(inner)]
                out[name] = {"writer_pass_s_median": median(ts), "writer_pass_s_all": ts}
        out["early_exit_1_reference"] = writer_early_exit(bench, inner)
    return out


def writer_early_exit(bench: Bench, inner: int) -> dict:
    """Time the writer forward (batch 1, sigma 3) in full against one cut right after the norm1 capture of
    the last block it needs: all blocks (the default block set) and the input blocks only (down-only)."""
    from humanref.attention.blocks import select_blocks

    class Stop(Exception):
        pass

    writer = bench.configs["every_step_1"]["bank"].writer
    group = writer.groups[0]
    model = bench.model.model
    x = group.latents.to(bench.device, bench.dtype)
    noise = writer.noise_for(0, bench.device, x.dtype)
    sigma = torch.tensor([3.0], device=bench.device)
    x = model.model_sampling.noise_scaling(sigma, noise, x)
    conds = {k: v.to(bench.device) for k, v in group.conds.items()}

    def forward(stop_at):
        def patch(n, context, value, extra_options):
            block = extra_options.get("block")
            if stop_at is not None and block is not None and \
                    (block[0], int(block[1]), int(extra_options.get("block_index", 0))) == stop_at:
                raise Stop()
            return n, context, value

        to = {"patches": {"attn1_patch": [patch]}}
        try:
            model.apply_model(x, sigma, transformer_options=to, **conds)
        except Stop:
            pass

    cuts = {"full_forward": None, "stop_after_last_block_all": bench.blocks[-1].key,
            "stop_after_last_block_down_only": select_blocks(bench.blocks, "down-only")[-1].key}
    times: dict[str, list[float]] = {k: [] for k in cuts}
    with torch.no_grad():
        forward(None)
        for _ in range(inner + 1):
            for name, cut in cuts.items():
                times[name].append(time_once(lambda: forward(cut)))
    res = {name: min(ts) for name, ts in times.items()}
    full = res["full_forward"]
    res["saving_all_fraction"] = 1.0 - res["stop_after_last_block_all"] / full
    res["saving_down_only_fraction"] = 1.0 - res["stop_after_last_block_down_only"] / full
    res["note"] = "minimum of interleaved timings; an exception raised from an attn1_patch ends the forward"
    return res


def derived(bench: Bench, diag: dict) -> dict:
    """Floors built from the diagnostics' real kernels (same process, other moment) and the every-step floor."""
    plain = bench.summary["plain"]["step_s_median"]
    reader = diag["reader"]["configs"]
    writer = diag["writer"]
    out: dict = {}
    for name, e in bench.summary.items():
        if e["kind"] in ("cached_masked", "cached_unmasked"):
            floor = plain + reader[name]["reader_minus_plain_s"]
            out[name] = {"kernel_matched_floor_s": floor,
                         "step_over_kernel_matched_floor": e["step_s_median"] / floor}
        elif e["kind"] == "every_step":
            like = bench.configs[name]["keys_like"]
            floor = (plain + writer[name]["writer_pass_s_median"] + reader[like]["reader_minus_plain_s"]
                     + reader[like]["kv_projection_s"])
            out[name] = {"every_step_floor_s": floor, "floor_over_plain": floor / plain,
                         "step_over_every_step_floor": e["step_s_median"] / floor,
                         "writer_share_of_step": writer[name]["writer_pass_s_median"] / e["step_s_median"]}
    out["note"] = ("kernel_matched_floor = plain step + (the reader's real attention call - plain attention), "
                   "i.e. with the SDPA kernel the biased path really uses; every_step_floor = plain step + one "
                   "writer pass + reader attention extra + K/V projection: what a per-step writer must cost")
    return out


def profile_step(bench: Bench, name: str) -> dict:
    """torch.profiler over a 2-step run: the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
    with profile(activities=acts) as prof:
        bench.sample_run(name, steps=2)
    key = "self_cuda_time_total" if on_cuda() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]
    return {"sort_by": key, "steps": 2, "top_ops": [
        {"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1000.0,
         "total_ms": (e.cuda_time_total if on_cuda() else e.cpu_time_total) / 1000.0} for e in events]}


def diagnostics(bench: Bench) -> dict:
    """Every diagnostic of a measured bench; profiles only of what missed its target."""
    import comfy.model_management as mm

    mm.load_models_gpu([bench.model])  # the kernels below use the model's weights outside a sampling run
    diag = {"reader": reader_diagnostics(bench, bench.opts.attn_inner), "writer": writer_diagnostics(bench, 2)}
    missed = [n for n, ok in bench.verdicts.items() if not ok]
    if missed and not bench.opts.no_profile:
        worst_cached = max((n for n in missed if n.startswith("cached")),
                           key=lambda n: bench.summary[n]["over_floor_median"], default=None)
        profiles = {"plain": profile_step(bench, "plain")}
        if worst_cached:
            profiles[worst_cached] = profile_step(bench, worst_cached)
        if any(n.startswith("every_step") for n in missed):
            profiles["every_step_1"] = profile_step(bench, "every_step_1")
        diag["profiles"] = profiles
    diag["derived"] = derived(bench, diag)
    return diag
