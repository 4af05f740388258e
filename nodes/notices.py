"""Puts :mod:`pipelines.notices` warnings where a ComfyUI user sees them.

A node's ``execute`` wrapped in :func:`shows_warnings` collects the warnings its work gives and, if any:
shows them as text on the node (ComfyUI's progress-text preview), returns them in the node's UI output under
``humanref_warnings`` (so they are in ``/history``, which ``python -m humanref run`` prints, and the pack's
web extension shows them in a toast). Warnings given while no HumanRef node runs (inside KSampler, from a
patch) go to the running node's text preview.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from comfy_api.latest import io

from ..pipelines import notices

UI_KEY = notices.UI_KEY


def _node_id() -> str | None:
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return None if context is None else str(context.node_id)


def show_on_node(text: str, node_id: str | None = None) -> None:
    """Text under the running node in the frontend (and nowhere when there is no server, e.g. in tests)."""
    node_id = node_id or _node_id()
    try:
        from server import PromptServer

        server = PromptServer.instance
    except (ImportError, AttributeError):
        return
    if node_id is not None and server is not None:
        server.send_progress_text(text, node_id)


def with_warnings(output: io.NodeOutput, warnings: list[str]) -> io.NodeOutput:
    """``output`` with ``warnings`` added to its UI dict (kept alongside images or other UI it has)."""
    ui = output.ui
    if ui is None:
        ui = {}
    elif not isinstance(ui, dict):
        ui = dict(ui.as_dict())
    else:
        ui = dict(ui)
    ui[UI_KEY] = list(ui.get(UI_KEY, [])) + warnings
    return io.NodeOutput(*output.args, ui=ui, expand=output.expand, block_execution=output.block_execution)


def shows_warnings(execute: Callable[..., io.NodeOutput]) -> Callable[..., io.NodeOutput]:
    """Decorator for a V3 node's ``execute`` (under ``@classmethod``)."""

    @functools.wraps(execute)
    def run(cls: Any, *args: Any, **kwargs: Any) -> io.NodeOutput:
        with notices.collect() as warnings:
            output = execute(cls, *args, **kwargs)
        if warnings:
            show_on_node("\n".join(notices.MARK + w for w in warnings))
            output = with_warnings(output, warnings)
        return output

    return run


def install_fallback() -> None:
    """Warnings outside a HumanRef node (a patch at sampling time) show on the node that runs."""
    notices.set_fallback(lambda message: show_on_node(notices.MARK + message))
