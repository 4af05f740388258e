"""Likeness benchmark: on a mini latent diffusion model trained here (minutes on a CPU), how far does each
reference mode move a sample's appearance toward the reference's, and does its layout still follow the prompt?

    python bench/likeness [--refs 6] [--steps 10] [--retrain] [--rows "concat; dual"]
    python -m bench.likeness ...   (the same, from the repository root)

1. The model (``model.py``): the tiny SD1.5 UNet layout trained from scratch on the synthetic figures of
   ``figures.py`` (six layouts named by the prompt; colours and shirt pattern random and independent of the
   layout), with the random CLIP-L and an exact box codec as its VAE (``codec.py``). The checkpoint is cached
   under ``bench/out/likeness/`` (git-ignored) and loads in ComfyUI as SD15 (CheckpointLoaderSimple).
2. The evaluation: ``--refs`` references (seeds 10000 + r: a random look in a random layout), each with the five
   *other* layouts as prompts, sampled as one batch of five with noise seed 1000 + r: 5 * refs samples per row.
   Every row uses the same prompts and noise; the baseline row samples without a reference. The references go
   through the pack's own engine: ``prepare_references`` -> ``build_reference_bank`` (once at t=0, the
   reference's own prompt as its label) -> ``apply_reference_patch`` with the row's mode and keyword arguments,
   sampled with ComfyUI's KSampler (``nodes.common_ksampler``).
3. The metrics (``metric.py``) per sample, summarised per row as median and quartiles, written as JSON and a
   markdown table (default ``bench/results/likeness_cpu.json`` / ``.md``).

Rows are declarative (``rows.py``); a row whose mode or keyword argument this build lacks is reported as
"not available in this build". Benchmarks are never timed tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Optional

import torch

from . import codec, figures, metric, model
from .rows import BASELINE, ROWS, Row, unavailable

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
if BENCH not in sys.path:  # _env lives next to the benchmark scripts
    sys.path.insert(0, BENCH)

from _env import environment, setup_comfy  # noqa: E402

REFERENCE_SEED = 10_000
NOISE_SEED = 1_000
MASK_RULE = "parts2whole"
EXAMPLE_CASES = 2


class Case:
    """One reference (and its distractor and an unseen look for the placebo), with the five other layouts."""

    def __init__(self, index: int) -> None:
        gen = torch.Generator().manual_seed(REFERENCE_SEED + index)
        self.index = index
        self.layout, self.look, self.cells = figures.sample(gen)
        _, _, self.distractor = figures.sample(gen)
        unseen = figures.random_appearance(gen)
        self.unseen_cells = figures.render(figures.LAYOUTS[self.layout], unseen)
        self.targets = [i for i in range(len(figures.LAYOUTS)) if i != self.layout]
        self.noise_seed = NOISE_SEED + index

    def mask(self, kind: str) -> Optional[torch.Tensor]:
        if not kind:
            return None
        part = figures.parts(figures.LAYOUTS[self.layout])
        cells = figures.silhouette(figures.LAYOUTS[self.layout]) if kind == "figure" else part[kind]
        return cells.float().repeat_interleave(figures.CELL, 0).repeat_interleave(figures.CELL, 1).unsqueeze(0)


class Evaluation:
    def __init__(self, checkpoint: str, opts: argparse.Namespace) -> None:
        import comfy.sd

        self.opts = opts
        self.model, self.clip, self.vae = comfy.sd.load_checkpoint_guess_config(
            checkpoint, output_vae=True, output_clip=True, embedding_directory=None)[:3]
        self.family = type(self.model.model.model_config).__name__
        conds = [model.encode_prompt(self.clip, p) for p in (*figures.PROMPTS, "")]
        self.prompt_conds = conds[:-1]
        self.empty = conds[-1]
        self.cases = [Case(i) for i in range(opts.refs)]
        self.baseline: dict[int, torch.Tensor] = {}
        self.banks: dict[tuple, Any] = {}
        self.examples: dict[str, list[torch.Tensor]] = {}  # row -> the first cases' samples, for the picture

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(self, patched: Any, case: Case) -> torch.Tensor:
        """Cells [5, 3, 16, 16] of the case's five prompts, one batch, the case's noise seed."""
        import nodes

        cond = torch.cat([self.prompt_conds[t][0] for t in case.targets])
        pooled = torch.cat([self.prompt_conds[t][1] for t in case.targets])
        positive = [[cond, {"pooled_output": pooled}]]
        negative = [[self.empty[0], {"pooled_output": self.empty[1]}]]
        latent = torch.zeros(len(case.targets), 4, figures.GRID, figures.GRID)
        out = nodes.common_ksampler(patched, case.noise_seed, self.opts.steps, self.opts.cfg, self.opts.sampler,
                                    self.opts.scheduler, positive, negative, {"samples": latent})[0]["samples"]
        return codec.decode_cells(out * codec.SD15_SCALE).clamp(0.0, 1.0)

    def bank(self, case: Case, row: Row) -> Any:
        from humanref.pipelines.references.inputs import prepare_references
        from humanref.pipelines.references.patch import build_reference_bank

        key = (case.index, row.references, row.reference_mask, row.timing)
        if key not in self.banks:
            inputs = [(1, figures.to_image(case.cells), case.mask(row.reference_mask),
                       figures.LAYOUTS[case.layout].prompt)]
            if row.references == 2:
                inputs.append((2, figures.to_image(case.distractor), None, ""))
            refs = prepare_references(inputs, 0, 6)
            self.banks[key] = build_reference_bank(self.model, self.vae, self.clip, refs, row.timing, MASK_RULE,
                                                   seed=case.noise_seed)
        return self.banks[key]

    # ------------------------------------------------------------------------------------------------ rows
    def run_row(self, row: Row) -> dict:
        from humanref.attention.reader import MODES
        from humanref.pipelines.references.patch import apply_reference_patch

        entry: dict = {"row": row.name, "mode": row.mode, "kwargs": row.kwargs, "references": row.references,
                       "reference_mask": row.reference_mask or None, "bank_timing": row.timing if row.mode else None,
                       "what": row.what}
        why = unavailable(row, apply_reference_patch, MODES)
        if why:
            entry["status"] = why
            return entry
        t0 = time.perf_counter()
        samples = []
        try:
            for case in self.cases:
                if row.mode is None:
                    cells = self.sample(self.model, case)
                    self.baseline[case.index] = cells
                else:
                    patched = apply_reference_patch(self.model, self.bank(case, row), mode=row.mode, **row.kwargs)
                    cells = self.sample(patched, case)
                samples += self.score(case, cells)
                if case.index < EXAMPLE_CASES:
                    self.examples.setdefault(row.name, []).append(cells)
        except Exception as e:  # one broken row must not lose the others' figures
            entry["status"] = f"error: {type(e).__name__}: {e}"
            return entry
        entry["status"] = "ok"
        entry["seconds"] = time.perf_counter() - t0
        entry.update(summarise(samples))
        entry["samples"] = samples
        return entry

    def score(self, case: Case, cells: torch.Tensor) -> list[dict]:
        ref = metric.descriptor(case.cells)
        unseen = metric.descriptor(case.unseen_cells)
        ref_shape = figures.silhouette(figures.LAYOUTS[case.layout])
        out = []
        for i, target in enumerate(case.targets):
            base = metric.descriptor(self.baseline[case.index][i])
            fg = metric.foreground(cells[i])
            desc = metric.descriptor(cells[i], fg)
            bg = metric.background(cells[i]).double()
            out.append({
                "reference": case.index, "noise_seed": case.noise_seed, "batch_index": i, "layout": target,
                "reference_layout": case.layout,
                "distance_to_reference": metric.distance(desc, ref),
                "baseline_distance_to_reference": metric.distance(base, ref),
                "gap_closed": metric.gap_closed(desc, base, ref),
                "gap_closed_toward_unseen": metric.gap_closed(desc, base, unseen),
                "layout_iou": metric.iou(fg, figures.silhouette(figures.LAYOUTS[target])),
                "layout_hit": metric.best_layout(fg) == target,
                "reference_layout_iou": metric.iou(fg, ref_shape),
                "background": bg.tolist(),
                "background_shift": float((bg - torch.tensor(figures.BACKGROUND, dtype=torch.float64)).abs().max()),
                "foreground_cells": int(fg.sum()),
            })
        return out

    # ------------------------------------------------------------------------------------------------ checks
    def codec_check(self) -> dict:
        """The box codec through ComfyUI's VAE object against its exact formula, and the tiny checkpoint's random
        VAE on the same picture (why it is not used)."""
        from humanref.pipelines.synthetic.base import load_test_clip_vae

        _, _, cells = figures.sample(torch.Generator().manual_seed(REFERENCE_SEED - 1))
        image = figures.to_image(cells)
        with torch.no_grad():
            raw = self.vae.encode(image)
            decoded = self.vae.decode(raw)
            _, random_vae = load_test_clip_vae()
            random_round_trip = random_vae.decode(random_vae.encode(image))
        exact = codec.encode_cells(cells.unsqueeze(0))
        return {
            "vae_class": type(self.vae.first_stage_model).__name__,
            "encode_max_abs_error_vs_formula": float((raw * codec.SD15_SCALE - exact).abs().max()),
            "round_trip_max_abs_error": float((decoded - image).abs().max()),
            "random_tiny_vae_round_trip_mean_abs_error": float((random_round_trip - image).abs().mean()),
            "note": "pixel values 0..1; the random VAE of humanref-tiny-sd15 is no autoencoder",
        }

    def sampler_check(self) -> dict:
        """ComfyUI's decode of one baseline batch against the exact cell decode the metric uses."""
        import nodes

        case = self.cases[0]
        cond = torch.cat([self.prompt_conds[t][0] for t in case.targets])
        out = nodes.common_ksampler(self.model, case.noise_seed, self.opts.steps, self.opts.cfg, self.opts.sampler,
                                    self.opts.scheduler, [[cond, {}]], [[self.empty[0], {}]],
                                    {"samples": torch.zeros(len(case.targets), 4, figures.GRID, figures.GRID)}
                                    )[0]["samples"]
        with torch.no_grad():
            via_vae = figures.to_cells(self.vae.decode(out))
        exact = codec.decode_cells(out * codec.SD15_SCALE).clamp(0, 1)
        return {"vae_decode_vs_cell_decode_max_abs": float((via_vae - exact).abs().max()),
                "matches_baseline_row": bool(torch.equal(exact, self.baseline[case.index]))}


