"""pipelines/mimicbrush_weights.py: the official mimicbrush.bin layout loads into native ComfyUI objects.

Key names and shapes are checked against diffusers' UNet2DConditionModel and transformers'
CLIPVisionModelWithProjection built on the meta device (the libraries the official code saved from), and the
full-size mapping against ComfyUI's own full SD1.5 UNet and ViT-H config, all without allocating weights.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from humanref.pipelines.loading.comfy_unet import unet_shapes
from humanref.pipelines.mimicbrush import weights as mw
from humanref.pipelines.synthetic import mimicbrush as smb
from humanref.pipelines.synthetic.base import sd15_unet_config

STRIPPED_TENSORS = ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                    "attn1.to_out.0.bias", "norm2.weight", "norm2.bias", "attn2.to_q.weight", "attn2.to_k.weight",
                    "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias", "norm3.weight",
                    "norm3.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias")


def official_missing(last_block: str) -> set[str]:
    """What the official ReferenceNet has no tensors for (methods.md 2.1), spelled out by hand."""
    keys = {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias",
            f"{last_block}.proj_out.weight", f"{last_block}.proj_out.bias"}
    return keys | {f"{last_block}.transformer_blocks.0.{t}" for t in STRIPPED_TENSORS}


def diffusers_shapes(levels: int, in_channels: int, layers: int = 2) -> dict[str, tuple]:
    from diffusers import UNet2DConditionModel

    widths = (320, 640, 1280, 1280)[:levels]
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + (("DownBlock2D",) if levels == 4 else ("CrossAttnDownBlock2D",))
    up = (("UpBlock2D",) if levels == 4 else ("CrossAttnUpBlock2D",)) + ("CrossAttnUpBlock2D",) * (levels - 1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=layers,
                                    block_out_channels=widths, down_block_types=down, up_block_types=up,
                                    cross_attention_dim=768, attention_head_dim=8)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoint():
    return smb.mimicbrush_checkpoint()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, checkpoint):
    path = tmp_path_factory.mktemp("mb") / "mimicbrush.bin"
    torch.save(checkpoint, str(path))
    return str(path)


def fresh(checkpoint):
    return {part: dict(sd) for part, sd in checkpoint.items()}


@pytest.fixture(scope="module")
def loaded(tiny_file):
    return mw.load_mimicbrush(tiny_file)


def test_synthetic_file_has_the_official_diffusers_and_transformers_names(tiny_file):
    data = torch.load(tiny_file, weights_only=True)
    assert set(data) == set(mw.PARTS)
    ref = diffusers_shapes(levels=1, in_channels=13, layers=1)
    assert {k: tuple(v.shape) for k, v in data["unet"].items()} == ref
    writer_ref = diffusers_shapes(levels=1, in_channels=4, layers=1)
    missing = official_missing("up_blocks.0.attentions.1")
    assert missing <= set(writer_ref)
    assert {k: tuple(v.shape) for k, v in data["referencenet"].items()} == {
        k: v for k, v in writer_ref.items() if k not in missing}
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = smb.TINY_CLIP_VISION
    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
    expected = {k: tuple(v.shape) for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in data["image_encoder"].items()} == expected
    assert {k: tuple(v.shape) for k, v in data["image_proj"].items()} == {
        "projector.weight": (768, cfg["hidden_size"]), "projector.bias": (768,)}


def test_tiny_file_loads_as_native_comfy_objects(loaded):
    import comfy.clip_vision
    import comfy.model_patcher

    model, parts = loaded.model, loaded.parts
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 13
    assert model.model.concat_keys == ()  # the 9 channels come whole from the conditioning
    assert parts.reference_model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 4
    assert isinstance(parts.clip_vision, comfy.clip_vision.ClipVisionModel)
    assert set(loaded.filled_writer_keys) == official_missing("up_blocks.0.attentions.1")
    assert parts.projection.projector.weight.shape == (768, 64)


def test_converted_weights_are_the_file_weights(tiny_file, loaded):
    data = torch.load(tiny_file, weights_only=True)
    unet = loaded.model.model.diffusion_model
    # hand-picked diffusers -> ldm pairs (SD1.5 naming), independent of ComfyUI's map
    pairs = {"conv_in.weight": "input_blocks.0.0.weight",
             "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
                 "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
             "mid_block.attentions.0.proj_in.weight": "middle_block.1.proj_in.weight",
             "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
             "up_blocks.0.resnets.1.conv_shortcut.weight": "output_blocks.1.0.skip_connection.weight",
             "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight":
                 "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
             "time_embedding.linear_1.weight": "time_embed.0.weight", "conv_out.weight": "out.2.weight"}
    sd = unet.state_dict()
    for d, ldm in pairs.items():
        torch.testing.assert_close(sd[ldm].float(), data["unet"][d].float(), rtol=0, atol=0)
    wsd = loaded.parts.reference_model.model.diffusion_model.state_dict()
    torch.testing.assert_close(wsd["output_blocks.1.1.transformer_blocks.0.norm1.weight"].float(),
                               data["referencenet"]["up_blocks.0.attentions.1.transformer_blocks.0.norm1.weight"].float())
    assert float(wsd["out.2.weight"].abs().sum()) == 0.0  # documented-missing tensors are zeros, not garbage


def test_full_size_unet_mapping_on_meta_tensors():
    """Official SD1.5 sizes: diffusers names -> ComfyUI's full SD1.5 UNet keys and shapes (13 and 4 channels)."""
    full = dict(sd15_unet_config(channel_mult=(1, 2, 4, 4), num_res_blocks=2))
    for in_ch, stripped in ((13, False), (4, True)):
        shapes = diffusers_shapes(levels=4, in_channels=in_ch)
        missing = official_missing("up_blocks.3.attentions.2") if stripped else set()
        assert missing <= set(shapes)
        sd = {k: torch.empty(v, device="meta") for k, v in shapes.items() if k not in missing}
        ldm, config, filled = mw.convert_unet(sd, "unet", in_ch, tolerate_stripped=stripped)
        expected = unet_shapes(dict(full, in_channels=in_ch))
        assert {k: tuple(v.shape) for k, v in ldm.items()} == {k: tuple(v) for k, v in expected.items()}
        assert set(filled) == missing
        assert config["in_channels"] == in_ch
        assert config["transformer_depth_output"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    # 10 mid+up transformer blocks: middle + 9 output blocks with attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from humanref.attention.blocks import select_blocks, walk_transformer_blocks
    with torch.device("meta"):
        unet = UNetModel(**dict(full, in_channels=13), device="meta", operations=comfy.ops.disable_weight_init)
    assert len(select_blocks(walk_transformer_blocks(unet), "mid+up")) == 10


def test_full_size_vit_h_names_match_comfys_vit_h_on_meta():
    """The official image_encoder names (transformers ViT-H/14) are what ComfyUI's ViT-H CLIP vision loads, and
    ComfyUI's shape-based config choice picks ViT-H for them."""
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        official = CLIPVisionModelWithProjection(CLIPVisionConfig(**smb.VIT_H))
    names = {k: tuple(v.shape) for k, v in official.state_dict().items() if not k.endswith("position_ids")}
    assert names == {k: tuple(v) for k, v in smb.clip_vision_shapes(smb.VIT_H).items()}
    path = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json")
    with open(path) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        comfy_model = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    assert {k: tuple(v.shape) for k, v in comfy_model.state_dict().items()} == names
    assert "vision_model.encoder.layers.30.layer_norm1.weight" in names  # ComfyUI's rule for the ViT-H config
    assert "vision_model.encoder.layers.47.layer_norm1.weight" not in names


def write(tmp_path, data, name="mimicbrush.bin"):
    path = tmp_path / name
    torch.save(data, str(path))
    return str(path)


def test_wrong_conv_in_is_a_clear_error(tmp_path, checkpoint):
    data = fresh(checkpoint)
    data["unet"]["conv_in.weight"] = torch.zeros(320, 9, 3, 3)
    with pytest.raises(ValueError, match=r"conv_in.weight has 9 input channels.*13"):
        mw.load_mimicbrush(write(tmp_path, data))


def test_missing_part_and_missing_key_are_clear_errors(tmp_path, checkpoint):
    data = fresh(checkpoint)
    del data["depth_guider"]
    with pytest.raises(ValueError, match=r"missing part\(s\) \['depth_guider'\]"):
        mw.load_mimicbrush(write(tmp_path, data))
    data = fresh(checkpoint)
    del data["referencenet"]["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"]
    with pytest.raises(ValueError, match="referencenet: 1 missing key.*attn1.to_k.weight"):
        mw.load_mimicbrush(write(tmp_path, data))


class NeedsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"unet": NeedsCode()}, f)
    with pytest.raises(ValueError, match="refused.*weights_only"):
        mw.read_checkpoint(str(path))


