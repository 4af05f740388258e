"""The rows of the likeness table: each a small declarative spec (a mode name and apply_reference_patch keyword
arguments, plus which references, masks and bank timing it gets), checked against the build before it runs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REFERENCE_MASKS = ("", "figure", "shirt")  # none; the reference figure's cells; its shirt cells only
ONCE = "once at t=0"  # Parts2Whole: the writer runs once on the clean reference
EVERY_STEP = "every step"  # A1111/ACN reference_*: the writer runs each step on the reference noised to that sigma
TIMINGS = (ONCE, EVERY_STEP)


@dataclass(frozen=True)
class Row:
    """``mode`` None: the baseline (no reference). ``references`` 2: the target reference, then a distractor
    with another random appearance (for per-reference weights). ``reference_mask``: see REFERENCE_MASKS.
    ``timing``: the bank's (build_reference_bank's ``timing``)."""

    name: str
    mode: Optional[str]
    kwargs: dict = field(default_factory=dict)
    references: int = 1
    reference_mask: str = ""
    timing: str = ONCE
    what: str = ""


BASELINE = Row("no reference", None, what="the baseline every gap is measured against")


def _weights(mode: str, timing: str) -> tuple[Row, ...]:
    return tuple(Row(f"{mode}, 2 refs, weights {w}", mode, {"reference_weights": w}, references=2, timing=timing,
                     what=what) for w, what in (
        ("1, 1", "the target reference and a distractor (another random look), equal weights"),
        ("1, 0.25", "the distractor at a quarter weight"),
        ("0.25, 1", "the target reference at a quarter weight")))


ROWS: tuple[Row, ...] = (
    BASELINE,
    Row("concat", "concat", what="Parts2Whole: references join the target's keys"),
    Row("concat, mask = figure", "concat", reference_mask="figure",
        what="the reference's background tokens masked out"),
    Row("concat, mask = shirt", "concat", reference_mask="shirt", what="only the reference's shirt cells kept"),
    Row("strict", "strict", what="unmasked, strict is concat (a check: the same numbers)"),
    Row("strict, mask = figure", "strict", reference_mask="figure",
        what="the masked-out tokens left out instead of kept as zero keys"),
    Row("blend, strength 0.3", "blend", {"strength": 0.3},
        what="MimicBrush: 0.3 of attention with the references, 0.7 without (at 1 it is concat)"),
    Row("blend, strength 0.7", "blend", {"strength": 0.7}, what="0.7 with, 0.3 without"),
    Row("dual", "dual", what="AnyDressing: a separate attention term over the references"),
    Row("adain", "adain", timing=EVERY_STEP,
        what="block statistics moved to those of the reference noised to the same sigma (A1111/ACN)"),
    Row("adain, bank once at t=0", "adain",
        what="the same with the clean reference's statistics at every step"),
    Row("adain+attn", "adain+attn", timing=EVERY_STEP, what="AdaIN and concat attention together (A1111/ACN)"),
    Row("concat, style fidelity 0.5", "concat", {"style_fidelity": 0.5},
        what="the uncond chunk half sees the references (concat above: 1, it does not)"),
    Row("concat, style fidelity 0", "concat", {"style_fidelity": 0.0},
        what="the uncond chunk sees the references fully"),
    Row("adain+attn, style fidelity 0.5", "adain+attn", {"style_fidelity": 0.5}, timing=EVERY_STEP,
        what="A1111's default"),
    Row("adain+attn, style fidelity 0", "adain+attn", {"style_fidelity": 0.0}, timing=EVERY_STEP,
        what="cond and uncond moved alike"),
    *_weights("concat", ONCE),
    *_weights("adain+attn", EVERY_STEP),
    Row("concat, weight linear in", "concat", {"weight_type": "linear in"},
        what="strength 0 at the first step rising to 1 at the last"),
    Row("concat, weight linear out", "concat", {"weight_type": "linear out"},
        what="strength 1 at the first step falling to 0 at the last"),
    Row("concat, weight ease in", "concat", {"weight_type": "ease in"}, what="linear in along a smoothstep"),
)


def unavailable(row: Row, apply_patch: Callable[..., Any], modes: dict) -> Optional[str]:
    """Why ``row`` cannot run on this build ('not available in this build: ...'), or None."""
    if row.mode is None:
        return None
    if row.mode not in modes:
        return f"not available in this build: mode {row.mode!r} (modes: {', '.join(modes)})"
    params = inspect.signature(apply_patch).parameters
    missing = [k for k in row.kwargs if k not in params]
    if missing:
        return f"not available in this build: apply_reference_patch has no {', '.join(missing)}"
    if row.reference_mask not in REFERENCE_MASKS:
        raise ValueError(f"row {row.name!r}: reference_mask {row.reference_mask!r} is not one of {REFERENCE_MASKS}")
    if row.timing not in TIMINGS:
        raise ValueError(f"row {row.name!r}: timing {row.timing!r} is not one of {TIMINGS}")
    return None