def example_picture(ev: Evaluation, path: str, zoom: int = 4) -> None:
    """One line per row that ran: for each of the first cases, its reference, then its five samples."""
    from humanref.training.loop import save_png

    gap = torch.ones(3, figures.GRID, 1)
    lines = []
    for cells in ev.examples.values():
        tiles = []
        for case, batch in zip(ev.cases, cells):
            tiles += [gap, gap, case.cells, gap, gap] + [t for c in batch for t in (c, gap)]
        lines += [torch.cat(tiles, dim=2), torch.ones(3, 1, sum(t.shape[2] for t in tiles))]
    picture = torch.cat(lines, dim=1).repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    save_png(picture.permute(1, 2, 0), path)


def summarise(samples: list[dict]) -> dict:
    gaps = [s["gap_closed"] for s in samples]
    return {
        "samples_count": len(samples),
        "gap_closed": metric.quartiles(gaps),
        "closer_than_baseline": sum(1 for s in samples if s["distance_to_reference"] <
                                    s["baseline_distance_to_reference"]) / len(samples),
        "gap_closed_toward_unseen": metric.quartiles([s["gap_closed_toward_unseen"] for s in samples]),
        "distance_to_reference": metric.quartiles([s["distance_to_reference"] for s in samples]),
        "layout_iou": metric.quartiles([s["layout_iou"] for s in samples]),
        "layout_accuracy": sum(1 for s in samples if s["layout_hit"]) / len(samples),
        "reference_layout_iou": metric.quartiles([s["reference_layout_iou"] for s in samples]),
        "background_shift": metric.quartiles([s["background_shift"] for s in samples]),
        "foreground_cells": metric.quartiles([s["foreground_cells"] for s in samples]),
        "undefined_gap": sum(1 for g in gaps if not math.isfinite(g)),
    }


