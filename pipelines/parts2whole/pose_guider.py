"""Parts2Whole's pose guider: a small conv net whose output is added to the denoising UNet after conv_in.

Pure torch (no comfy): conv_in 3->16 + SiLU, then per channel step a 3x3 conv and a stride-2 3x3 conv, each
followed by SiLU, then conv_out to the UNet's first width. Key names are the release's
(``pose_guider/diffusion_pytorch_model.safetensors``) so its state dict loads as is.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_BLOCK_OUT_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)


class PoseGuider(nn.Module):
    def __init__(self, conditioning_embedding_channels: int = 320, conditioning_channels: int = 3,
                 block_out_channels: Sequence[int] = DEFAULT_BLOCK_OUT_CHANNELS) -> None:
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, chans[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(chans[-1], conditioning_embedding_channels, kernel_size=3, padding=1)

    @property
    def scale(self) -> int:
        """Spatial downsampling factor (8 for the release: three stride-2 convs)."""
        return 2 ** (len(self.blocks) // 2)

    def forward(self, pose: Tensor) -> Tensor:
        """pose [B, 3, H, W] in 0..1 -> features [B, C, H/scale, W/scale]."""
        x = F.silu(self.conv_in(pose))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def pose_guider_from_config(config: Mapping, source: str = "pose_guider/config.json") -> PoseGuider:
    """Build from the release's diffusers-style config (unknown keys are ignored, wrong values named)."""
    try:
        emb = int(config.get("conditioning_embedding_channels", 320))
        cin = int(config.get("conditioning_channels", 3))
        chans = tuple(int(c) for c in config.get("block_out_channels", DEFAULT_BLOCK_OUT_CHANNELS))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid pose guider config ({e})") from e
    if len(chans) < 1 or min(chans + (emb, cin)) <= 0:
        raise ValueError(f"{source}: invalid pose guider channels {chans}, embedding {emb}, input {cin}")
    return PoseGuider(emb, cin, chans)


def load_pose_guider(config: Mapping, state_dict: Mapping[str, Tensor], source: str) -> PoseGuider:
    """A float32 PoseGuider with the release weights; missing, unexpected or misshaped keys name the file."""
    guider = pose_guider_from_config(config, source)
    expected = guider.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: not a Parts2Whole pose guider state dict; missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: key {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)} "
                             "for the config in pose_guider/config.json")
    guider.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return guider.eval().requires_grad_(False)
