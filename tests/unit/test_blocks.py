"""Transformer block discovery and block-set selection on a tiny fake ComfyUI UNet made of torch.nn modules."""
from __future__ import annotations

import pytest
from torch import nn

from humanref.attention import blocks as B


class FakeBasicTransformerBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = nn.Identity()


class FakeSpatialTransformer(nn.Module):
    def __init__(self, channels, depth):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.transformer_blocks = nn.ModuleList(FakeBasicTransformerBlock(channels) for _ in range(depth))


class FakeResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)


class TimestepEmbedSequential(nn.Sequential):
    pass


class FakeUNet(nn.Module):
    """input_blocks: conv, (res, st320), (res, st320), down, (res, st640 x2); middle: (res, st1280 x2, res);
    output_blocks: (res, st640), (res, st640, up), (res, st320), (res,)."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Conv2d(4, 320, 3, padding=1)),
                TimestepEmbedSequential(FakeResBlock(320), FakeSpatialTransformer(320, 1)),
                nn.ModuleList([FakeResBlock(320), FakeSpatialTransformer(320, 1)]),
                TimestepEmbedSequential(nn.Conv2d(320, 320, 3, stride=2, padding=1)),
                TimestepEmbedSequential(FakeResBlock(640), FakeSpatialTransformer(640, 2)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(
            FakeResBlock(1280), FakeSpatialTransformer(1280, 2), FakeResBlock(1280)
        )
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(FakeResBlock(640), FakeSpatialTransformer(640, 1)),
                TimestepEmbedSequential(FakeResBlock(640), FakeSpatialTransformer(640, 1), nn.Upsample(scale_factor=2)),
                nn.ModuleList([FakeResBlock(320), FakeSpatialTransformer(320, 1)]),
                TimestepEmbedSequential(FakeResBlock(320)),
            ]
        )


class FakeModel(nn.Module):  # what a ModelPatcher's model looks like: .diffusion_model
    def __init__(self):
        super().__init__()
        self.diffusion_model = FakeUNet()


EXPECTED = [
    (("input", 1, 0), 320, "input_blocks.1.1.transformer_blocks.0"),
    (("input", 2, 0), 320, "input_blocks.2.1.transformer_blocks.0"),
    (("input", 4, 0), 640, "input_blocks.4.1.transformer_blocks.0"),
    (("input", 4, 1), 640, "input_blocks.4.1.transformer_blocks.1"),
    (("middle", 0, 0), 1280, "middle_block.1.transformer_blocks.0"),
    (("middle", 0, 1), 1280, "middle_block.1.transformer_blocks.1"),
    (("output", 0, 0), 640, "output_blocks.0.1.transformer_blocks.0"),
    (("output", 1, 0), 640, "output_blocks.1.1.transformer_blocks.0"),
    (("output", 2, 0), 320, "output_blocks.2.1.transformer_blocks.0"),
]


def _expected_module(unet, key):
    """The block a key names, reached by explicit attribute access (not get_submodule)."""
    name, bid, idx = key
    if name == "middle":
        return unet.middle_block[1].transformer_blocks[idx]
    group = unet.input_blocks if name == "input" else unet.output_blocks
    return group[bid][1].transformer_blocks[idx]


@pytest.fixture
def model():
    return FakeModel()


@pytest.fixture
def blocks(model):
    return B.walk_transformer_blocks(model.diffusion_model)


def test_walk_keys_channels_paths(blocks):
    assert [(b.key, b.channels, b.path) for b in blocks] == EXPECTED


def test_walk_paths_resolve_to_the_blocks(model, blocks):
    unet = model.diffusion_model
    for b in blocks:
        module = unet.get_submodule(b.path)
        assert module is _expected_module(unet, b.key)
        assert isinstance(module, FakeBasicTransformerBlock)
        assert module.norm1.normalized_shape == (b.channels,)
        # and from the outer model, as a patch key would be written
        assert model.get_submodule("diffusion_model." + b.path) is module


def test_walk_without_transformer_blocks_raises():
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1))])
    with pytest.raises(ValueError, match="no UNet transformer blocks"):
        B.walk_transformer_blocks(unet)
    with pytest.raises(ValueError, match="no UNet transformer blocks"):
        B.walk_transformer_blocks(nn.Linear(2, 2))


def test_walk_without_middle_block():
    unet = FakeUNet()
    del unet.middle_block
    keys = [b.key for b in B.walk_transformer_blocks(unet)]
    assert keys == [e[0] for e in EXPECTED if e[0][0] != "middle"]


def test_block_label_and_description(blocks):
    assert B.block_label(("input", 4, 0)) == "input_4.0"
    assert B.block_label(("middle", 0, 1)) == "middle_0.1"
    assert B.describe_architecture(blocks) == "UNet (9 transformer blocks, widths [320, 640, 1280])"
    assert B.describe_architecture(blocks, "SD15") == "SD15 (9 transformer blocks, widths [320, 640, 1280])"


def _keys(selected):
    return [b.key for b in selected]


def test_select_all(blocks):
    assert _keys(B.select_blocks(blocks, "all")) == [e[0] for e in EXPECTED]


def test_select_mid_up(blocks):
    assert _keys(B.select_blocks(blocks, "mid+up")) == [
        ("middle", 0, 0), ("middle", 0, 1), ("output", 0, 0), ("output", 1, 0), ("output", 2, 0)
    ]


def test_select_down_only(blocks):
    expected = [("input", 1, 0), ("input", 2, 0), ("input", 4, 0), ("input", 4, 1)]
    assert _keys(B.select_blocks(blocks, "down-only")) == expected


@pytest.mark.parametrize(
    "custom,expected",
    [
        ("input_1, middle_0, output_2.0", [("input", 1, 0), ("middle", 0, 0), ("middle", 0, 1), ("output", 2, 0)]),
        ("input_4.1;middle_0.0", [("input", 4, 1), ("middle", 0, 0)]),
        (" input_4 , input_4.0, ", [("input", 4, 0), ("input", 4, 1)]),  # duplicates kept once
    ],
)
def test_select_custom(blocks, custom, expected):
    assert _keys(B.select_blocks(blocks, "custom", custom)) == expected


def test_select_unknown_set(blocks):
    with pytest.raises(ValueError, match=r"unknown block set 'up-only'.*'all'.*'mid\+up'.*'down-only'.*'custom'"):
        B.select_blocks(blocks, "up-only")


@pytest.mark.parametrize("custom", ["", "  ", " , ;"])
def test_select_custom_empty(blocks, custom):
    with pytest.raises(ValueError, match="block set 'custom' needs a list in custom_blocks"):
        B.select_blocks(blocks, "custom", custom)


@pytest.mark.parametrize("entry", ["input4", "down_1", "middle_0.x", "output_2.0.1", "Input_1"])
def test_select_custom_malformed(blocks, entry):
    with pytest.raises(ValueError, match=rf"custom_blocks entry '{entry}' is not like"):
        B.select_blocks(blocks, "custom", f"input_1, {entry}")


@pytest.mark.parametrize("entry", ["output_3", "input_0", "output_2.5", "middle_1"])
def test_select_custom_matches_nothing(blocks, entry):
    with pytest.raises(ValueError) as err:
        B.select_blocks(blocks, "custom", f"input_1, {entry}")
    msg = str(err.value)
    assert f"custom_blocks entry '{entry}' matches no transformer block" in msg
    for valid in ("input_1", "input_2", "input_4", "middle_0", "output_0", "output_1", "output_2"):
        assert f"'{valid}'" in msg
