"""The one reader of weight files: safetensors first, a pickle only through ``torch.load(weights_only=True)``.

A model file from the internet may be a pickle that runs code when loaded. Every loader of the pack reads its
files here, so the rule lives once: a ``.safetensors`` name, or safetensors content under any name (the
Parts2Whole release ships safetensors as ``decoupled_attn.pth``), is read as safetensors; anything else goes
through ``torch.load(weights_only=True)``, which refuses a pickle that needs code. Errors name the file.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
from torch import Tensor

SAFETENSORS_EXTENSION = ".safetensors"


def is_safetensors(path: str) -> bool:
    """By name, or by content: an 8-byte little-endian header length that fits the file, then a JSON object."""
    if path.lower().endswith(SAFETENSORS_EXTENSION):
        return True
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n and 8 + n <= size and head[8:9] == b"{"


def read_state_dict(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(flat state dict of tensors, safetensors metadata or {}) of a weight file; ValueError naming the file.

    A pickled ``{"state_dict": ...}`` wrapper is unwrapped and nested dicts are flattened with dots
    (``{"unet": {"conv_in.weight": t}}`` gives ``"unet.conv_in.weight"``), the layout the same tensors have
    in a safetensors file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, dict(metadata)
        except Exception as e:  # noqa: BLE001 - a damaged header or data: whatever safetensors raises, name the file
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is neither safetensors nor a plain tensor dict: refused, because a pickle is only "
                         "read with torch.load(weights_only=True) and this one needs code to load; refusing to "
                         f"unpickle it ({type(e).__name__}: {str(e)[:300]})") from e
    except Exception as e:  # noqa: BLE001 - not a torch file at all (text, truncated, empty, another format)
        raise ValueError(f"{path} is not a readable weight file: neither safetensors nor a file that "
                         f"torch.load(weights_only=True) reads ({type(e).__name__}: {e})") from e
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} does not hold a state dict of tensors (it holds a {type(data).__name__})")
    flat: dict[str, Tensor] = {}
    if not _flatten(data, "", flat):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return flat, {}


def _flatten(data: Mapping[Any, Any], prefix: str, out: dict[str, Tensor]) -> bool:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif not isinstance(value, Mapping) or not _flatten(value, name + ".", out):
            return False
    return True
