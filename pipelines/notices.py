"""Warnings the user must see, not only the server log.

A pipeline calls :func:`warn` where a result is still useful but not what the user probably meant (a mask
resized, a hand dropped, nothing to outpaint). The message goes to the log at once and, while a node runs
inside :func:`collect`, into that node's list: the node layer (``nodes/notices.py``) shows the list on the node,
in a toast, in the prompt's history (``humanref_warnings``) and so in the runner's output. Comfy-free, so the
engine's and the pipelines' tests can collect warnings too.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

log = logging.getLogger("humanref")

UI_KEY = "humanref_warnings"  # the node UI output (and /history) key that holds a node's warnings
MARK = "\u26a0 "  # each warning line shown on a node starts with it

_collecting: ContextVar[Optional[list[str]]] = ContextVar("humanref_warnings", default=None)
_fallback: Optional[Callable[[str], None]] = None


def warn(message: str) -> None:
    """Log ``message`` and hand it to the node that is running (if any) for the user to see."""
    log.warning("HumanRef: %s", message)
    notes = _collecting.get()
    if notes is None:
        if _fallback is not None:
            _fallback(message)
    elif message not in notes:
        notes.append(message)


def set_fallback(show: Optional[Callable[[str], None]]) -> None:
    """Where warnings go when no node collects them (the host shows them on the running node)."""
    global _fallback
    _fallback = show


@contextmanager
def collect() -> Iterator[list[str]]:
    """The warnings :func:`warn` gives inside the block, in order, each once (an enclosing block gets them too)."""
    notes: list[str] = []
    token = _collecting.set(notes)
    try:
        yield notes
    finally:
        _collecting.reset(token)
        outer = _collecting.get()
        if outer is not None:
            outer.extend(n for n in notes if n not in outer)