# ---------------------------------------------------------------------------------------------------- output
def _q(stats: dict, digits: int = 2) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median']:.{digits}f} [{stats['q25']:.{digits}f}, {stats['q75']:.{digits}f}]"


def markdown(result: dict) -> str:
    ev = result["evaluation"]
    tr = result["training"]
    lines = [
        "# Likeness benchmark",
        "",
        f"`python bench/likeness` on {result['environment']['device_name']} "
        f"({result['environment']['torch_threads']} threads), {result['environment']['date']}. "
        f"Mini SD1.5-layout model trained here in {tr['train_seconds']:.0f} s "
        f"({tr['config']['steps']} steps of {tr['config']['batch']}, final loss {tr['final_loss_mean_last_50']:.3f}, "
        f"UNet sha256 {tr['unet_sha256'][:12]}); {ev['samples_per_row']} samples per row "
        f"({ev['references']} references x 5 prompts), {ev['sampler']}/{ev['scheduler']}, {ev['steps']} steps, "
        f"CFG {ev['cfg']}. Medians [quartiles].",
        "",
        "| row | bank | gap closed toward the reference | closer than baseline | gap closed toward an unseen look "
        "| layout IoU with the prompt | layout accuracy | IoU with the reference's layout | background shift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["rows"]:
        bank = {None: "-", "once at t=0": "t=0", "every step": "per step"}.get(e.get("bank_timing"), "?")
        if e["status"] != "ok":
            lines.append(f"| {e['row']} | {bank} | {e['status']} | | | | | | |")
            continue
        base = e["mode"] is None
        lines.append(
            f"| {e['row']} | {bank} | {'(0 by definition)' if base else _q(e['gap_closed'])} | "
            f"{'-' if base else format(e['closer_than_baseline'], '.0%')} | "
            f"{'-' if base else _q(e['gap_closed_toward_unseen'])} | {_q(e['layout_iou'])} | "
            f"{e['layout_accuracy']:.0%} | {_q(e['reference_layout_iou'])} | {_q(e.get('background_shift', {}))} |")
    lines += [
        "",
        "Bank: t=0 = the writer ran once on the clean reference (Parts2Whole); per step = on the reference noised "
        "to each step's sigma (A1111/ACN reference_adain). "
        "Gap closed = 1 - d(sample, reference) / d(baseline, reference) on 11 appearance statistics (mean colour of "
        "the shirt and trouser bands, colour spread and stripe steps in the shirt band), the baseline being the same "
        "prompt and noise without a reference: 0 = no move, 1 = the reference's statistics. Toward an unseen look: the "
        "same against a random look the model never saw (a mode that only scrambles colours scores there as well). "
        "Layout: IoU of the figure's cells (those differing by > 0.25 in some channel from the sample's own "
        "background, the median colour of its border cells, so a uniformly tinted background stays background) with "
        "the prompt's silhouette; accuracy: the prompt's silhouette is the best "
        "of the six; the references always show another layout, so a high IoU with the reference's layout means the "
        "reference's pose leaked. Background shift: the largest channel difference between that background and the "
        "training grey (0.92). See docs/benchmarks.md. Picture: "
        f"{os.path.basename(result['examples'])} (per row: reference, then its five samples; two references).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "likeness_cpu.json"),
                   help="JSON path; the markdown table goes next to it (.md)")
    p.add_argument("--cache-dir", default=os.path.join(REPO, "bench", "out", "likeness"),
                   help="where the trained checkpoint is cached")
    p.add_argument("--retrain", action="store_true", help="train again even when a matching checkpoint is cached")
    p.add_argument("--train-steps", type=int, default=model.TrainConfig.steps)
    p.add_argument("--refs", type=int, default=6, help="references; each gives 5 samples per row")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--threads", type=int, default=model.TrainConfig.threads,
                   help="torch threads for training and sampling (part of the cached model's key)")
    p.add_argument("--rows", default="", help="row names to run, separated by ';' (names hold commas; default "
                   "all; the baseline always runs)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    opts = p.parse_args(argv)
    if opts.refs < 1 or opts.steps < 1 or opts.train_steps < 1:
        p.error("--refs, --steps and --train-steps must be at least 1")
    wanted = [r.strip() for r in opts.rows.split(";") if r.strip()]
    names = {r.name for r in ROWS}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows are {sorted(names)}")
    torch.set_num_threads(opts.threads)
    setup_comfy(opts.comfyui)
    config = model.TrainConfig(steps=opts.train_steps, threads=opts.threads)
    checkpoint, training = model.trained_checkpoint(opts.cache_dir, config, retrain=opts.retrain)
    t0 = time.perf_counter()
    ev = Evaluation(checkpoint, opts)
    rows = [BASELINE] + [r for r in ROWS if r is not BASELINE and (not wanted or r.name in wanted)]
    results = []
    for row in rows:
        entry = ev.run_row(row)
        results.append(entry)
        gap = entry.get("gap_closed", {}).get("median")
        print(f"{row.name}: {entry['status']}" + ("" if gap is None else f", gap closed {gap:.2f}, layout accuracy "
                                                  f"{entry['layout_accuracy']:.0%}"), flush=True)
    result = {
        "benchmark": "likeness",
        "command": "python bench/likeness " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment("cpu", opts.comfyui, dirty_paths=["attention", "pipelines", "bench/likeness"]),
        "model": {"checkpoint": os.path.relpath(checkpoint, REPO), "detected_as": ev.family,
                  "codec": ev.codec_check(), "sampler": ev.sampler_check()},
        "training": training,
        "evaluation": {"references": opts.refs, "samples_per_row": 5 * opts.refs, "steps": opts.steps,
                       "cfg": opts.cfg, "sampler": opts.sampler, "scheduler": opts.scheduler,
                       "reference_seeds": f"{REFERENCE_SEED} + r", "noise_seeds": f"{NOISE_SEED} + r",
                       "bank": {"timing": "per row (bank_timing)", "mask_rule": MASK_RULE,
                                "writer_noise_seed": "the case's noise seed (every-step banks)"},
                       "seconds": time.perf_counter() - t0},
        "rows": results,
        "examples": os.path.relpath(os.path.splitext(opts.out)[0] + "_examples.png", REPO),
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    md = os.path.splitext(opts.out)[0] + ".md"
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(result))
    example_picture(ev, os.path.splitext(opts.out)[0] + "_examples.png")
    print(f"wrote {opts.out}, {md} and the example picture")
