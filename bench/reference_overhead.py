#!/usr/bin/env python
"""Per-step overhead of HumanRef's shared-attention references on a full-size SD1.5 UNet (random weights).

    python bench/reference_overhead.py [--out bench/results/reference_overhead_cpu.json] [--runs 5] [--size 256]

What it measures (ARCHITECTURE.md, "Where the time goes"), all in one process on one model object:

* plain sampling (euler, CFG > 1, batch 1: one cond and one uncond chunk per model call) against patched
  sampling with 1, 2 and 4 references of the target's size, for the cached bank ("once at t=0", mode concat)
  with a mask on every reference (dropped tokens + one zero key) and without masks, and for "every step"
  (a writer pass per step, no masks). Each run samples ``--steps`` steps through ``comfy.sample.sample``; a
  callback stamps every step, so the first step (which carries the one-off costs: guider setup, model load
  check, the once-per-run K/V projection, and the first writer pass) is separated from the steady steps.
  Configurations are interleaved within every repetition (plain twice, the others rotated), so machine noise
  hits them alike; ratios are taken within a repetition, then the median over repetitions.
* the floor of a cached configuration: plain step + the extra cost of self-attention over the longer key
  sequence, measured in the same repetition with ComfyUI's ``optimized_attention`` on q/k/v of the real
  shapes of every transformer block (cond rows only), N keys against N + M keys (M = kept reference tokens
  plus the zero key); the analytic extra FLOPs too.
* peak memory per configuration (CUDA max_memory_allocated, or the process peak RSS reset before each run
  through /proc/self/clear_refs on Linux), bank and projected K/V sizes.
* the bank size of one 512x512 reference for SD1.5 in fp16.
* diagnostics (``bench/reference_diagnostics.py``): the reader's attention call against plain attention per
  block (the real kernels), the writer pass and K/V projection alone, and a torch.profiler table of a step for
  any configuration that misses its target.

Benchmarks are never timed tests; this writes JSON and prints a short summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch
from _env import PeakMemory, environment, median, now, on_cuda, setup_comfy, time_both, time_once

TARGETS = {
    "cached_step_over_floor_max": 1.15,
    "every_step_over_plain_max": 2.0,
    "bank_mb_per_reference_512_fp16_max": 25.0,
}
CFG_SCALE = 5.0
REF_COUNTS = (1, 2, 4)
MB = 1e6


# ----------------------------------------------------------------------------------------------- helpers
class CachedVAE:
    """Encodes each distinct reference image once (every bank here reuses the same images)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.cache: dict[tuple, torch.Tensor] = {}
        self.encode_s = 0.0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        key = (pixels.data_ptr(), tuple(pixels.shape), tuple(pixels.stride()))
        if key not in self.cache:
            t0 = now()
            self.cache[key] = self.vae.encode(pixels)
            self.encode_s += now() - t0
        return self.cache[key].clone()


