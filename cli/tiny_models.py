"""``python -m humanref tiny-models DIR``: small synthetic models (random weights) for the example workflows.

They load through ComfyUI's own loaders (the real key layouts) but produce noise: they exist to run every
example workflow end to end on a CPU, in tests and smoke checks, without downloading anything.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import sys
import time
from typing import TextIO

from ..pipelines.synthetic import TinyModel

TINY_SD15_CHECKPOINT = "humanref-tiny-sd15.safetensors"
TINY_CONTROLNET = "humanref-tiny-controlnet-sd15.safetensors"


def tiny_sd15_unet_config() -> dict:
    """One level (channel_mult (1,)), one res block, a middle transformer: about 26 M parameters.

    Still model_channels 320, context 768 and conv proj_in, so ComfyUI detects it as SD15; every block kind
    the pack patches (input, middle, output transformers) is there.
    """
    from ..pipelines.synthetic import sd15_unet_config

    return sd15_unet_config(channel_mult=(1,), num_res_blocks=1, middle=True)


def _sd15_checkpoint() -> dict:
    import torch

    from ..pipelines.synthetic import sd15_checkpoint_state_dict

    return sd15_checkpoint_state_dict(tiny_sd15_unet_config(), dtype=torch.float16)


def _controlnet() -> dict:
    import torch

    from ..pipelines.synthetic import controlnet_state_dict

    return controlnet_state_dict(tiny_sd15_unet_config(), seed=7, dtype=torch.float16)


TINY_MODELS: tuple[TinyModel, ...] = (
    TinyModel("checkpoints", TINY_SD15_CHECKPOINT,
              "SD1.5 checkpoint: tiny UNet (26 M), full-size CLIP-L and VAE, random weights, fp16",
              build=_sd15_checkpoint),
    TinyModel("controlnet", TINY_CONTROLNET,
              "SD1.5 ControlNet (e.g. in place of OpenPose) matching the tiny UNet, random weights, fp16",
              build=_controlnet),
)


def all_tiny_models() -> tuple[TinyModel, ...]:
    """The base models above plus the TINY_MODELS of every pipelines/synthetic_*.py module (name order)."""
    from .. import pipelines

    found = list(TINY_MODELS)
    for info in sorted(pkgutil.iter_modules(pipelines.__path__), key=lambda m: m.name):
        if info.name.startswith("synthetic_"):
            module = importlib.import_module(f"{pipelines.__name__}.{info.name}")
            found.extend(getattr(module, "TINY_MODELS", ()))
    return tuple(found)


def prepare_comfy(comfyui: str) -> None:
    """Make ComfyUI importable in CPU mode without writing bytecode into its folder."""
    if not os.path.isfile(os.path.join(comfyui, "main.py")):
        raise FileNotFoundError(f"no ComfyUI at {comfyui} (main.py not found): give --comfyui PATH or set "
                                "COMFYUI_PATH")
    sys.dont_write_bytecode = True
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = True


def write_tiny_models(directory: str, comfyui: str, force: bool = False, log: TextIO = sys.stdout) -> list[str]:
    """Write every tiny model under directory/<folder>/; existing files are kept unless force."""
    prepare_comfy(os.path.abspath(comfyui))
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
