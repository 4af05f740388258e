"""Where ComfyUI is and how the pack's scripts import it (the CLI, the trainers, benchmarks, tests).

Inside ComfyUI nothing here is needed: ComfyUI imports the pack. Outside it, ``import_comfy`` puts a ComfyUI
folder on ``sys.path`` before the first ``import comfy``, in CPU mode when asked, without writing bytecode into
that folder.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

DEFAULT_COMFYUI_PATH = "/opt/ComfyUI"


def comfyui_path(given: Optional[str] = None) -> str:
    """The ComfyUI folder: ``given``, else $COMFYUI_PATH, else /opt/ComfyUI (absolute)."""
    return os.path.abspath(given or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI_PATH)


def is_comfyui(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "main.py"))


def import_comfy(path: Optional[str] = None, cpu: bool = True) -> str:
    """Make ComfyUI at ``path`` (default :func:`comfyui_path`) importable; returns the folder used.

    ``cpu`` sets ComfyUI's --cpu before its model management is imported (after that it cannot change).
    """
    if "comfy.model_management" in sys.modules:  # already imported (inside ComfyUI, or a second call)
        return comfyui_path(path)
    folder = comfyui_path(path)
    if not is_comfyui(folder):
        raise FileNotFoundError(f"no ComfyUI at {folder} (main.py not found): give --comfyui PATH or set "
                                "COMFYUI_PATH")
    sys.dont_write_bytecode = True
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from comfy.cli_args import args

    args.cpu = cpu
    return folder