def reference_masks(count: int, size: int) -> torch.Tensor:
    """One rectangle per reference (about 36 % of the image, at different places), like a part mask."""
    masks = torch.zeros(count, size, size)
    side = int(round(size * 0.6))
    for i in range(count):
        off = (i * size // 8) % (size - side + 1)
        masks[i, off:off + side, size - side - off:size - off] = 1.0
    return masks


# ----------------------------------------------------------------------------------------------- summary
def summarise(configs: dict[str, dict], runs: list[dict], deltas: list[dict]) -> tuple[dict, dict]:
    """Per configuration: medians, ratios to plain and to the floor within each repetition, the verdict."""
    reps = sorted({r["rep"] for r in runs})
    plain_by_rep = {}
    plain_amort_by_rep = {}
    plain_cpu_by_rep = {}
    for rep in reps:
        pr = [r for r in runs if r["rep"] == rep and r["config"] == "plain"]
        plain_by_rep[rep] = statistics.mean(r["step_s"] for r in pr)
        plain_amort_by_rep[rep] = statistics.mean(r["amortised_step_s"] for r in pr)
        plain_cpu_by_rep[rep] = statistics.mean(r["cpu_step_s"] for r in pr)
    delta_by_rep = {d["rep"]: d for d in deltas}
    summary = {}
    verdicts = {}
    for name, cfg in configs.items():
        rows = [r for r in runs if r["config"] == name]
        if not rows:
            continue
        steps = [r["step_s"] for r in rows]
        entry = {
            "kind": cfg["kind"],
            "references": cfg["refs"],
            "masked": bool(cfg.get("masked", False)),
            "step_s_median": median(steps),
            "step_s_min": min(steps),
            "step_s_all": steps,
            "amortised_step_s_median": median([r["amortised_step_s"] for r in rows]),
            "first_step_overhead_s_median": median([r["first_step_s"] - r["step_s"] for r in rows]),
            "run_total_s_median": median([r["total_s"] for r in rows]),
            "cpu_step_s_median": median([r["cpu_step_s"] for r in rows]),
            "cpu_step_s_all": [r["cpu_step_s"] for r in rows],
        }
        mem_keys = [k for k in rows[0] if k.endswith("_bytes")]
        for k in mem_keys:
            entry[f"{k}_max"] = max(r[k] for r in rows if r.get(k) is not None)
        if name != "plain":
            ratio_plain = [r["step_s"] / plain_by_rep[r["rep"]] for r in rows]
            entry["over_plain_per_rep"] = ratio_plain
            entry["over_plain_median"] = median(ratio_plain)
            entry["over_plain_ratio_of_medians"] = entry["step_s_median"] / summary["plain"]["step_s_median"]
            entry["amortised_over_plain_median"] = median(
                [r["amortised_step_s"] / plain_amort_by_rep[r["rep"]] for r in rows])
            entry["over_plain_min_ratio"] = entry["step_s_min"] / summary["plain"]["step_s_min"]
            entry["cpu_over_plain_median"] = median([r["cpu_step_s"] / plain_cpu_by_rep[r["rep"]] for r in rows])
        if cfg["kind"] in ("cached_masked", "cached_unmasked"):
            floors = [plain_by_rep[r["rep"]] + delta_by_rep[r["rep"]][name]["delta_s"] for r in rows]
            ratios = [r["step_s"] / f for r, f in zip(rows, floors)]
            amort = [r["amortised_step_s"]
                     / (plain_amort_by_rep[r["rep"]] + delta_by_rep[r["rep"]][name]["delta_s"]) for r in rows]
            entry["attention_delta_s_median"] = median([delta_by_rep[r["rep"]][name]["delta_s"] for r in rows])
            entry["floor_step_s_median"] = median(floors)
            entry["over_floor_per_rep"] = ratios
            entry["over_floor_median"] = median(ratios)
            entry["over_floor_ratio_of_medians"] = entry["step_s_median"] / (
                summary["plain"]["step_s_median"] + entry["attention_delta_s_median"])
            entry["amortised_over_floor_median"] = median(amort)
            entry["over_floor_min_ratio"] = entry["step_s_min"] / (
                summary["plain"]["step_s_min"] + entry["attention_delta_s_median"])
            entry["cpu_over_floor_median"] = median(
                [r["cpu_step_s"] / (plain_cpu_by_rep[r["rep"]] + delta_by_rep[r["rep"]][name]["delta_cpu_s"])
                 for r in rows])
            target = TARGETS["cached_step_over_floor_max"]
            entry["target"] = f"step / floor <= {target}"
            entry["pass"] = entry["over_floor_median"] <= target
            entry["amortised_pass"] = entry["amortised_over_floor_median"] <= target
            verdicts[name] = entry["pass"]
        elif cfg["kind"] == "every_step":
            target = TARGETS["every_step_over_plain_max"]
            entry["target"] = f"step / plain <= {target}"
            entry["pass"] = entry["over_plain_median"] <= target
            entry["amortised_pass"] = entry["amortised_over_plain_median"] <= target
            verdicts[name] = entry["pass"]
        summary[name] = entry
    return summary, verdicts


# ------------------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        import comfy.model_management as mm

        self.opts = opts
        self.device = mm.get_torch_device()
        self.dtype = torch.float16 if on_cuda() else torch.float32
        self.size = opts.size or (512 if on_cuda() else 256)
        self.steps = opts.steps
        self.mem = PeakMemory()
        self.result: dict = {}
        self.t_begin = time.perf_counter()
        self.phase_s: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from humanref.attention.blocks import describe_architecture, walk_transformer_blocks
        from humanref.pipelines.synthetic import base as syn

        t0 = now()
        if self.opts.unet == "full":
            cfg = syn.sd15_unet_config(channel_mult=(1, 2, 4, 4), num_res_blocks=2)
        else:  # a small layout for checking this script quickly
            cfg = syn.sd15_unet_config(model_channels=64, channel_mult=(1, 2), num_res_blocks=1)
        self.model = syn.build_model(cfg, seed=1, arch="sd15", dtype=self.dtype)
        self.unet = self.model.model.diffusion_model
        self.blocks = walk_transformer_blocks(self.unet)
        self.arch = describe_architecture(self.blocks)
        clip, vae = syn.load_test_clip_vae()
        self.clip, self.vae = clip, CachedVAE(vae)
        tokens = clip.tokenize("a photo of a person")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        self.positive = [[cond, {"pooled_output": pooled}]]
        self.negative = [[torch.zeros_like(cond), {"pooled_output": pooled}]]
        lat = self.size // 8
        self.latent = torch.zeros(1, 4, lat, lat)
        self.noise = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(7))
        self.phase_s["setup_model_clip_vae"] = now() - t0

    def build_banks(self) -> None:
        from humanref.pipelines.references.inputs import prepare_references
        from humanref.pipelines.references.patch import apply_reference_patch, build_reference_bank

        t0 = now()
        s = self.size
        gen = torch.Generator().manual_seed(11)
        images = torch.rand(max(REF_COUNTS), s, s, 3, generator=gen)
        masks = reference_masks(max(REF_COUNTS), s)
        self.ref_images = images  # keep alive: the VAE cache is keyed by storage
        self.configs: dict[str, dict] = {"plain": {"kind": "plain", "refs": 0, "patcher": self.model}}
        self.bank_build_s: dict[str, float] = {}
        for n in REF_COUNTS:
            for kind, timing, masked in (("cached_masked", "once at t=0", True),
                                         ("cached_unmasked", "once at t=0", False),
                                         ("every_step", "every step", False)):
                name = f"{kind}_{n}"
                refs = prepare_references([(1, images[:n], masks[:n] if masked else None, "person")], s, 6)
                tb = now()
                bank = build_reference_bank(self.model, self.vae, self.clip, refs, timing, "parts2whole")
                self.bank_build_s[name] = now() - tb
                patched = apply_reference_patch(self.model, bank, mode="concat")
                self.configs[name] = {"kind": kind, "refs": n, "masked": masked, "bank": bank, "patcher": patched}
        # every-step keys equal the unmasked cached bank's (same images, no masks)
        for n in REF_COUNTS:
            self.configs[f"every_step_{n}"]["keys_like"] = f"cached_unmasked_{n}"
        self.phase_s["build_banks"] = now() - t0
        self.phase_s["vae_encode_unique_images"] = self.vae.encode_s

    # --------------------------------------------------------------------------------------- static sizes
    def block_table(self) -> None:
        """Token counts per block at this size, reference keys per configuration, sizes and analytic FLOPs."""
        grid = {}
        probe = self.configs["cached_unmasked_1"]["bank"]
        for b in self.blocks:
            merged = probe.merged(b.key)
            grid[b.key] = merged.tokens.shape[0]  # one unmasked same-size reference: exactly N tokens
        self.block_rows = []
        for b in self.blocks:
            tb = self.unet.get_submodule(b.path)
            self.block_rows.append({"key": list(b.key), "path": b.path, "channels": b.channels,
                                    "heads": int(tb.n_heads), "dim_head": int(tb.d_head), "tokens": grid[b.key]})
        esize = torch.empty((), dtype=self.dtype).element_size()
        self.keys: dict[str, list[int]] = {}
        sizes: dict[str, dict] = {}
        for name, cfg in self.configs.items():
            if cfg["kind"] == "plain":
                continue
            src = self.configs[cfg.get("keys_like", name)]["bank"]
            m_per_block = []
            for b in self.blocks:
                merged = src.merged(b.key)
                m = merged.tokens.shape[0] + (1 if merged.dropped > 0 else 0)  # concat dilutes: one zero key
                m_per_block.append(m)
            self.keys[name] = m_per_block
            attn_flops = sum(4 * row["tokens"] * m * row["channels"] for row, m in zip(self.block_rows, m_per_block))
            proj_flops = sum(2 * 2 * m * row["channels"] * row["channels"]
                             for row, m in zip(self.block_rows, m_per_block))
            kv_bytes = sum(2 * m * row["channels"] * esize for row, m in zip(self.block_rows, m_per_block))
            bias_bytes = sum(4 * m for m in m_per_block) if cfg.get("masked") else 0
            bank = cfg["bank"]
            entry = {
                "reference_keys_per_block": m_per_block,
                "reference_keys_total": sum(m_per_block),
                "dropped_tokens_total": (sum(src.merged(b.key).dropped for b in self.blocks)),
                "extra_attention_flops_per_step": attn_flops,  # cond rows only (batch 1): QK^T + AV
                "kv_projection_flops_per_run" if cfg["kind"] != "every_step" else "kv_projection_flops_per_step":
                    proj_flops,
                "bank_bytes": bank.nbytes(),
                "projected_kv_bytes": kv_bytes + bias_bytes,
            }
            if cfg["kind"] == "every_step":
                entry["writer_features_bytes_per_step"] = self.configs[cfg["keys_like"]]["bank"].nbytes()
            sizes[name] = entry
        self.sizes = sizes

    def plain_flops(self) -> Optional[int]:
        """FLOPs of one plain model call (cond + uncond rows), counted by torch's FlopCounterMode."""
        try:
            from torch.utils.flop_counter import FlopCounterMode

            ctx = torch.cat([self.positive[0][0], self.negative[0][0]]).to(self.device, self.dtype)
            x = torch.randn(2, 4, self.size // 8, self.size // 8, device=self.device, dtype=self.dtype)
            sigma = torch.full((2,), 5.0, device=self.device)
            import comfy.model_management as mm

            mm.load_models_gpu([self.model])
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                self.model.model.apply_model(x, sigma, c_crossattn=ctx)
            return int(fc.get_total_flops())
        except Exception as exc:  # the count is informative only
            print(f"flop count failed: {exc}", file=sys.stderr)
            return None

    # --------------------------------------------------------------------------------------- sampling runs
    def sample_run(self, name: str, steps: Optional[int] = None, probe: Optional[list] = None) -> dict:
        import comfy.sample

        cfg = self.configs[name]
        steps = steps or self.steps
        stamps: list[float] = []

        cpu_stamps: list[float] = []

        def callback(step, x0, x, total):
            stamps.append(now())
            cpu_stamps.append(time.process_time())

        patcher = cfg["patcher"]
        if probe is not None:
            patcher = patcher.clone()
            import comfy.patcher_extension as pe

            def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kw):
                probe.append({"batch": int(x.shape[0]),
                              "cond_or_uncond": list(transformer_options.get("cond_or_uncond") or [])})
                return executor(x, timesteps, context, y, control, transformer_options, **kw)

            patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_probe", wrapper)
        mem0 = self.mem.start()
        c0, t0 = time.process_time(), now()
        with torch.no_grad():
            comfy.sample.sample(patcher, self.noise, steps, CFG_SCALE, "euler", "normal", self.positive,
                                self.negative, self.latent, callback=callback, disable_pbar=True, seed=7)
        t1, c1 = now(), time.process_time()
        mem = self.mem.stop(mem0)
        steady = [b - a for a, b in zip(stamps, stamps[1:])]
        steady_cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]
        rec = {
            "config": name,
            "steps": steps,
            "total_s": t1 - t0,
            "first_step_s": stamps[0] - t0 if stamps else None,
            "steady_steps_s": steady,
            "step_s": (sum(steady) / len(steady)) if steady else None,
            "amortised_step_s": (t1 - t0) / steps,
            "cpu_total_s": c1 - c0,
            "cpu_first_step_s": cpu_stamps[0] - c0 if cpu_stamps else None,
            "cpu_step_s": (sum(steady_cpu) / len(steady_cpu)) if steady_cpu else None,
            "cpu_amortised_step_s": (c1 - c0) / steps,
            "loadavg_1m": os.getloadavg()[0],
        }
        rec.update(mem)
        return rec

    # ------------------------------------------------------------------------------------- floor (attention)
    def attention_deltas(self, inner: int) -> dict:
        """Per variant, sum over blocks of t(attn, N + M keys) - t(attn, N keys), cond rows only (batch 1).

        Each shape is timed ``inner`` times, interleaved, and its minimum is kept (a kernel's time is its
        fastest run; other processes only add to it); wall and process-CPU seconds both.
        """
        import comfy.ldm.modules.attention as ca

        variants = {name: m for name, m in self.keys.items() if not name.startswith("every_step")}
        base_w: list[float] = []
        base_c: list[float] = []
        var_w: dict[str, list[float]] = {v: [] for v in variants}
        var_c: dict[str, list[float]] = {v: [] for v in variants}
        gen = torch.Generator(device="cpu").manual_seed(3)
        with torch.no_grad():
            for bi, row in enumerate(self.block_rows):
                n, c, heads = row["tokens"], row["channels"], row["heads"]
                longest = n + max(m[bi] for m in variants.values())
                q = torch.randn(1, n, c, generator=gen).to(self.device, self.dtype)
                k = torch.randn(1, longest, c, generator=gen).to(self.device, self.dtype)
                v = torch.randn(1, longest, c, generator=gen).to(self.device, self.dtype)
                kv = {length: (k[:, :length].contiguous(), v[:, :length].contiguous())
                      for length in {n} | {n + m[bi] for m in variants.values()}}

                def run(length: int) -> tuple[float, float]:
                    kk, vv = kv[length]
                    return time_both(lambda: ca.optimized_attention(q, kk, vv, heads, transformer_options={}))

                run(n)  # warm the shapes
                base, var = [], {name: [] for name in variants}
                for _ in range(inner):
                    base.append(run(n))
                    for name, m in variants.items():
                        var[name].append(run(n + m[bi]))
                base_w.append(min(t[0] for t in base))
                base_c.append(min(t[1] for t in base))
                for name in variants:
                    var_w[name].append(min(t[0] for t in var[name]))
                    var_c[name].append(min(t[1] for t in var[name]))
        out = {"base_attention_s": sum(base_w), "base_attention_cpu_s": sum(base_c),
               "base_attention_per_block_s": base_w}
        for name in variants:
            per_block = [a - b for a, b in zip(var_w[name], base_w)]
            out[name] = {
                "delta_s": sum(per_block),
                "delta_cpu_s": sum(a - b for a, b in zip(var_c[name], base_c)),
                "per_block_delta_s": per_block,
            }
        return out

    # --------------------------------------------------------------------------------------------- reps
    def order_for(self, rep: int) -> list[str]:
        others = [n for n in self.configs if n != "plain"]
        r = rep % len(others)
        rot = others[r:] + others[:r]
        if rep % 2:
            rot = rot[::-1]
        mid = len(rot) // 2
        return ["plain"] + rot[:mid] + ["plain"] + rot[mid:]

    def repetitions(self) -> None:
        self.runs: list[dict] = []
        self.deltas: list[dict] = []
        t0 = now()
        for rep in range(self.opts.runs):
            order = self.order_for(rep)
            for pos, name in enumerate(order):
                rec = self.sample_run(name)
                rec.update({"rep": rep, "position": pos})
                self.runs.append(rec)
                print(f"rep {rep} {name:18s} step {rec['step_s']:.3f}s cpu {rec['cpu_step_s']:.3f}s "
                      f"first {rec['first_step_s']:.3f}s "
                      f"load {rec['loadavg_1m']:.1f}", flush=True)
                if pos == 0:
                    d = self.attention_deltas(self.opts.attn_inner)
                    d["rep"] = rep
                    self.deltas.append(d)
            self.phase_s["repetitions"] = now() - t0
            self.summary, self.verdicts = summarise(self.configs, self.runs, self.deltas)
            self.write()

    # ------------------------------------------------------------------------------------------ bank at 512
    def bank_512(self) -> dict:
        """One unmasked 512x512 reference through the writer: the bank's bytes, as fp16."""
        from humanref.pipelines.references.inputs import prepare_references
        from humanref.pipelines.references.patch import build_reference_bank

        t0 = now()
        fp16_conv_probe = None
        if not on_cuda():
            x = torch.randn(1, 320, 16, 16, dtype=torch.float16)
            w = torch.randn(320, 320, 3, 3, dtype=torch.float16)
            try:
                fp16_conv_probe = time_once(lambda: torch.nn.functional.conv2d(x, w, padding=1))
                x32, w32 = x.float(), w.float()
                fp32_conv = time_once(lambda: torch.nn.functional.conv2d(x32, w32, padding=1))
            except Exception as exc:
                fp16_conv_probe, fp32_conv = f"unsupported: {exc}", None
        image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(13))
        refs = prepare_references([(1, image, None, "person")], 512, 6)
        bank = build_reference_bank(self.model, self.vae.vae, self.clip, refs, "once at t=0", "parts2whole")
        nbytes = bank.nbytes()
        dtypes = sorted({str(e.tokens.dtype).replace("torch.", "") for es in bank.features.values() for e in es})
        elements = sum(e.tokens.numel() for es in bank.features.values() for e in es)
        per_block = {f"{k[0]}_{k[1]}.{k[2]}": list(es[0].tokens.shape) for k, es in bank.features.items()}
        fp16_bytes = elements * 2
        out = {
            "image": [512, 512],
            "unet": self.arch,
            "writer_dtype": dtypes,
            "tokens_x_channels_per_block": per_block,
            "elements": elements,
            "bank_bytes_as_built": nbytes,
            "bank_mb_fp16": fp16_bytes / MB,
            "target_mb_max": TARGETS["bank_mb_per_reference_512_fp16_max"],
            "pass": fp16_bytes / MB <= TARGETS["bank_mb_per_reference_512_fp16_max"],
            "build_s": now() - t0,
        }
        if self.dtype != torch.float16:
            out["how"] = ("built with the writer in fp32 and reported as 2 bytes per element of the same tokens: "
                          "torch on this CPU runs fp16 convolutions, but about "
                          f"{fp16_conv_probe:.2f} s for one 320x320 3x3 conv at 16x16 against "
                          f"{fp32_conv:.3f} s in fp32, so an fp16 writer pass is impractical here"
                          if isinstance(fp16_conv_probe, float) else
                          f"built in fp32 (fp16 convolutions {fp16_conv_probe}), reported as bytes/2")
            out["fp16_conv_probe_s"] = fp16_conv_probe
        else:
            out["how"] = "built with the writer in fp16"
        del bank
        return out

    # ----------------------------------------------------------------------------------------------- output
    def write(self) -> None:
        res = {
            "benchmark": "reference_overhead",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "environment": self.env,
            "targets": TARGETS,
            "setup": {
                "unet": self.arch,
                "image_size": self.size,
                "latent": list(self.latent.shape),
                "dtype": str(self.dtype).replace("torch.", ""),
                "sampler": "euler", "scheduler": "normal", "cfg": CFG_SCALE, "batch": 1,
                "steps_per_run": self.steps,
                "runs": self.opts.runs,
                "model_calls_seen": self.probe,
                "reference_size": [self.size, self.size],
                "masks": "one rectangle per reference, ~36 % of its area (parts2whole rule: dilated on each grid)",
                "modes": {"cached_masked_n": "once at t=0, concat, masks (dropped tokens + one zero key)",
                          "cached_unmasked_n": "once at t=0, concat, no masks",
                          "every_step_n": "every step (writer pass per step, cond chunk only), concat, no masks"},
                "step_time": ("mean of the steady steps (2..k) of a run, stamped by the sampler callback; the first "
                              "step carries the one-off costs (guider setup, load check, K/V projection, first "
                              "writer pass) and is reported as first_step_overhead_s; amortised_step_s = run / k"),
                "floor": ("plain step of the same repetition + sum over transformer blocks of "
                          "t(optimized_attention, cond rows, N + M keys) - t(.., N keys), measured right after "
                          "the repetition's first plain run"),
                "order": "per repetition: plain, half the others (rotated), plain, the rest; plain = mean of both",
                "blocks": getattr(self, "block_rows", None),
            },
            "phase_s": self.phase_s,
            "plain_model_call_flops": getattr(self, "flops", None),
            "sizes": getattr(self, "sizes", None),
            "bank_build_s": getattr(self, "bank_build_s", None),
            "summary": getattr(self, "summary", None),
            "verdicts": getattr(self, "verdicts", None),
            "attention_deltas": getattr(self, "deltas", None),
            "runs": getattr(self, "runs", None),
            "diagnostics": getattr(self, "diag", None),
            "bank_512_fp16": getattr(self, "bank512", None),
        }
        res["environment"]["loadavg_now"] = list(os.getloadavg())
        res["environment"]["wall_s"] = time.perf_counter() - self.t_begin
        os.makedirs(os.path.dirname(os.path.abspath(self.opts.out)), exist_ok=True)
        tmp = self.opts.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, self.opts.out)

    def environment(self) -> dict:
        import comfy.ldm.modules.attention as comfy_attention
        import comfy.model_management as mm

        return environment(
            str(self.device), self.opts.comfyui, dtype=str(self.dtype).replace("torch.", ""),
            threads_note=("one intra-op thread by default on CPU: on a shared machine a preempted OpenMP thread "
                          "makes the other spin at every barrier, which inflated wall and CPU time 2-6x at random "
                          "in a 2-thread trial here; with one thread the process CPU time is the work done, and "
                          "the ratios (a property of the work) are stable") if not on_cuda() else None,
            attention_backend=getattr(comfy_attention.optimized_attention, "__name__", "?"),
            attention_backend_note=("ComfyUI's optimized_attention (what plain attn1 and the unmasked reader use); "
                                    "the reader's biased path (zero key, strength != 1) calls "
                                    "torch.nn.functional.scaled_dot_product_attention directly"),
            vram_state=str(getattr(mm, "vram_state", "")))

    def run(self) -> None:
        self.env = self.environment()
        self.probe: list = []
        self.chunks: list = []
        self.setup()
        print(f"{self.arch}, {self.size}px, {self.env['attention_backend']}, setup {self.phase_s}", flush=True)
        self.build_banks()
        self.block_table()
        t0 = now()
        self.flops = self.plain_flops()
        self.phase_s["flop_count"] = now() - t0
        self.write()
        # warm-up: one short run of each kind (first calls of the kernels, shapes and code paths)
        t0 = now()
        self.sample_run("plain", steps=1, probe=self.probe)
        self.chunks = self.probe[0]["cond_or_uncond"] if self.probe else []
        for name in ("cached_masked_1", "cached_unmasked_1", "every_step_1"):
            self.sample_run(name, steps=1)
        self.attention_deltas(1)
        self.phase_s["warmup"] = now() - t0
        self.repetitions()
        if not self.opts.no_diagnostics:
            from reference_diagnostics import diagnostics

            t0 = now()
            self.diag = diagnostics(self)
            self.phase_s["diagnostics"] = now() - t0
            self.write()
        if not self.opts.no_bank512:
            self.bank512 = self.bank_512()
            self.phase_s["bank_512"] = self.bank512["build_s"]
        self.write()
        self.print_summary()

    def print_summary(self) -> None:
        print(f"\n{'config':18s} {'step s':>8s} {'/plain':>7s} {'/floor':>7s} {'cpu/pl':>7s} {'cpu/fl':>7s}  verdict")

        def f(x):
            return f"{x:7.3f}" if x is not None else "      -"

        for name, e in self.summary.items():
            print(f"{name:18s} {e['step_s_median']:8.3f} {f(e.get('over_plain_median', 1.0))} "
                  f"{f(e.get('over_floor_median'))} {f(e.get('cpu_over_plain_median', 1.0))} "
                  f"{f(e.get('cpu_over_floor_median'))}  "
                  f"{'' if 'pass' not in e else ('pass' if e['pass'] else 'FAIL')}")
        if getattr(self, "bank512", None):
            b = self.bank512
            print(f"bank 512x512 fp16 per reference: {b['bank_mb_fp16']:.2f} MB ({'pass' if b['pass'] else 'FAIL'})")
        print(f"wrote {self.opts.out} in {time.perf_counter() - self.t_begin:.0f} s")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = "bench/results/reference_overhead_cuda.json" if torch.cuda.is_available() else \
        "bench/results/reference_overhead_cpu.json"
    p.add_argument("--out", default=default_out)
    p.add_argument("--runs", type=int, default=5, help="repetitions of every configuration (>= 5 for results)")
    p.add_argument("--size", type=int, default=0, help="image size in pixels (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--steps", type=int, default=3, help="sampler steps per run (>= 3: first + steady steps)")
    p.add_argument("--attn-inner", type=int, default=3, help="timings per attention shape (median)")
    p.add_argument("--unet", choices=("full", "small"), default="full", help="small: only to check the script")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch intra-op threads; default 1 on CPU (robust on a shared machine), torch's own on CUDA; "
                        "0 = torch's default")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    p.add_argument("--no-diagnostics", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-bank512", action="store_true")
    opts = p.parse_args(argv)
    if opts.steps < 2:
        p.error("--steps must be >= 2 (the first step carries one-off costs)")
    if opts.threads < 0:
        opts.threads = 0 if torch.cuda.is_available() else 1
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    setup_comfy(opts.comfyui)
    Bench(opts).run()


if __name__ == "__main__":
    main()
