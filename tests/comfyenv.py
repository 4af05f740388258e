"""Finding ComfyUI for the comfy, e2e and browser tiers: COMFYUI_PATH, default /opt/ComfyUI.

Each tier's conftest calls :func:`bootstrap` when pytest imports it, so ComfyUI is on ``sys.path`` (CPU mode)
before any test module of the tier is imported and the modules import comfy at their top. Without ComfyUI no test
module of the tier is imported: each is reported skipped with :data:`SKIP_REASON` (``pytest -rs``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from humanref.pipelines.comfy_env import comfyui_path, import_comfy, is_comfyui

COMFYUI_PATH = comfyui_path()
SKIP_REASON = f"ComfyUI not found at {COMFYUI_PATH}: set COMFYUI_PATH to a ComfyUI 0.8.0 checkout"


def comfy_available() -> bool:
    return is_comfyui(COMFYUI_PATH)


def bootstrap() -> bool:
    """Put ComfyUI on sys.path in CPU mode; False (and nothing done) when there is no ComfyUI."""
    if not comfy_available():
        return False
    import_comfy(COMFYUI_PATH, cpu=True)
    return True


class SkippedModule(pytest.Module):
    """A test module of a tier that cannot run here: never imported, reported skipped with the reason."""

    def collect(self):
        pytest.skip(SKIP_REASON)


def skipped_module(module_path: Path, parent) -> Optional[pytest.Module]:
    """For a tier conftest's ``pytest_pycollect_makemodule``: the skipping stand-in without ComfyUI, else None."""
    if comfy_available():
        return None
    return SkippedModule.from_parent(parent, path=module_path)


def mark_tier(items: list, folder: Path, *marks: str) -> None:
    """For a tier conftest's ``pytest_collection_modifyitems`` (it sees every item of the session): add the
    tier's markers to the tests under ``folder``."""
    for item in items:
        if folder in item.path.parents:
            for mark in marks:
                item.add_marker(getattr(pytest.mark, mark))
