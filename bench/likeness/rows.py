"""The rows of the likeness table: each a small declarative spec (a mode name and apply_reference_patch keyword
arguments, plus which references and masks it gets), checked against the build before it runs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REFERENCE_MASKS = ("", "figure", "shirt")  # none; the reference figure's cells; its shirt cells only


@dataclass(frozen=True)
class Row:
    """``mode`` None: the baseline (no reference). ``references`` 2: the target reference, then a distractor
    with another random appearance (for per-reference weights). ``reference_mask``: see REFERENCE_MASKS."""

    name: str
    mode: Optional[str]
    kwargs: dict = field(default_factory=dict)
    references: int = 1
    reference_mask: str = ""
    what: str = ""


BASELINE = Row("no reference", None, what="the baseline every gap is measured against")

ROWS: tuple[Row, ...] = (
    BASELINE,
    Row("concat", "concat", what="Parts2Whole: references join the target's keys"),
    Row("blend, strength 0.5", "blend", {"strength": 0.5},
        what="MimicBrush: half attention with, half without the references (at 1 it is concat)"),
    Row("dual", "dual", what="AnyDressing: a separate attention term over the references"),
    Row("adain", "adain", what="block statistics moved to the reference's, no attention"),
    Row("adain+attn", "adain+attn", what="AdaIN and concat attention together"),
    Row("concat, style fidelity 0", "concat", {"style_fidelity": 0.0},
        what="the uncond chunk sees the references fully"),
    Row("concat, 2 refs, weights 1, 1", "concat", {"reference_weights": "1, 1"}, references=2,
        what="the target reference and a distractor, equal weights"),
    Row("concat, 2 refs, weights 1, 0.25", "concat", {"reference_weights": "1, 0.25"}, references=2,
        what="the distractor at a quarter weight"),
    Row("concat, mask = figure", "concat", reference_mask="figure",
        what="the reference's background tokens masked out"),
    Row("concat, mask = shirt", "concat", reference_mask="shirt",
        what="only the reference's shirt cells kept"),
    Row("strict, mask = figure", "strict", reference_mask="figure",
        what="the masked-out tokens left out instead of kept as zero keys (unmasked, strict is concat)"),
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
    return None
