"""pipelines/loading/unet_configs.py and diffusers_unet.py against the real SD1.5 and SDXL UNets.

References, none of them the code under test: the ``config.json`` files of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 written out by hand; diffusers' own ``UNet2DConditionModel`` built
from them on the meta device (its key names and shapes); ComfyUI's own diffusers detection
(``comfy.model_detection.unet_config_from_diffusers_unet``, which returns ComfyUI's full config for a known
UNet) and its model-family choice (``comfy.supported_models``).
"""
from __future__ import annotations

import json

import pytest
import torch

from humanref.pipelines.loading.comfy_unet import config_family, unet_shapes
from humanref.pipelines.loading.diffusers_unet import convert_unet_state_dict, diffusers_names
from humanref.pipelines.loading.unet_configs import (
    diffusers_config_from_ldm_config,
    ldm_config_from_diffusers_config,
    ldm_config_from_diffusers_state_dict,
)

SD15_CONFIG_JSON = """{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"""
SDXL_CONFIG_JSON = """{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
  "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": false,
  "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
  "cross_attention_dim": 2048, "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
  "dual_cross_attention": false, "encoder_hid_dim": null, "encoder_hid_dim_type": null, "flip_sin_to_cos": true,
  "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": null,
  "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
  "resnet_skip_time_act": false, "resnet_time_scale_shift": "default", "sample_size": 128,
  "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
  "time_embedding_type": "positional", "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": null,
  "use_linear_projection": true
}"""
REAL = {"SD15": json.loads(SD15_CONFIG_JSON), "SDXL": json.loads(SDXL_CONFIG_JSON)}
# UNetModel's defaults for the keys one side may leave out
LDM_DEFAULTS = {"num_heads": -1, "num_head_channels": -1, "num_classes": None, "adm_in_channels": None}
ARCHITECTURE_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                     "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                     "use_linear_projection", "in_channels", "out_channels", "mid_block_type", "addition_embed_type",
                     "addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups")


def diffusers_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def shapes_of(module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_same_ldm(mine: dict, reference: dict) -> None:
    for key in (set(mine) | set(reference)) - {"dtype"}:
        assert mine.get(key, LDM_DEFAULTS.get(key)) == reference.get(key, LDM_DEFAULTS.get(key)), key


@pytest.fixture(scope="module", params=["SD15", "SDXL"])
def real(request):
    """(family, config.json, diffusers meta module, ComfyUI's own ldm config for that module)."""
    import comfy.model_detection

    family = request.param
    module = diffusers_unet(REAL[family])
    meta = dict(module.state_dict())
    reference = comfy.model_detection.unet_config_from_diffusers_unet(meta)
    assert reference is not None
    return family, REAL[family], module, reference


def test_config_json_to_ldm_is_comfys_own(real):
    import comfy.model_detection

    family, cfg, _, reference = real
    mine = ldm_config_from_diffusers_config(cfg, "config.json")
    assert_same_ldm(mine, reference)
    assert config_family(comfy.model_detection.model_config_from_unet_config(mine)) == family


def test_ldm_to_diffusers_builds_the_real_unet(real):
    _, cfg, module, reference = real
    config = diffusers_config_from_ldm_config(reference)
    ours = diffusers_unet(config)
    assert shapes_of(ours) == shapes_of(module)
    for key in ARCHITECTURE_KEYS:
        a, b = ours.config[key], module.config[key]
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key
    json.dumps(config)  # a config.json


def test_round_trips(real):
    _, cfg, _, reference = real
    assert_same_ldm(ldm_config_from_diffusers_config(diffusers_config_from_ldm_config(reference), "rt"), reference)
    again = diffusers_config_from_ldm_config(ldm_config_from_diffusers_config(cfg, "config.json"))
    assert {k: again[k] for k in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                                  "cross_attention_dim")} == {k: cfg[k] for k in ("block_out_channels",
                                  "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim")}


