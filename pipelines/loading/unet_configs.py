"""The one translation between diffusers' ``UNet2DConditionModel`` configs and ComfyUI's (ldm) UNet configs.

Three directions, named by what they return: an ldm config from a diffusers ``config.json`` (the Parts2Whole
release), an ldm config read off a diffusers state dict (MimicBrush's ``mimicbrush.bin`` and converted hand
generators carry no config), and the diffusers config of an ldm config (the trainers' diffusers UNet, the
synthetic releases' ``config.json``). SD1.5-style UNets (a fixed head count) and SDXL-style ones (64-channel
heads, the ``text_time`` added embedding) are expressed; what ComfyUI's UNet cannot be is refused by name.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from torch import Tensor

ATTENTION_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False, "CrossAttnUpBlock2D": True, "UpBlock2D": False}
# diffusers mid_block_type <-> ComfyUI transformer_depth_middle (depth > 0: res block, transformer, res block;
# -1: one res block; -2: no middle block)
MIDDLE_RES_ONLY, NO_MIDDLE = -1, -2
MID_CROSS_ATTN, MID_RES_ONLY = "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"
SD15_HEADS = 8
ADDED_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim, which ComfyUI's SDXL classes assume
_LDM_COMMON = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
               "use_temporal_attention": False, "use_temporal_resblock": False}


def _expect(cfg: Mapping, key: str, allowed: tuple, source: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"{source}: {key} = {value!r} is not supported (expected one of {allowed}); ComfyUI's "
                         "UNet has no equivalent")
    return value


def _per_level(value: Any, levels: int, key: str, source: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise ValueError(f"{source}: {key} = {value!r} must be one number or one per level ({levels})")


def _one_or_list(values: list[int]) -> Any:
    return values[0] if len(set(values)) == 1 else list(values)


# ----------------------------------------------------------------------------------------------- diffusers -> ldm
def ldm_config_from_diffusers_config(cfg: Mapping, source: str) -> dict:
    """ComfyUI's UNetModel config for a diffusers ``UNet2DConditionModel`` config (``config.json``)."""
    try:
        widths = [int(c) for c in cfg["block_out_channels"]]
        down = list(cfg["down_block_types"])
        up = list(cfg["up_block_types"])
        context_dim = int(cfg["cross_attention_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a UNet2DConditionModel config ({e!r} missing or invalid)") from e
    levels = len(widths)
    if levels == 0 or len(down) != levels or len(up) != levels:
        raise ValueError(f"{source}: {levels} block_out_channels but {len(down)} down and {len(up)} up blocks")
    base = widths[0]
    if any(w % base for w in widths) or any(w % 32 for w in widths):
        raise ValueError(f"{source}: block_out_channels {widths} must be multiples of the first and of 32")
    for t in down + up:
        if t not in ATTENTION_BLOCKS:
            raise ValueError(f"{source}: block type {t} is not supported")
    _expect(cfg, "norm_num_groups", (32,), source, 32)
    _expect(cfg, "class_embed_type", (None,), source)
    _expect(cfg, "time_cond_proj_dim", (None,), source)
    _expect(cfg, "reverse_transformer_layers_per_block", (None,), source)
    added = _expect(cfg, "addition_embed_type", (None, "text_time"), source)
    middle_type = _expect(cfg, "mid_block_type", (MID_CROSS_ATTN, MID_RES_ONLY, None), source, MID_CROSS_ATTN)
    res_blocks = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block", source)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", source)
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", SD15_HEADS), levels,
                       "attention_head_dim", source)  # diffusers' attention_head_dim holds the head count
    if len(set(heads)) == 1:
        num_heads, head_channels = heads[0], -1
    elif all(w % h == 0 for w, h in zip(widths, heads)) and len({w // h for w, h in zip(widths, heads)}) == 1:
        num_heads, head_channels = -1, widths[0] // heads[0]
    else:
        raise ValueError(f"{source}: attention heads {heads} for widths {widths}: ComfyUI's UNet has either the same "
                         "head count or the same head width at every level")
    attn_down = [ATTENTION_BLOCKS[t] for t in down]
    attn_up = [ATTENTION_BLOCKS[t] for t in reversed(up)]  # from the top level down, like ComfyUI's output depths
    middle = {MID_CROSS_ATTN: depth[-1], MID_RES_ONLY: MIDDLE_RES_ONLY, None: NO_MIDDLE}[middle_type]
    out = dict(_LDM_COMMON)
    out.update({
        "adm_in_channels": None, "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)), "model_channels": base, "num_res_blocks": res_blocks,
        "channel_mult": [w // base for w in widths],
        "transformer_depth": [depth[i] if attn_down[i] else 0 for i in range(levels) for _ in range(res_blocks[i])],
        "transformer_depth_output": [depth[i] if attn_up[i] else 0 for i in range(levels)
                                     for _ in range(res_blocks[i] + 1)],
        "transformer_depth_middle": middle, "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": context_dim, "num_heads": num_heads, "num_head_channels": head_channels,
    })
    if added == "text_time":
        try:
            out["adm_in_channels"] = int(cfg["projection_class_embeddings_input_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: addition_embed_type text_time needs projection_class_embeddings_input_dim "
                             f"({e!r})") from e
        out["num_classes"] = "sequential"
    return out


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def ldm_config_from_diffusers_state_dict(sd: Mapping[str, Tensor], source: str, num_heads: int = SD15_HEADS) -> dict:
    """ComfyUI's UNetModel config read off a diffusers SD1.5-style UNet state dict (no config.json).

    Levels, widths, res blocks per level and transformer depths per block come from the keys, so a stripped
    reference UNet (no ``conv_out``, a last transformer block reduced to its norm1) reads right; the head count
    cannot be seen in weights and is given (SD1.5: 8).
    """
    if "conv_in.weight" not in sd:
        raise ValueError(f"{source}: conv_in.weight is missing; not a diffusers UNet state dict")
    conv_in = sd["conv_in.weight"]
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = _count(sd, r"down_blocks\.(\d+)\.")
    if levels == 0:
        raise ValueError(f"{source}: no down_blocks.* keys; not a diffusers UNet state dict")
    num_res, mult, depth = [], [], []
    for i in range(levels):
        n = _count(sd, rf"down_blocks\.{i}\.resnets\.(\d+)\.")
        first = f"down_blocks.{i}.resnets.0.conv2.weight"
        if n == 0 or first not in sd:
            raise ValueError(f"{source}: {first} is missing; not a diffusers UNet state dict")
        num_res.append(n)
        mult.append(int(sd[first].shape[0]) // model_channels)
        for j in range(n):
            depth.append(_count(sd, rf"down_blocks\.{i}\.attentions\.{j}\.transformer_blocks\.(\d+)\.norm1\."))
    pop_order = []  # unet_to_diffusers pops from the end: up_blocks.0 (lowest level) first
    for x in range(levels):
        for i in range(num_res[levels - 1 - x] + 1):
            pop_order.append(_count(sd, rf"up_blocks\.{x}\.attentions\.{i}\.transformer_blocks\.(\d+)\.norm1\."))
    context = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in sd.items() if k.endswith("proj_in.weight")]
    mid = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.norm1\.")
    out = dict(_LDM_COMMON)
    out.update({
        "adm_in_channels": None, "in_channels": in_channels,
        "out_channels": int(sd["conv_out.weight"].shape[0]) if "conv_out.weight" in sd else 4,
        "model_channels": model_channels, "num_res_blocks": num_res, "transformer_depth": depth, "channel_mult": mult,
        "transformer_depth_middle": mid if mid else MIDDLE_RES_ONLY,
        "use_linear_in_transformer": bool(proj_in) and proj_in[0].ndim == 2,
        "context_dim": int(context[0].shape[1]) if context else 768, "num_heads": num_heads, "num_head_channels": -1,
        "transformer_depth_output": list(reversed(pop_order)),
    })
    return out


# ----------------------------------------------------------------------------------------------- ldm -> diffusers
def diffusers_config_from_ldm_config(unet_config: Mapping) -> dict:
    """The diffusers ``UNet2DConditionModel`` config (``config.json`` content) of a ComfyUI UNet config.

    ``UNet2DConditionModel(**config)`` builds the same network (diffusers drops the ``_class_name`` entry).
    """
    mc = int(unet_config["model_channels"])
    widths = [mc * int(m) for m in unet_config["channel_mult"]]
    levels = len(widths)
    res_blocks = [int(n) for n in unet_config["num_res_blocks"]]
    down_depth, out_depth = list(unet_config["transformer_depth"]), list(unet_config["transformer_depth_output"])
    if len(res_blocks) != levels or len(down_depth) != sum(res_blocks) or len(out_depth) != sum(res_blocks) + levels:
        raise ValueError(f"unsupported UNet: {levels} levels, res blocks {res_blocks}, transformer depths "
                         f"{down_depth} / {out_depth} do not line up")
    middle = int(unet_config["transformer_depth_middle"])
    per_level, attn_down, attn_up = [], [], []
    for i in range(levels):
        downs = down_depth[sum(res_blocks[:i]):sum(res_blocks[:i + 1])]
        ups = out_depth[sum(res_blocks[:i]) + i:sum(res_blocks[:i + 1]) + i + 1]
        if len(set(downs)) != 1 or len(set(ups)) != 1 or (downs[0] and ups[0] and downs[0] != ups[0]):
            raise ValueError(f"unsupported UNet: level {i} has transformer depths {downs} down and {ups} up; "
                             "diffusers gives every block of a level the same depth")
        d = downs[0] or ups[0]
        per_level.append(d if d else (middle if i == levels - 1 and middle > 0 else 1))
        attn_down.append(downs[0] > 0)
        attn_up.append(ups[0] > 0)
    if middle == 0 or middle < NO_MIDDLE:
        raise ValueError(f"unsupported UNet: transformer_depth_middle {middle} has no diffusers equivalent")
    if middle > 0 and middle != per_level[-1]:
        raise ValueError(f"unsupported UNet: a middle transformer of depth {middle} with {per_level[-1]} at the "
                         "lowest level; diffusers gives both the same depth")
    head_channels = unet_config.get("num_head_channels", -1)
    if head_channels in (-1, None):
        heads: Any = int(unet_config["num_heads"])
    else:
        if any(w % int(head_channels) for w in widths):
            raise ValueError(f"unsupported UNet: widths {widths} are not multiples of the head width {head_channels}")
        heads = _one_or_list([w // int(head_channels) for w in widths])
    middle_type: Optional[str] = {MIDDLE_RES_ONLY: MID_RES_ONLY, NO_MIDDLE: None}.get(middle, MID_CROSS_ATTN)
    config = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
        "block_out_channels": widths, "center_input_sample": False,
        "cross_attention_dim": int(unet_config["context_dim"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": int(unet_config["in_channels"]),
        "layers_per_block": _one_or_list(res_blocks), "mid_block_scale_factor": 1, "mid_block_type": middle_type,
        "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": int(unet_config.get("out_channels", 4)),
        "sample_size": 64, "transformer_layers_per_block": _one_or_list(per_level),
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_up)],
        "use_linear_projection": bool(unet_config.get("use_linear_in_transformer", False)),
    }
    adm = unet_config.get("adm_in_channels")
    if adm is not None:
        if unet_config.get("num_classes") != "sequential":
            raise ValueError(f"unsupported UNet: num_classes {unet_config.get('num_classes')!r} (only the sequential "
                             "added embedding, SDXL's text_time, has a diffusers equivalent here)")
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim": ADDED_TIME_EMBED_DIM,
                       "projection_class_embeddings_input_dim": int(adm)})
    return config
