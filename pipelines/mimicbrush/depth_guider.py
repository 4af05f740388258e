"""MimicBrush's depth guider: a depth map -> a 4-channel feature at latent resolution (pure PyTorch).

Seven 3x3 convolutions with SiLU (three of stride 2), then a 3x3 output convolution, as in the official
``DepthGuider``; key names match the ``depth_guider`` part of ``mimicbrush.bin``. The official forward first
resizes the depth map to 512x512 (bilinear, align_corners=True); here the size is the working resolution,
512 by default, so the feature always matches the latent grid (size / 8).
"""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

CHANNELS: tuple[int, ...] = (16, 32, 64, 128)


class DepthGuider(nn.Module):
    def __init__(self, out_channels: int = 4, in_channels: int = 1, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.blocks) // 2)

    def forward(self, depth: Tensor, size: tuple[int, int] = (512, 512)) -> Tensor:
        """depth [B, 1, H, W] (any size) -> feature [B, 4, size/8]."""
        if depth.ndim != 4 or depth.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"depth must be [batch, {self.conv_in.in_channels}, height, width], "
                             f"got {tuple(depth.shape)}")
        x = F.interpolate(depth.to(self.conv_in.weight.dtype), size=size, mode="bilinear", align_corners=True)
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def depth_guider_from_state_dict(sd: Mapping[str, Tensor], name: str = "depth_guider") -> DepthGuider:
    """A DepthGuider with the official layout; a missing, extra or misshapen key is a ValueError naming it."""
    if "conv_in.weight" not in sd or "conv_out.weight" not in sd:
        raise ValueError(f"{name}: expected the keys conv_in.weight and conv_out.weight of MimicBrush's depth "
                         f"guider; found {sorted(sd)[:6]}")
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    channels = [int(sd["conv_in.weight"].shape[0])]
    for i in range(1, n_blocks, 2):
        key = f"blocks.{i}.weight"
        if key not in sd:
            raise ValueError(f"{name}: missing {key}")
        channels.append(int(sd[key].shape[0]))
    guider = DepthGuider(int(sd["conv_out.weight"].shape[0]), int(sd["conv_in.weight"].shape[1]), tuple(channels))
    expected = guider.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"{name}: missing keys {missing[:8]}, unexpected keys {extra[:8]}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{name}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    guider.load_state_dict({k: v.float() for k, v in sd.items()})
    return guider.eval().requires_grad_(False)
