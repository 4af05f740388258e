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
* diagnostics: the reader's attention call against plain attention per block (the real kernels), the writer
  pass and K/V projection alone, and a torch.profiler table of a step for any configuration that misses
  its target.

Benchmarks are never timed tests; this writes JSON and prints a short summary.
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
import time
from typing import Any, Callable, Optional

import torch

from humanref.pipelines.comfy_env import import_comfy

TARGETS = {
    "cached_step_over_floor_max": 1.15,
    "every_step_over_plain_max": 2.0,
    "bank_mb_per_reference_512_fp16_max": 25.0,
}
CFG_SCALE = 5.0
REF_COUNTS = (1, 2, 4)
MB = 1e6


# --------------------------------------------------------------------------------------------- environment
def on_cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def now() -> float:
    sync()
    return time.perf_counter()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_head(path: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def environment(device: torch.device, dtype: torch.dtype, repo: str) -> dict:
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm

    try:
        from comfyui_version import __version__ as comfy_version
    except Exception:
        comfy_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "comfyui": comfy_version,
        "humanref_commit": git_head(repo),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if on_cuda() else cpu_model(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "threads_note": ("one intra-op thread by default on CPU: on a shared machine a preempted OpenMP thread "
                         "makes the other spin at every barrier, which inflated wall and CPU time 2-6x at random "
                         "in a 2-thread trial here; with one thread the process CPU time is the work done, and "
                         "the ratios (a property of the work) are stable") if not on_cuda() else None,
        "cpu_count": os.cpu_count(),
        "attention_backend": getattr(comfy_attention.optimized_attention, "__name__", "?"),
        "attention_backend_note": ("ComfyUI's optimized_attention (what plain attn1 and the unmasked reader use); "
                                   "the reader's biased path (zero key, strength != 1) calls "
                                   "torch.nn.functional.scaled_dot_product_attention directly"),
        "vram_state": str(getattr(mm, "vram_state", "")),
        "loadavg_start": list(os.getloadavg()),
    }
    if on_cuda():
        env["cuda"] = torch.version.cuda
    return env


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of one region: CUDA max_memory_allocated, or the RSS high-water mark (VmHWM) on Linux CPU."""

    def __init__(self) -> None:
        self.can_reset_rss = False
        if not on_cuda():
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset_rss = True
            except OSError:
                pass

    @staticmethod
    def _status(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> dict:
        if on_cuda():
            torch.cuda.reset_peak_memory_stats()
            return {"allocated": torch.cuda.memory_allocated()}
        if self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return {"rss": self._status("VmRSS")}

    def stop(self, start: dict) -> dict:
        if on_cuda():
            peak = torch.cuda.max_memory_allocated()
            return {"cuda_max_allocated_bytes": peak, "cuda_peak_above_start_bytes": peak - start["allocated"]}
        hwm = self._status("VmHWM") if self.can_reset_rss else None
        out = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if hwm is not None:
            out["peak_rss_bytes"] = hwm
            if start.get("rss") is not None:
                out["peak_rss_above_start_bytes"] = hwm - start["rss"]
        return out


# ----------------------------------------------------------------------------------------------- helpers
def med(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def time_once(fn: Callable[[], Any]) -> float:
    t0 = now()
    fn()
    return now() - t0


def time_both(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): CPU time is far less disturbed by other processes on a shared CPU."""
    c0, t0 = time.process_time(), now()
    fn()
    t1 = now()
    return t1 - t0, time.process_time() - c0


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
            self.summarise()
            self.write()

    # ------------------------------------------------------------------------------------------- summary
    def summarise(self) -> None:
        reps = sorted({r["rep"] for r in self.runs})
        plain_by_rep = {}
        plain_amort_by_rep = {}
        plain_cpu_by_rep = {}
        for rep in reps:
            pr = [r for r in self.runs if r["rep"] == rep and r["config"] == "plain"]
            plain_by_rep[rep] = statistics.mean(r["step_s"] for r in pr)
            plain_amort_by_rep[rep] = statistics.mean(r["amortised_step_s"] for r in pr)
            plain_cpu_by_rep[rep] = statistics.mean(r["cpu_step_s"] for r in pr)
        delta_by_rep = {d["rep"]: d for d in self.deltas}
        summary = {}
        verdicts = {}
        for name, cfg in self.configs.items():
            rows = [r for r in self.runs if r["config"] == name]
            if not rows:
                continue
            steps = [r["step_s"] for r in rows]
            entry = {
                "kind": cfg["kind"],
                "references": cfg["refs"],
                "masked": bool(cfg.get("masked", False)),
                "step_s_median": med(steps),
                "step_s_min": min(steps),
                "step_s_all": steps,
                "amortised_step_s_median": med([r["amortised_step_s"] for r in rows]),
                "first_step_overhead_s_median": med([r["first_step_s"] - r["step_s"] for r in rows]),
                "run_total_s_median": med([r["total_s"] for r in rows]),
                "cpu_step_s_median": med([r["cpu_step_s"] for r in rows]),
                "cpu_step_s_all": [r["cpu_step_s"] for r in rows],
            }
            mem_keys = [k for k in rows[0] if k.endswith("_bytes")]
            for k in mem_keys:
                entry[f"{k}_max"] = max(r[k] for r in rows if r.get(k) is not None)
            if name != "plain":
                ratio_plain = [r["step_s"] / plain_by_rep[r["rep"]] for r in rows]
                entry["over_plain_per_rep"] = ratio_plain
                entry["over_plain_median"] = med(ratio_plain)
                entry["over_plain_ratio_of_medians"] = entry["step_s_median"] / summary["plain"]["step_s_median"]
                entry["amortised_over_plain_median"] = med(
                    [r["amortised_step_s"] / plain_amort_by_rep[r["rep"]] for r in rows])
                entry["over_plain_min_ratio"] = entry["step_s_min"] / summary["plain"]["step_s_min"]
                entry["cpu_over_plain_median"] = med([r["cpu_step_s"] / plain_cpu_by_rep[r["rep"]] for r in rows])
            if cfg["kind"] in ("cached_masked", "cached_unmasked"):
                floors = [plain_by_rep[r["rep"]] + delta_by_rep[r["rep"]][name]["delta_s"] for r in rows]
                ratios = [r["step_s"] / f for r, f in zip(rows, floors)]
                amort = [r["amortised_step_s"]
                         / (plain_amort_by_rep[r["rep"]] + delta_by_rep[r["rep"]][name]["delta_s"]) for r in rows]
                entry["attention_delta_s_median"] = med([delta_by_rep[r["rep"]][name]["delta_s"] for r in rows])
                entry["floor_step_s_median"] = med(floors)
                entry["over_floor_per_rep"] = ratios
                entry["over_floor_median"] = med(ratios)
                entry["over_floor_ratio_of_medians"] = entry["step_s_median"] / (
                    summary["plain"]["step_s_median"] + entry["attention_delta_s_median"])
                entry["amortised_over_floor_median"] = med(amort)
                entry["over_floor_min_ratio"] = entry["step_s_min"] / (
                    summary["plain"]["step_s_min"] + entry["attention_delta_s_median"])
                entry["cpu_over_floor_median"] = med(
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
        self.summary = summary
        self.verdicts = verdicts

    # ------------------------------------------------------------------------------------------ diagnostics
    def reader_diagnostics(self, inner: int) -> dict:
        """The real reader call against plain attention per block (batch = cond + uncond rows), and its parts.

        Minimum over ``inner`` interleaved timings per shape."""
        import comfy.ldm.modules.attention as ca
        from humanref.attention.kernels import project_references, sdpa
        from humanref.attention.reader import ActiveLayer, reference_attention

        chunks = self.chunks or [1, 0]
        b = len(chunks)
        out: dict = {"cond_or_uncond": chunks, "configs": {}}
        gen = torch.Generator(device="cpu").manual_seed(5)
        totals = {name: {"reader_minus_plain_s": 0.0, "kv_projection_s": 0.0} for name in self.keys
                  if not name.startswith("every_step")}
        split = {"plain_batch2_s": 0.0, "two_batch1_s": 0.0}
        biased = {name: 0.0 for name in totals}

        def host_attn(q, k, v, heads):
            return ca.optimized_attention(q, k, v, heads, transformer_options={})

        with torch.no_grad():
            for bi, (row, info) in enumerate(zip(self.block_rows, self.blocks)):
                n, c, heads = row["tokens"], row["channels"], row["heads"]
                q = torch.randn(b, n, c, generator=gen).to(self.device, self.dtype)
                k = torch.randn(b, n, c, generator=gen).to(self.device, self.dtype)
                v = torch.randn(b, n, c, generator=gen).to(self.device, self.dtype)
                attn1 = self.unet.get_submodule(info.path).attn1
                layers = {}
                for name in totals:
                    merged = self.configs[name]["bank"].merged(info.key)
                    tokens = merged.tokens.to(self.device, self.dtype)
                    tp = []
                    for _ in range(inner):
                        tp.append(time_once(lambda: project_references(tokens, merged.dropped, attn1.to_k,
                                                                      attn1.to_v)))
                    totals[name]["kv_projection_s"] += min(tp)
                    refs = project_references(tokens, merged.dropped, attn1.to_k, attn1.to_v)
                    layers[name] = (refs, [ActiveLayer("concat", refs)])
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
            totals[name]["sdpa_bias_minus_optimized_attention_s"] = biased[name] if self.configs[name].get(
                "masked") else None
            out["configs"][name] = totals[name]
        out["cfg_split"] = split
        out["note"] = ("reader_minus_plain_s: sum over blocks of the reader's attention call (per-chunk split, "
                       "key concat, kernel) minus plain attention of the same batch; compare with the floor's "
                       "attention_delta_s. sdpa_bias_minus_optimized_attention_s: what the biased SDPA path "
                       "costs against optimized_attention on the same (cond) keys.")
        return out

    def writer_diagnostics(self, inner: int) -> dict:
        """A writer pass alone per reference count (the per-step cost every-step mode adds besides attention),
        and what stopping the writer's forward right after its last captured block would save (1 reference)."""
        from humanref.pipelines.references.writer import run_writer

        out: dict = {}
        with torch.no_grad():
            for n in REF_COUNTS:
                cfg = self.configs[f"every_step_{n}"]
                writer = cfg["bank"].writer
                ts = [time_once(lambda: run_writer(writer, 3.0)) for _ in range(inner)]
                out[f"every_step_{n}"] = {"writer_pass_s_median": med(ts), "writer_pass_s_all": ts}
            out["early_exit_1_reference"] = self.writer_early_exit(inner)
        return out

    def writer_early_exit(self, inner: int) -> dict:
        """Time the writer forward (batch 1, sigma 3) in full against one cut right after the norm1 capture of
        the last block it needs: all blocks (the default block set) and the input blocks only (down-only)."""
        from humanref.attention.blocks import select_blocks

        class Stop(Exception):
            pass

        writer = self.configs["every_step_1"]["bank"].writer
        group = writer.groups[0]
        model = self.model.model
        x = group.latents.to(self.device, self.dtype)
        noise = writer.noise_for(0, self.device, x.dtype)
        sigma = torch.tensor([3.0], device=self.device)
        x = model.model_sampling.noise_scaling(sigma, noise, x)
        conds = {k: v.to(self.device) for k, v in group.conds.items()}

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

        cuts = {"full_forward": None, "stop_after_last_block_all": self.blocks[-1].key,
                "stop_after_last_block_down_only": select_blocks(self.blocks, "down-only")[-1].key}
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

    def derived(self) -> dict:
        """Floors built from the diagnostics' real kernels (same process, other moment) and the every-step floor."""
        if not getattr(self, "diag", None):
            return {}
        plain = self.summary["plain"]["step_s_median"]
        reader = self.diag["reader"]["configs"]
        writer = self.diag["writer"]
        out: dict = {}
        for name, e in self.summary.items():
            if e["kind"] in ("cached_masked", "cached_unmasked"):
                floor = plain + reader[name]["reader_minus_plain_s"]
                out[name] = {"kernel_matched_floor_s": floor,
                             "step_over_kernel_matched_floor": e["step_s_median"] / floor}
            elif e["kind"] == "every_step":
                like = self.configs[name]["keys_like"]
                floor = (plain + writer[name]["writer_pass_s_median"] + reader[like]["reader_minus_plain_s"]
                         + reader[like]["kv_projection_s"])
                out[name] = {"every_step_floor_s": floor, "floor_over_plain": floor / plain,
                             "step_over_every_step_floor": e["step_s_median"] / floor,
                             "writer_share_of_step": writer[name]["writer_pass_s_median"] / e["step_s_median"]}
        out["note"] = ("kernel_matched_floor = plain step + (the reader's real attention call - plain attention), "
                       "i.e. with the SDPA kernel the biased path really uses; every_step_floor = plain step + one "
                       "writer pass + reader attention extra + K/V projection: what a per-step writer must cost")
        return out

    def profile_step(self, name: str) -> dict:
        """torch.profiler over a 2-step run: the ops with the most self time."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda() else [])
        with profile(activities=acts) as prof:
            self.sample_run(name, steps=2)
        key = "self_cuda_time_total" if on_cuda() else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]
        return {"sort_by": key, "steps": 2, "top_ops": [
            {"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1000.0,
             "total_ms": (e.cuda_time_total if on_cuda() else e.cpu_time_total) / 1000.0} for e in events]}

    def diagnostics(self) -> None:
        import comfy.model_management as mm

        t0 = now()
        mm.load_models_gpu([self.model])  # the kernels below use the model's weights outside a sampling run
        diag = {"reader": self.reader_diagnostics(self.opts.attn_inner),
                "writer": self.writer_diagnostics(2)}
        missed = [n for n, ok in self.verdicts.items() if not ok]
        if missed and not self.opts.no_profile:
            worst_cached = max((n for n in missed if n.startswith("cached")),
                               key=lambda n: self.summary[n]["over_floor_median"], default=None)
            profiles = {"plain": self.profile_step("plain")}
            if worst_cached:
                profiles[worst_cached] = self.profile_step(worst_cached)
            if any(n.startswith("every_step") for n in missed):
                profiles["every_step_1"] = self.profile_step("every_step_1")
            diag["profiles"] = profiles
        self.diag = diag
        self.diag["derived"] = self.derived()
        self.phase_s["diagnostics"] = now() - t0

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

    def run(self) -> None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = environment(self.device, self.dtype, repo)
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
            self.diagnostics()
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
    import_comfy(opts.comfyui, cpu=not torch.cuda.is_available())
    Bench(opts).run()


if __name__ == "__main__":
    main()
