"""Diffusers UNet state dicts into ComfyUI (ldm) keys, checked key by key and shape by shape.

Parts2Whole and MimicBrush both ship diffusers UNets, and both ship a reference UNet stripped the same way by
their official code: no ``conv_norm_out``/``conv_out``, and the last up-block transformer keeps only its norm1
(its attention, feed-forward and ``proj_out`` became identities or were removed), because only that norm1
output is ever read. One converter serves both loaders so the two agree on what may be missing.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

import comfy.utils

from ..synthetic.base import unet_shapes


def stripped_reference_keys(unet_config: dict, mapping: Mapping[str, str]) -> set[str]:
    """Diffusers keys a stripped reference UNet lacks: conv_norm_out, conv_out, the last up-block transformer's
    proj_out and everything of its last transformer block except norm1."""
    levels = len(unet_config["channel_mult"])
    attn = f"up_blocks.{levels - 1}.attentions.{unet_config['num_res_blocks'][0]}"
    depth = unet_config["transformer_depth_output"][0]
    if depth == 0:
        raise ValueError("the UNet's last up block has no transformer; it cannot be a stripped reference UNet")
    block = f"{attn}.transformer_blocks.{depth - 1}."
    out = {k for k in mapping if k.startswith(("conv_norm_out.", "conv_out.", f"{attn}.proj_out."))}
    out |= {k for k in mapping if k.startswith(block) and not k.startswith(block + "norm1.")}
    return out


def convert_unet_state_dict(sd: Mapping[str, Tensor], unet_config: dict, source: str,
                            reference: bool = False) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Diffusers keys -> ComfyUI keys against ComfyUI's own UNet for unet_config.

    reference: the stripped keys may be missing; they are zero filled (never run: the writer stops after that
    block's norm1). Returns (ldm state dict, the diffusers keys that were filled). Errors name source and keys.
    """
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    expected = unet_shapes(unet_config)
    unexpected = sorted(k for k in sd if k not in mapping)
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected keys for this UNet, e.g. {unexpected[:8]}")
    allowed = stripped_reference_keys(unet_config, mapping) if reference else set()
    missing = sorted(k for k in mapping if k not in sd and k not in allowed and mapping[k] in expected)
    if missing:
        raise ValueError(f"{source}: {len(missing)} missing keys, e.g. {missing[:8]}")
    dtype = sd["conv_in.weight"].dtype if "conv_in.weight" in sd else torch.float32
    out: dict[str, Tensor] = {}
    for dk, lk in mapping.items():
        if lk not in expected:  # class/add embeddings of other UNet kinds
            continue
        if dk in sd:
            tensor = sd[dk]
            if tuple(tensor.shape) != tuple(expected[lk]):
                raise ValueError(f"{source}: key {dk} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(expected[lk])} for this UNet")
            out[lk] = tensor
        else:
            out[lk] = torch.zeros(expected[lk], dtype=dtype)
    not_mapped = sorted(set(expected) - set(out))
    if not_mapped:
        raise ValueError(f"{source}: ComfyUI's UNet needs {not_mapped[:8]} which no diffusers key maps to")
    return out, tuple(sorted(k for k in allowed if k not in sd))


def diffusers_names(unet_config: dict, ldm: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse mapping: ComfyUI UNet keys -> diffusers names (for synthetic releases and converters)."""
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}
    missing = sorted(set(ldm) - set(to_diffusers))
    if missing:
        raise ValueError(f"no diffusers names for {missing[:5]}")
    return {to_diffusers[k]: v for k, v in ldm.items()}
