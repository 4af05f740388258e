"""The garment-weights format (pipelines/garment_weights.py): a synthetic file round-trips, corruption fails clearly.

Key names and shapes are written out here by hand (the documented format), not taken from the module.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from humanref.attention.blocks import BlockInfo
from humanref.pipelines.anydressing import weights as GW

WIDTHS = {"input_blocks.1.1.transformer_blocks.0": 8, "middle_block.1.transformer_blocks.0": 16}
RANK = 2
SLOTS = ["upper", "lower"]


def hand_state_dict(rank=RANK, widths=WIDTHS, slots=SLOTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for slot in slots:
        for path, c in widths.items():
            for proj in ("to_q", "to_k", "to_v"):
                sd[f"garment.{slot}.{path}.attn1.{proj}.lora_down.weight"] = torch.randn(rank, c, generator=g)
                sd[f"garment.{slot}.{path}.attn1.{proj}.lora_up.weight"] = torch.randn(c, rank, generator=g)
    for path, c in widths.items():
        sd[f"dressing.{path}.attn1.to_k.weight"] = torch.randn(c, c, generator=g)
        sd[f"dressing.{path}.attn1.to_v.weight"] = torch.randn(c, c, generator=g)
    return sd


def hand_meta(**kw):
    meta = {"format": "humanref.garment_weights", "format_version": "1", "base_model": "SD15",
            "slots": json.dumps(SLOTS), "rank": str(RANK)}
    meta.update(kw)
    return {k: v for k, v in meta.items() if v is not None}


def write(tmp_path, sd, meta, name="g.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), metadata=meta)
    return str(path)


def test_synthetic_file_loads_with_every_tensor_in_place(tmp_path):
    sd = hand_state_dict()
    w = GW.load_garment_weights(write(tmp_path, sd, hand_meta(alpha="1.0")))
    assert w.name == "g.safetensors" and w.base_model == "SD15" and w.slots == ("upper", "lower")
    assert w.rank == RANK and w.scale == pytest.approx(0.5)
    assert dict(w.widths) == WIDTHS
    path = "middle_block.1.transformer_blocks.0"
    lo = w.lora["lower"][path]
    assert torch.equal(lo.k[0], sd[f"garment.lower.{path}.attn1.to_k.lora_down.weight"])
    assert torch.equal(lo.v[1], sd[f"garment.lower.{path}.attn1.to_v.lora_up.weight"])
    x = torch.randn(3, 16)
    torch.testing.assert_close(w.dressing[path][0](x), x @ sd[f"dressing.{path}.attn1.to_k.weight"].T)
    assert w.slot_index("lower", "slot_2") == 1
    # default alpha = rank: scale 1
    assert GW.load_garment_weights(write(tmp_path, sd, hand_meta(), "b.safetensors")).scale == 1.0


def test_save_round_trip_and_state_dict_keys(tmp_path):
    lora, dressing = GW.random_garment_weights(WIDTHS, SLOTS, RANK, seed=3)
    path = str(tmp_path / "rt.safetensors")
    GW.save_garment_weights(path, "SD15", SLOTS, RANK, lora, dressing, alpha=4.0)
    w = GW.load_garment_weights(path)
    assert set(GW.garment_weights_state_dict(w.lora, w.dressing)) == set(hand_state_dict())
    assert w.scale == 2.0
    p = "input_blocks.1.1.transformer_blocks.0"
    assert torch.equal(w.lora["upper"][p].q[0], lora["upper"][p].q[0])


def test_bias_of_w_prime_is_optional_and_checked(tmp_path):
    sd = hand_state_dict()
    p = "input_blocks.1.1.transformer_blocks.0"
    sd[f"dressing.{p}.attn1.to_v.bias"] = torch.ones(8)
    w = GW.load_garment_weights(write(tmp_path, sd, hand_meta()))
    x = torch.zeros(1, 8)
    assert torch.equal(w.dressing[p][1](x), torch.ones(1, 8))
    sd[f"dressing.{p}.attn1.to_v.bias"] = torch.ones(9)
    with pytest.raises(ValueError, match=r"shape mismatch at dressing\.input_blocks\.1\.1\.transformer_blocks\.0"
                                         r"\.attn1\.to_v\.bias"):
        GW.load_garment_weights(write(tmp_path, sd, hand_meta(), "c.safetensors"))


def corrupt_missing(sd):
    del sd["garment.lower.middle_block.1.transformer_blocks.0.attn1.to_v.lora_up.weight"]


def corrupt_rank(sd):
    key = "garment.upper.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight"
    sd[key] = torch.randn(RANK + 1, 8)


def corrupt_shape(sd):
    sd["dressing.middle_block.1.transformer_blocks.0.attn1.to_k.weight"] = torch.randn(16, 8)


def corrupt_width(sd):
    sd["dressing.middle_block.1.transformer_blocks.0.attn1.to_k.weight"] = torch.randn(8, 8)


def corrupt_unknown_key(sd):
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)


def corrupt_unlisted_slot(sd):
    sd["garment.hat.middle_block.1.transformer_blocks.0.attn1.to_q.lora_down.weight"] = torch.zeros(RANK, 16)


def corrupt_no_dressing(sd):
    for k in [k for k in sd if k.startswith("dressing.")]:
        del sd[k]


@pytest.mark.parametrize("corrupt, message", [
    (corrupt_missing, r"missing garment\.lower\.middle_block\.1\.transformer_blocks\.0\.attn1\.to_v\.lora_up\.weight"),
    (corrupt_rank, r"rank or shape mismatch at garment\.upper\.input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q"
                   r": lora_down \(3, 8\)"),
    (corrupt_shape, r"dressing\.middle_block\.1\.transformer_blocks\.0\.attn1\.to_k\.weight has shape \(16, 8\)"),
    (corrupt_width, r"shape mismatch at dressing\.middle_block\.1\.transformer_blocks\.0\.attn1\.to_v\.weight"),
    (corrupt_unknown_key, r"unexpected key 'model\.diffusion_model\.input_blocks\.0\.0\.weight'"),
    (corrupt_unlisted_slot, r"slot 'hat', which the metadata does not list"),
    (corrupt_no_dressing, r"no dressing\.\* projections"),
])
def test_corrupted_files_fail_clearly(tmp_path, corrupt, message):
    sd = hand_state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=r"garment_weights g\.safetensors.*" + message):
        GW.load_garment_weights(write(tmp_path, sd, hand_meta()))


@pytest.mark.parametrize("meta, message", [
    (dict(format=None), r"not a HumanRef garment-weights file"),
    (dict(format="lora"), r"not a HumanRef garment-weights file"),
    (dict(format_version="2"), r"format_version '2'"),
    (dict(base_model=None), r"no base_model"),
    (dict(slots="upper,lower"), r"'slots' must be a JSON list"),
    (dict(slots=json.dumps(["upper", "upper"])), r"slot names must be unique"),
    (dict(slots=json.dumps(["up.per"])), r"slot names must be unique letters"),
    (dict(rank="two"), r"'rank' must be an integer"),
    (dict(rank="0"), r"rank and alpha must be positive"),
])
def test_bad_metadata_fails_clearly(tmp_path, meta, message):
    with pytest.raises(ValueError, match=message):
        GW.load_garment_weights(write(tmp_path, hand_state_dict(), hand_meta(**meta)))


def test_truncated_or_foreign_files_fail_clearly(tmp_path):
    path = write(tmp_path, hand_state_dict(), hand_meta())
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"garment_weights cut\.safetensors cannot be read as safetensors"):
        GW.load_garment_weights(str(cut))
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        GW.load_garment_weights(str(tmp_path / "weights.pt"))


def test_check_model_family_blocks_and_widths(tmp_path):
    w = GW.parse_garment_weights(hand_state_dict(), hand_meta(), "g.safetensors")
    blocks = [BlockInfo(("input", 1, 0), 8, "input_blocks.1.1.transformer_blocks.0"),
              BlockInfo(("middle", 0, 0), 16, "middle_block.1.transformer_blocks.0")]
    w.check_model(blocks, "SD15", "writer")  # matches
    with pytest.raises(ValueError, match=r"is for base model SD15, but writer is SDXL"):
        w.check_model(blocks, "SDXL", "writer")
    with pytest.raises(ValueError, match=r"does not match writer's transformer blocks \(3 in the model, 2 in the file"):
        w.check_model(blocks + [BlockInfo(("output", 0, 0), 16, "output_blocks.0.1.transformer_blocks.0")], "SD15",
                      "writer")
    wide = [blocks[0], BlockInfo(("middle", 0, 0), 32, "middle_block.1.transformer_blocks.0")]
    with pytest.raises(ValueError, match=r"block middle_block\.1\.transformer_blocks\.0 is 16 wide in the file but "
                                         r"32 in writer"):
        w.check_model(wide, "SD15", "writer")
    with pytest.raises(ValueError, match=r"slot_3 is slot 'shoes'.*its slots: upper, lower"):
        w.slot_index("shoes", "slot_3")
