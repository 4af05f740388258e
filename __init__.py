"""HumanRef: reference-guided human image generation for ComfyUI.

ComfyUI imports this file as a custom node pack and calls :func:`comfy_entrypoint`; the package also imports
outside ComfyUI (``python -m humanref``, the engine's tests), so nothing here imports comfy at module level,
opens sockets or writes files.
"""
from __future__ import annotations

from .version import __version__  # noqa: F401  (the pack's version, for ComfyUI's manager and the runner)

WEB_DIRECTORY = "./web"  # the frontend extension: HumanRef warnings in a toast (web/humanref.js)


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this once when it loads the pack."""
    from .nodes.extension import HumanRefExtension
    from .nodes.model_files import register_model_folders
    from .nodes.notices import install_fallback

    register_model_folders()
    install_fallback()
    return HumanRefExtension()
