"""pipelines/references/bank_files.py: a hand-built bank written and read back exactly, the file layout read with
safetensors itself, new names instead of overwrites, and every refusal (every step, not a bank, another format
version, damaged: truncated, bad header, changed bytes; missing or unknown parts)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from humanref.attention.adain import FeatureStats
from humanref.attention.bank import CapturedTokens, ReferenceBank, ReferenceInfo, Timing
from humanref.attention.kernels import LinearWeights
from humanref.pipelines.references import bank_files as BF

BLOCKS = {("input", 1, 0): 8, ("middle", 0, 0): 16, ("output", 3, 1): 8}  # not in sorted order on purpose


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_bank(with_extras: bool = True) -> ReferenceBank:
    """Two references; per block: fp16 / bf16 / fp32 tokens, one reference with no token left on a block."""
    refs = (ReferenceInfo("face", 0, (64, 48), True), ReferenceInfo("upper body clothes", 1, (32, 24), False))
    dtypes = {("input", 1, 0): torch.float16, ("middle", 0, 0): torch.bfloat16, ("output", 3, 1): torch.float32}
    features = {}
    for i, (key, c) in enumerate(BLOCKS.items()):
        if key == ("output", 3, 1):
            continue  # a block of the writer without captured features (a writer run for some blocks only)
        first = CapturedTokens(_rand(5 + i, c, seed=i, dtype=dtypes[key]), 3 + i)
        second = CapturedTokens(torch.zeros(0, c, dtype=dtypes[key]), 12) if key[0] == "middle" else \
            CapturedTokens(_rand(7, c, seed=10 + i, dtype=dtypes[key]), 0)
        features[key] = (first, second)
    extras = {}
    if with_extras:
        extras = dict(
            projections={("input", 1, 0): (LinearWeights(_rand(8, 8, seed=20)), LinearWeights(_rand(8, 8, seed=21),
                                                                                               _rand(8, seed=22))),
                         ("middle", 0, 0): (LinearWeights(_rand(16, 16, seed=23)),
                                            LinearWeights(_rand(16, 16, seed=24)))},
            regions=torch.stack([torch.ones(10, 6), (torch.arange(60).reshape(10, 6) % 7 > 2).float() * 0.75]),
            stats={("middle", 0): (FeatureStats(_rand(16, seed=30), _rand(16, seed=31).abs()), None),
                   ("output", 0): (FeatureStats(_rand(8, seed=32), _rand(8, seed=33).abs()),
                                   FeatureStats(_rand(8, seed=34), _rand(8, seed=35).abs()))},
        )
    return ReferenceBank(refs, dict(BLOCKS), Timing.ONCE, "area", features=features, family="SD15", **extras)


def saved(tmp_path, bank=None, stem="bank") -> str:
    return BF.save_reference_bank(bank or make_bank(), str(tmp_path), stem)


def assert_same_bank(a: ReferenceBank, b: ReferenceBank) -> None:
    assert a.references == b.references and a.family == b.family and a.mask_rule == b.mask_rule
    assert b.timing is Timing.ONCE and b.writer is None
    assert list(a.block_channels.items()) == list(b.block_channels.items())
    assert list(a.features) == list(b.features)
    for key, entries in a.features.items():
        for x, y in zip(entries, b.features[key], strict=True):
            assert x.dropped == y.dropped and x.tokens.dtype == y.tokens.dtype and torch.equal(x.tokens, y.tokens)
    assert (a.projections is None) == (b.projections is None) and (a.regions is None) == (b.regions is None)
    for key, pair in (a.projections or {}).items():
        for x, y in zip(pair, b.projections[key], strict=True):
            assert torch.equal(x.weight, y.weight) and (x.bias is None) == (y.bias is None)
            assert x.bias is None or torch.equal(x.bias, y.bias)
    if a.regions is not None:
        assert torch.equal(a.regions, b.regions)
    assert (a.stats is None) == (b.stats is None)
    for point, per_ref in (a.stats or {}).items():
        for x, y in zip(per_ref, b.stats[point], strict=True):
            assert (x is None) == (y is None)
            assert x is None or (torch.equal(x.mean, y.mean) and torch.equal(x.var, y.var))


@pytest.mark.parametrize("with_extras", [True, False])
def test_a_saved_bank_loads_back_exactly(tmp_path, with_extras):
    bank = make_bank(with_extras)
    path = saved(tmp_path, bank)
    assert os.path.basename(path) == "bank_00001_.safetensors"
    assert_same_bank(bank, BF.load_reference_bank(path))


def test_the_file_layout_is_the_documented_one(tmp_path):
    """Read back with safetensors alone: the keys, dtypes and metadata the module docstring promises."""
    bank = make_bank()
    with safe_open(saved(tmp_path, bank), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        tokens = f.get_tensor("features.input_1.0.0")
        empty = f.get_tensor("features.middle_0.0.1")
        bias = f.get_tensor("projections.input_1.0.to_v.bias")
        var = f.get_tensor("stats.output_0.1.var")
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["format"] == "humanref.reference_bank" and meta["format_version"] == "1"
    assert (meta["family"], meta["timing"], meta["mask_rule"]) == ("SD15", "once at t=0", "area")
    assert json.loads(meta["references"]) == [
        {"label": "face", "slot": 0, "size": [64, 48], "masked": True},
        {"label": "upper body clothes", "slot": 1, "size": [32, 24], "masked": False}]
    assert json.loads(meta["blocks"]) == [["input_1.0", 8, [3, 0]], ["middle_0.0", 16, [4, 12]],
                                          ["output_3.1", 8, None]]
    assert json.loads(meta["projections"]) == ["input_1.0", "middle_0.0"]
    assert json.loads(meta["stats"]) == {"middle_0": [True, False], "output_0": [True, True]}
    assert tokens.dtype == torch.float16 and torch.equal(tokens, bank.features[("input", 1, 0)][0].tokens)
    assert tuple(empty.shape) == (0, 16) and empty.dtype == torch.bfloat16
    assert torch.equal(bias, bank.projections[("input", 1, 0)][1].bias)
    assert torch.equal(var, bank.stats[("output", 0)][1].var)
    assert "projections.input_1.0.to_k.bias" not in keys and "stats.middle_0.1.mean" not in keys
    assert "regions" in keys and not any(k.startswith("features.output_3.1") for k in keys)
    # the checksum, computed here from the definition: name|dtype|shape line, then the raw bytes, in name order
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype).split('.')[1]}|{list(t.shape)}\n".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert meta["content_sha256"] == h.hexdigest()


def test_saving_never_overwrites(tmp_path):
    taken = tmp_path / "bank_00001_.safetensors"
    taken.write_bytes(b"someone else's file")
    first = saved(tmp_path)
    second = saved(tmp_path)
    assert [os.path.basename(p) for p in (first, second)] == ["bank_00002_.safetensors", "bank_00003_.safetensors"]
    assert taken.read_bytes() == b"someone else's file"
    assert BF.save_reference_bank(make_bank(), str(tmp_path / "new" / "sub"), "x", counter=7).endswith(
        os.path.join("new", "sub", "x_00007_.safetensors"))


def test_an_every_step_bank_is_refused_and_nothing_is_written(tmp_path):
    bank = ReferenceBank((ReferenceInfo("face", 0, (64, 48), False),), dict(BLOCKS), Timing.EVERY_STEP, "area",
                         writer=object(), family="SD15")
    with pytest.raises(ValueError, match="timing 'every step'.*Encode the references with timing 'once at t=0'"):
        saved(tmp_path, bank)
    assert os.listdir(tmp_path) == []


def test_every_bank_field_is_saved_or_refused():
    """A field added to ReferenceBank must be added to the format (SAVED_FIELDS and the writer/reader)."""
    assert {f.name for f in dataclasses.fields(ReferenceBank)} == BF.SAVED_FIELDS


def test_an_unsaved_bank_field_with_a_value_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(BF, "SAVED_FIELDS", BF.SAVED_FIELDS - {"regions"})
    with pytest.raises(ValueError, match="reference_bank has 'regions', which the reference bank file format"):
        saved(tmp_path)
    bank = make_bank(with_extras=False)  # regions at its default: nothing is lost
    assert BF.load_reference_bank(saved(tmp_path, bank)).regions is None


# ------------------------------------------------------------------------------------------------- refusals
def rewrite(path: str, out: str, meta=None, drop=(), add=None, digest=True) -> str:
    """The file at ``path`` with metadata entries replaced, tensors dropped or added (checksum made to match)."""
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(add or {})
    metadata.update(meta or {})
    if digest:
        metadata["content_sha256"] = BF.content_digest(tensors)
    save_file(tensors, out, metadata={k: v for k, v in metadata.items() if v is not None})
    return out


def test_damaged_files_are_refused(tmp_path):
    path = saved(tmp_path)
    data = open(path, "rb").read()
    header = int.from_bytes(data[:8], "little")
    cases = {
        "truncated": data[:-100],
        "half": data[: len(data) // 2],
        "bad header length": (10 ** 12).to_bytes(8, "little") + data[8:],
        "bad header json": data[:8] + b"#" + data[9:],
        "empty": b"",
        "changed byte": data[:8 + header + 40] + bytes([data[8 + header + 40] ^ 0x10]) + data[8 + header + 41:],
    }
    for what, content in cases.items():
        bad = tmp_path / f"{what}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=rf"reference bank {what}.safetensors is damaged") as e:
            BF.load_reference_bank(str(bad))
        assert ("checksum" in str(e.value)) == (what == "changed byte"), what


def test_a_file_that_is_not_a_bank_is_refused(tmp_path):
    plain = str(tmp_path / "lora.safetensors")
    save_file({"lora_up.weight": torch.zeros(4, 4)}, plain)
    with pytest.raises(ValueError, match=r"lora.safetensors is not a HumanRef reference bank \(its metadata "
                                               r"'format' is None, a bank's is 'humanref.reference_bank'\)"):
        BF.load_reference_bank(plain)
    garment = rewrite(saved(tmp_path), str(tmp_path / "g.safetensors"), meta={"format": "humanref.garment_weights"})
    with pytest.raises(ValueError, match="'format' is 'humanref.garment_weights'"):
        BF.load_reference_bank(garment)
    pickle = tmp_path / "bank.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(ValueError, match=r"bank.pt: only .safetensors files are read"):
        BF.load_reference_bank(str(pickle))


@pytest.mark.parametrize("version", ["2", "0", None])
def test_an_unknown_format_version_is_refused(tmp_path, version):
    other = rewrite(saved(tmp_path), str(tmp_path / "v.safetensors"), meta={"format_version": version})
    with pytest.raises(ValueError, match=rf"v.safetensors has format version {version!r}; this HumanRef reads "
                                               r"version 1 \(a bank saved by a newer HumanRef"):
        BF.load_reference_bank(other)


@pytest.mark.parametrize("change, message", [
    (dict(drop=("features.middle_0.0.1",)), r"tensor 'features.middle_0.0.1' is missing"),
    (dict(add={"features.output_3.1.0": torch.zeros(2, 8)}), r"unexpected tensor 'features.output_3.1.0'"),
    (dict(add={"features.input_1.0.1": torch.zeros(7, 9)}), r"features.input_1.0.1 is torch.float32 \(7, 9\); "
                                                            r"expected floating \[tokens, 8\]"),
    (dict(drop=("projections.middle_0.0.to_v.weight",)), r"tensor 'projections.middle_0.0.to_v.weight' is missing"),
    (dict(add={"regions": torch.ones(3, 4, 4)}), r"regions has shape \(3, 4, 4\); expected \[2, height, width\]"),
    (dict(drop=("stats.middle_0.0.var",)), r"tensor 'stats.middle_0.0.var' is missing"),
    (dict(meta={"timing": "every step"}), r"timing is 'every step'; a saved bank is always 'once at t=0'"),
    (dict(meta={"mask_rule": "blur"}), r"mask_rule is 'blur'"),
    (dict(meta={"blocks": "[[\"input_1.0\", 8, [3]]]"}), r"block input_1.0: dropped must be 2 counts >= 0"),
    (dict(meta={"blocks": "[[\"in_1\", 8, null]]"}), r"'in_1' is not a transformer block like 'input_4.0'"),
    (dict(meta={"blocks": "not json"}), r"metadata 'blocks' is not valid JSON"),
    (dict(meta={"stats": None}), r"metadata has no 'stats'"),
    (dict(meta={"references": "[]"}), r"'references' must be a JSON list of 1 to 6 references"),
    (dict(meta={"references": json.dumps([{"slot": 0, "size": [8, 8], "masked": False}] * 2)}),
     r"reference 1 has no 'label', which every reference needs"),
    (dict(meta={"references": json.dumps([{"label": "a", "slot": 0, "size": "64x48", "masked": False}] * 2)}),
     r"reference 1: size is '64x48', expected tuple\[int, int\]"),
    (dict(meta={"references": json.dumps([{"label": "a", "slot": True, "size": [8, 8], "masked": False}] * 2)}),
     r"reference 1: slot is True, expected int"),
    (dict(meta={"references": json.dumps([{"label": "a", "slot": 0, "size": [8, 8], "masked": False,
                                           "colour": "red"}] * 2)}),
     r"reference 1 has 'colour', which this HumanRef does not know \(a bank saved by a newer HumanRef"),
])
def test_a_bank_file_with_missing_or_wrong_parts_is_refused(tmp_path, change, message):
    bad = rewrite(saved(tmp_path), str(tmp_path / "bad.safetensors"), **change)
    with pytest.raises(ValueError, match=r"reference bank bad.safetensors: " + message):
        BF.load_reference_bank(bad)


def test_reference_fields_are_read_from_the_dataclass(monkeypatch, tmp_path):
    """A field ReferenceInfo gains later (here a weight with a default) round-trips, and older files read it as the
    default: the fields are written and read generically."""

    @dataclasses.dataclass(frozen=True)
    class WithWeight:
        label: str
        slot: int
        size: tuple[int, int]
        masked: bool
        weight: float = 1.0
        note: str | None = None

    old = saved(tmp_path)
    monkeypatch.setattr(BF, "ReferenceInfo", WithWeight)
    assert [r.weight for r in BF.load_reference_bank(old).references] == [1.0, 1.0]
    bank = make_bank()
    new_refs = (WithWeight("face", 0, (64, 48), True, 0.25, "left"), WithWeight("shoes", 1, (8, 8), False, 2))
    bank = dataclasses.replace(bank, references=new_refs)
    loaded = BF.load_reference_bank(saved(tmp_path, bank, stem="new"))
    assert loaded.references == new_refs and isinstance(loaded.references[1].weight, float)