def test_weights_convert_both_ways_on_meta(real):
    """Every diffusers tensor lands on a ComfyUI key of the same shape, and back (SDXL: the added embedding has
    two diffusers spellings in ComfyUI's map; the module's own one is used)."""
    family, _, module, reference = real
    sd = dict(module.state_dict())
    ldm, filled = convert_unet_state_dict(sd, reference, family)
    assert filled == ()
    assert {k: tuple(v.shape) for k, v in ldm.items()} == {k: tuple(v) for k, v in unet_shapes(reference).items()}
    back = diffusers_names(reference, ldm)
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes_of(module)
    if family == "SDXL":
        twin = dict(sd, **{"class_embedding.linear_1.weight": sd["add_embedding.linear_1.weight"]})
        with pytest.raises(ValueError, match=r"SDXL: keys .*add_embedding.linear_1.weight.* same tensor"):
            convert_unet_state_dict(twin, reference, family)


@pytest.mark.parametrize("real", ["SD15"], indirect=True)  # an SDXL UNet's head width is not in its weights
def test_state_dict_to_ldm_is_comfys_own(real):
    _, _, module, reference = real
    assert_same_ldm(ldm_config_from_diffusers_state_dict(dict(module.state_dict()), "unet"), reference)


def test_per_level_res_blocks_both_ways():
    """layers_per_block differing per level (MimicBrush's reader keeps them): read off the weights, rebuilt.

    (Not converted: ComfyUI's own key map, comfy.utils.unet_to_diffusers, numbers input blocks as if every level
    had the same count.)"""
    cfg = {"block_out_channels": [32, 64], "layers_per_block": [1, 2], "cross_attention_dim": 16,
           "attention_head_dim": 8, "norm_num_groups": 32, "in_channels": 13,
           "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    module = diffusers_unet(cfg)
    sd = dict(module.state_dict())
    from_weights = ldm_config_from_diffusers_state_dict(sd, "unet")
    assert from_weights["num_res_blocks"] == [1, 2] and from_weights["in_channels"] == 13
    assert_same_ldm(from_weights, ldm_config_from_diffusers_config(cfg, "config.json"))
    rebuilt = diffusers_config_from_ldm_config(from_weights)
    assert rebuilt["layers_per_block"] == [1, 2]
    assert shapes_of(diffusers_unet(rebuilt)) == shapes_of(module)


@pytest.mark.parametrize("change, message", [
    ({"class_embed_type": "projection"}, r"class_embed_type = 'projection' is not supported"),
    ({"attention_head_dim": [5, 7, 20]}, r"attention heads \[5, 7, 20\]"),
    ({"transformer_layers_per_block": [1, 2]}, r"transformer_layers_per_block = \[1, 2\] must be one number or one "
                                               r"per level \(3\)"),
    ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
     r"block type SimpleCrossAttnDownBlock2D is not supported"),
    ({"addition_embed_type": "text"}, r"addition_embed_type = 'text' is not supported"),
])
def test_what_comfyui_cannot_express_is_refused(change, message):
    with pytest.raises(ValueError, match=rf"unet/config\.json: {message}"):
        ldm_config_from_diffusers_config(dict(REAL["SDXL"], **change), "unet/config.json")


def test_ldm_configs_diffusers_cannot_express_are_refused():
    from humanref.pipelines.synthetic.base import sd15_unet_config

    uneven = sd15_unet_config(channel_mult=(1, 2), num_res_blocks=2)
    uneven["transformer_depth"] = [1, 2, 1, 1]
    with pytest.raises(ValueError, match="level 0 has transformer depths"):
        diffusers_config_from_ldm_config(uneven)
    middle = sd15_unet_config(channel_mult=(1, 2))
    middle["transformer_depth_middle"] = 3
    with pytest.raises(ValueError, match="middle transformer of depth 3"):
        diffusers_config_from_ldm_config(middle)
