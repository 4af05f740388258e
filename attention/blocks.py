"""Transformer block keys of a UNet, found by walking the model rather than hard-coding a table.

A key is ComfyUI's ``(block_name, block_id, block_index)``: ("input", 4, 0), ("middle", 0, 3), ... so SD1.5
(16 blocks) and SDXL (70 blocks) both work. This module only reads attribute names; it never imports comfy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from torch import nn

BlockKey = tuple[str, int, int]
BLOCK_SETS: tuple[str, ...] = ("all", "mid+up", "down-only", "custom")


@dataclass(frozen=True)
class BlockInfo:
    key: BlockKey
    channels: int
    path: str  # module path of the BasicTransformerBlock inside the diffusion model


def walk_transformer_blocks(diffusion_model: nn.Module) -> list[BlockInfo]:
    """Every BasicTransformerBlock of a ComfyUI UNetModel, in execution order."""
    groups = (
        ("input", "input_blocks", list(getattr(diffusion_model, "input_blocks", []))),
        ("middle", "middle_block", [getattr(diffusion_model, "middle_block", None)]),
        ("output", "output_blocks", list(getattr(diffusion_model, "output_blocks", []))),
    )
    found: list[BlockInfo] = []
    for name, attr, blocks in groups:
        for block_id, block in enumerate(blocks):
            if block is None:
                continue
            for layer_pos, layer in enumerate(block):
                tbs = getattr(layer, "transformer_blocks", None)
                if tbs is None:
                    continue
                for index, tb in enumerate(tbs):
                    prefix = f"{attr}.{layer_pos}" if name == "middle" else f"{attr}.{block_id}.{layer_pos}"
                    channels = int(tb.norm1.normalized_shape[0])
                    found.append(BlockInfo((name, block_id, index), channels, f"{prefix}.transformer_blocks.{index}"))
    if not found:
        raise ValueError("the model has no UNet transformer blocks (input_blocks/middle_block/output_blocks); "
                         "only SD1.5/SDXL-style UNets are supported")
    return found


def block_label(key: BlockKey) -> str:
    return f"{key[0]}_{key[1]}.{key[2]}"


def describe_architecture(blocks: Iterable[BlockInfo], family: str = "") -> str:
    """E.g. "SD15 (16 transformer blocks, widths [320, 640, 1280])"; the family comes from the host."""
    blocks = list(blocks)
    widths = sorted({b.channels for b in blocks})
    name = family or {16: "SD1.5-like", 70: "SDXL-like"}.get(len(blocks), "UNet")
    return f"{name} ({len(blocks)} transformer blocks, widths {widths})"


CUSTOM_ENTRY = re.compile(r"^(input|middle|output)_(\d+)(?:\.(\d+))?$")


def custom_entries(custom: str) -> list[str]:
    """The entries of a custom_blocks text ("input_4, middle_0; output_9.0")."""
    return [t.strip() for t in custom.replace(";", ",").split(",") if t.strip()]


def select_blocks(blocks: Iterable[BlockInfo], block_set: str, custom: str = "") -> list[BlockInfo]:
    """Blocks for a named set; ``custom`` is a comma list like "input_4, middle_0, output_9.0"."""
    blocks = list(blocks)
    if block_set == "all":
        return blocks
    if block_set == "mid+up":
        return [b for b in blocks if b.key[0] in ("middle", "output")]
    if block_set == "down-only":
        return [b for b in blocks if b.key[0] == "input"]
    if block_set != "custom":
        raise ValueError(f"unknown block set {block_set!r}; expected one of {BLOCK_SETS}")
    wanted = custom_entries(custom)
    if not wanted:
        raise ValueError("block set 'custom' needs a list in custom_blocks, e.g. 'input_4, middle_0, output_9'")
    chosen: list[BlockInfo] = []
    for item in wanted:
        m = CUSTOM_ENTRY.match(item)
        if not m:
            raise ValueError(f"custom_blocks entry {item!r} is not like 'input_4', 'middle_0' or 'output_9.0'")
        name, bid, idx = m.group(1), int(m.group(2)), m.group(3)
        hits = [b for b in blocks if b.key[0] == name and b.key[1] == bid and (idx is None or b.key[2] == int(idx))]
        if not hits:
            valid = sorted({f"{b.key[0]}_{b.key[1]}" for b in blocks})
            raise ValueError(f"custom_blocks entry {item!r} matches no transformer block; this model has {valid}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen
