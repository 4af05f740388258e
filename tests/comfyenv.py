"""Finding ComfyUI for the comfy and e2e tiers: COMFYUI_PATH, default /opt/ComfyUI; skip visibly without it."""
from __future__ import annotations

import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")


def comfy_available() -> bool:
    return os.path.isfile(os.path.join(COMFYUI_PATH, "main.py"))


def require_comfy() -> str:
    """Put ComfyUI on sys.path in CPU mode, or skip the calling module with the reason."""
    if not comfy_available():
        pytest.skip(f"ComfyUI not found at {COMFYUI_PATH}: set COMFYUI_PATH to a ComfyUI 0.8.0 checkout",
                    allow_module_level=True)
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True
    return COMFYUI_PATH
