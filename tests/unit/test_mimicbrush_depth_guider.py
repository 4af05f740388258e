"""pipelines/depth_guider.py against a naive float64 convolution (explicit patch sums), and its loader checks."""
from __future__ import annotations

import pytest
import torch

from humanref.pipelines.mimicbrush.depth_guider import DepthGuider, depth_guider_from_state_dict

DT = torch.float64


def naive_conv(x, w, b, stride):
    """3x3 convolution, zero padding 1, as explicit sums over the kernel taps."""
    n, c, h, wd = x.shape
    xp = torch.zeros(n, c, h + 2, wd + 2, dtype=DT)
    xp[:, :, 1:-1, 1:-1] = x
    oh, ow = (h - 1) // stride + 1, (wd - 1) // stride + 1
    out = torch.zeros(n, w.shape[0], oh, ow, dtype=DT)
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            out += torch.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx].to(DT))
    return out + b.to(DT)[None, :, None, None]


def naive_guider(sd, depth, size):
    x = torch.nn.functional.interpolate(depth.to(DT), size=size, mode="bilinear", align_corners=True)
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    x = silu(naive_conv(x, sd["conv_in.weight"], sd["conv_in.bias"], 1))
    for i in range(6):
        x = silu(naive_conv(x, sd[f"blocks.{i}.weight"], sd[f"blocks.{i}.bias"], 2 if i % 2 else 1))
    return naive_conv(x, sd["conv_out.weight"], sd["conv_out.bias"], 1)


def random_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in DepthGuider().state_dict().items()}


def test_official_layout_and_shapes():
    sd = DepthGuider().state_dict()
    assert sd["conv_in.weight"].shape == (16, 1, 3, 3)
    assert [tuple(sd[f"blocks.{i}.weight"].shape) for i in range(6)] == [
        (16, 16, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert sd["conv_out.weight"].shape == (4, 128, 3, 3)


@pytest.mark.parametrize("size,depth_hw", [((64, 64), (50, 70)), ((48, 32), (48, 32))])
def test_forward_matches_naive(size, depth_hw):
    sd = random_state_dict(1)
    guider = depth_guider_from_state_dict(sd)
    depth = torch.rand(2, 1, *depth_hw, generator=torch.Generator().manual_seed(2))
    out = guider(depth, size)
    assert out.shape == (2, 4, size[0] // 8, size[1] // 8) and out.dtype == torch.float32
    ref = naive_guider(sd, depth, size)
    torch.testing.assert_close(guider.double()(depth, size), ref, rtol=1e-9, atol=1e-9)  # same math, float64
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_bad_state_dicts_name_the_key():
    sd = random_state_dict()
    del sd["blocks.3.bias"]
    with pytest.raises(ValueError, match="blocks.3.bias"):
        depth_guider_from_state_dict(sd)
    sd = random_state_dict()
    sd["blocks.2.weight"] = torch.zeros(32, 32, 5, 5)
    with pytest.raises(ValueError, match="blocks.2.weight"):
        depth_guider_from_state_dict(sd)
    with pytest.raises(ValueError, match="conv_in.weight"):
        depth_guider_from_state_dict({"foo": torch.zeros(1)})


def test_depth_must_be_one_channel():
    with pytest.raises(ValueError, match="depth must be"):
        DepthGuider()(torch.zeros(1, 3, 8, 8), (16, 16))
