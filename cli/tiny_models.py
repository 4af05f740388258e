"""``python -m humanref tiny-models DIR``: small synthetic models (random weights) for the example workflows.

They load through ComfyUI's own loaders (the real key layouts) but produce noise: they exist to run every
example workflow end to end on a CPU, in tests and smoke checks, without downloading anything.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional, TextIO

from ..pipelines.comfy_env import import_comfy
from ..pipelines.synthetic.tiny import all_tiny_models


def write_tiny_models(directory: str, comfyui: Optional[str], force: bool = False,
                      log: TextIO = sys.stdout) -> list[str]:
    """Write every tiny model under directory/<folder>/; existing files are kept unless force."""
    import_comfy(comfyui)
    from safetensors.torch import save_file

    written = []
    for model in all_tiny_models():
        folder = os.path.join(directory, model.folder)
        path = os.path.join(folder, model.filename)
        if os.path.exists(path) and not force:
            print(f"exists   {path} ({_size(path) / 2**20:.0f} MiB; --force to rewrite)", file=log)
            written.append(path)
            continue
        os.makedirs(folder, exist_ok=True)
        t0 = time.monotonic()
        tmp = path + ".part"
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        if os.path.isdir(path):  # a folder model being rewritten (--force)
            shutil.rmtree(path)
        if model.write is not None:
            model.write(tmp)
        else:
            sd = model.build()
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"humanref": "tiny synthetic model"})
        os.replace(tmp, path)
        print(f"wrote    {path} ({_size(path) / 2**20:.0f} MiB, {time.monotonic() - t0:.1f} s): "
              f"{model.description}", file=log)
        written.append(path)
    return written


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)
