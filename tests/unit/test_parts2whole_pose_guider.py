"""Pose guider against the official layer sequence written with plain conv2d calls; key checks."""
import pytest
import torch
from naive import pose_guider_forward

from humanref.pipelines.parts2whole.pose_guider import PoseGuider, load_pose_guider


def release_state_dict(seed=0, out=320):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv_in.weight": (16, 3, 3, 3), "blocks.0.weight": (16, 16, 3, 3), "blocks.1.weight": (32, 16, 3, 3),
              "blocks.2.weight": (32, 32, 3, 3), "blocks.3.weight": (96, 32, 3, 3), "blocks.4.weight": (96, 96, 3, 3),
              "blocks.5.weight": (256, 96, 3, 3), "conv_out.weight": (out, 256, 3, 3)}
    sd = {}
    for k, s in shapes.items():
        sd[k] = torch.randn(s, generator=g) / (s[1] * 9) ** 0.5
        sd[k.replace("weight", "bias")] = torch.randn(s[0], generator=g) * 0.1
    return sd


def test_release_keys_and_forward():
    sd = release_state_dict()
    guider = load_pose_guider({"conditioning_embedding_channels": 320, "block_out_channels": [16, 32, 96, 256]}, sd,
                              "pose_guider/diffusion_pytorch_model.safetensors")
    assert sum(p.numel() for p in guider.parameters()) == sum(v.numel() for v in sd.values())
    assert guider.scale == 8
    x = torch.rand(1, 3, 48, 32)
    out = guider(x)
    assert out.shape == (1, 320, 6, 4)
    assert torch.allclose(out.double(), pose_guider_forward(sd, x.double()), atol=1e-5)


def test_param_count_matches_the_release_file_size():
    """4.35 MB of fp32 in the release: about 1.09 M parameters."""
    n = sum(p.numel() for p in PoseGuider().parameters())
    assert abs(n * 4 - 4.35e6) < 0.05e6


def test_key_errors_name_the_file():
    sd = release_state_dict()
    sd.pop("blocks.3.bias")
    with pytest.raises(ValueError, match=r"pg\.safetensors: .*missing keys \['blocks\.3\.bias'\]"):
        load_pose_guider({}, sd, "pg.safetensors")
    sd = release_state_dict(out=64)
    with pytest.raises(ValueError, match=r"pg\.safetensors: key conv_out\.weight has shape \(64, 256, 3, 3\)"):
        load_pose_guider({}, sd, "pg.safetensors")
    with pytest.raises(ValueError, match="invalid pose guider"):
        load_pose_guider({"block_out_channels": "x"}, release_state_dict(), "pg.safetensors")
