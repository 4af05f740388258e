"""Finding ComfyUI for the comfy, e2e and browser tiers: COMFYUI_PATH, default /opt/ComfyUI; skip visibly without it."""
from __future__ import annotations

import pytest

from humanref.pipelines.comfy_env import comfyui_path, import_comfy, is_comfyui

COMFYUI_PATH = comfyui_path()


def comfy_available() -> bool:
    return is_comfyui(COMFYUI_PATH)


def require_comfy() -> str:
    """Put ComfyUI on sys.path in CPU mode, or skip the calling module with the reason."""
    if not comfy_available():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: set COMFYUI_PATH to a ComfyUI 0.8.0 checkout",
                    allow_module_level=True)
    return import_comfy(COMFYUI_PATH, cpu=True)