def test_safetensors_variant_loads(tmp_path, checkpoint):
    from safetensors.torch import save_file

    data = checkpoint
    flat = {f"{part}.{k}": v.contiguous() for part, sd in data.items() for k, v in sd.items()}
    path = tmp_path / "mimicbrush.safetensors"
    save_file(flat, str(path))
    parts = mw.read_checkpoint(str(path))
    assert {p: set(sd) for p, sd in parts.items()} == {p: set(sd) for p, sd in data.items()}


def test_model_without_mimicbrush_conditioning_fails_clearly(loaded):
    import comfy.patcher_extension

    model = loaded.model
    x = torch.zeros(1, 4, 8, 8)
    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    to = {"wrappers": {kind: model.wrappers[kind]}}
    with pytest.raises(ValueError, match="9 extra input channels.*got 0"):
        model.model.apply_model(x, torch.tensor([1.0]), c_crossattn=torch.zeros(1, 257, 768), transformer_options=to)


@pytest.mark.parametrize("name, content", [("text.bin", b"this is not a model file\n" * 4), ("empty.bin", b""),
                                           ("truncated.bin", b"PK\x03\x04" + b"\x00" * 40),
                                           ("garbage.safetensors", b"\x00" * 64)])
def test_file_that_is_not_a_model_is_a_clear_error(tmp_path, name, content):
    """Found by the bad-input sweep: torch.load on a text file raised a bare IndexError."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} is not a (MimicBrush checkpoint|readable safetensors file)"):
        mw.read_checkpoint(str(path))
