"""Progress on the node for the pack's long steps: a load of several files, a reference encoding.

ComfyUI's progress bar shows on the node in the frontend and as ``progress`` events (``python -m humanref run``
prints them), so a load of two UNets and an image encoder is never a silent wait. Each stage is also logged.
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger("humanref")


class Stages:
    """One progress-bar step per named stage, reported when the stage is done."""

    def __init__(self, what: str, names: Sequence[str]) -> None:
        import comfy.utils  # here, not at import: the trainers and the converter import the loaders without ComfyUI

        self.what = what
        self.names = tuple(names)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(len(self.names))

    def finished(self, name: str) -> None:
        expected = self.names[self.done] if self.done < len(self.names) else None
        if name != expected:
            raise RuntimeError(f"progress stage {name!r} reported out of order (expected {expected!r})")
        self.done += 1
        log.info("HumanRef: %s: %s done (%d/%d)", self.what, name, self.done, len(self.names))
        self.bar.update(1)
