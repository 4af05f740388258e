"""Diffusers UNet state dicts into ComfyUI (ldm) keys and back, checked key by key and shape by shape.

The key map is ComfyUI's own (``comfy.utils.unet_to_diffusers``); the keys and shapes are those of ComfyUI's
UNet for the config (``comfy_unet.unet_shapes``). Parts2Whole and MimicBrush both ship diffusers UNets, and both
ship a reference UNet stripped the same way by their official code: no ``conv_norm_out``/``conv_out``, and the
last up-block transformer keeps only its norm1 (its attention, feed-forward and ``proj_out`` became identities
or were removed), because only that norm1 output is ever read. One converter serves every loader so they agree
on what may be missing.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .comfy_unet import unet_shapes


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

    Every key must map to a tensor that UNet has, every tensor it has must come from exactly one present key
    (ComfyUI's map names two diffusers spellings of the added embedding). reference: the stripped keys may be
    missing; they are zero filled (never run: the writer stops after that block's norm1). Returns (ldm state
    dict, the diffusers keys that were filled). Errors name source and keys.
    """
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)
    expected = unet_shapes(unet_config)
    unexpected = sorted(k for k in sd if mapping.get(k) not in expected)
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected keys for this UNet, e.g. {unexpected[:8]}")
    names: dict[str, list[str]] = {}  # ldm key -> its diffusers names
    for dk, lk in mapping.items():
        if lk in expected:
            names.setdefault(lk, []).append(dk)
    not_mapped = sorted(set(expected) - set(names))
    if not_mapped:
        raise ValueError(f"{source}: ComfyUI's UNet needs {not_mapped[:8]} which no diffusers key maps to")
    allowed = stripped_reference_keys(unet_config, mapping) if reference else set()
    present = {lk: [dk for dk in dks if dk in sd] for lk, dks in names.items()}
    missing = sorted(dks[0] for lk, dks in names.items() if not present[lk] and not any(dk in allowed for dk in dks))
    if missing:
        raise ValueError(f"{source}: {len(missing)} missing keys, e.g. {missing[:8]}")
    dtype = sd["conv_in.weight"].dtype if "conv_in.weight" in sd else torch.float32
    out: dict[str, Tensor] = {}
    filled: list[str] = []
    for lk, found in present.items():
        if len(found) > 1:
            raise ValueError(f"{source}: keys {found} are the same tensor {lk} of this UNet; keep one")
        if not found:
            out[lk] = torch.zeros(expected[lk], dtype=dtype)
            filled += [dk for dk in names[lk] if dk in allowed]
            continue
        tensor = sd[found[0]]
        if tuple(tensor.shape) != tuple(expected[lk]):
            raise ValueError(f"{source}: key {found[0]} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[lk])} for this UNet")
        out[lk] = tensor
    return out, tuple(sorted(filled))


def diffusers_names(unet_config: dict, ldm: Mapping[str, Tensor], source: str = "UNet") -> dict[str, Tensor]:
    """The inverse renaming: ComfyUI UNet keys -> diffusers names, every key accounted for.

    The added embedding (label_emb) has two diffusers spellings in ComfyUI's map; it is named ``add_embedding``,
    SDXL's ``text_time`` that ``unet_configs.diffusers_config_from_ldm_config`` writes.
    """
    import comfy.utils

    to_diffusers: dict[str, str] = {}
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    for dk in sorted(mapping, key=lambda k: k.startswith("class_embedding.")):
        to_diffusers.setdefault(mapping[dk], dk)
    unknown = sorted(set(ldm) - set(to_diffusers))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} UNet keys have no diffusers name, e.g. {unknown[:5]}")
    return {to_diffusers[k]: v for k, v in ldm.items()}
