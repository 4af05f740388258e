"""Per-slot LoRA: each batch row of a writer's self-attention gets its own slot's low-rank q/k/v delta.

AnyDressing's Garment-Specific Feature Extractor runs every garment as one batch row, and each row adds its
slot's ``scale * up(down(x))`` to a projection's output. The same formula serves inference (the garment writer's
attn1 replace) and training (the diffusers attention processor).
"""
from __future__ import annotations

import torch
from torch import Tensor


def slot_lora_delta(x: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """scale * x down_b^T up_b^T per row b; x [B, N, C], down [B, r, C], up [B, C, r] -> [B, N, C]."""
    return scale * torch.bmm(torch.bmm(x, down.transpose(1, 2)), up.transpose(1, 2))
