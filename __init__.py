"""HumanRef: reference-guided human image generation for ComfyUI.

ComfyUI imports this file as a custom node pack and calls :func:`comfy_entrypoint`; the package also imports
outside ComfyUI (``python -m humanref``, the engine's tests), so nothing here imports comfy at module level,
opens sockets or writes files.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Our own model folders under ComfyUI's models/ directory (registered when ComfyUI loads the pack).
MODEL_FOLDERS: tuple[str, ...] = ("parts2whole", "mimicbrush", "hand_generator", "garment_weights")


def register_model_folders() -> None:
    import os

    import folder_paths  # ComfyUI's module; only present inside ComfyUI

    for name in MODEL_FOLDERS:
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this once when it loads the pack."""
    register_model_folders()
    from .nodes import HumanRefExtension

    return HumanRefExtension()
