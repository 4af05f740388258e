"""nodes/banks.py: Save Reference Bank writes only inside the output folder and never overwrites; Load Reference Bank
lists models/reference_banks/ and output/HumanRef/reference_banks/; a loaded bank samples bit for bit as the bank
it was saved from (reference bank in concat and adain+attn, a garment bank with trained projections and regions in
dual); a bank of another architecture, a damaged file and an 'every step' bank are refused with clear messages."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from helpers import LATENT, ksample

from humanref.attention.bank import Timing
from humanref.nodes.banks import DEFAULT_PREFIX, LoadReferenceBank, SaveReferenceBank
from humanref.nodes.model_files import REFERENCE_BANKS, list_files, register_model_folders
from humanref.nodes.model_files import SAVED_BANKS_UI_KEY as UI_KEY
from humanref.pipelines.anydressing.pipeline import build_garment_bank, prepare_garments
from humanref.pipelines.anydressing.weights import (
    block_widths_from_unet,
    garment_weights_metadata,
    garment_weights_state_dict,
    parse_garment_weights,
    random_garment_weights,
)
from humanref.pipelines.references.patch import apply_reference_patch


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A fresh output folder and models/reference_banks/ for ComfyUI's folder_paths."""
    import folder_paths

    output, models = tmp_path / "output", tmp_path / "models" / "reference_banks"
    output.mkdir()
    models.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, REFERENCE_BANKS, ([str(models)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return output, models


def save(bank, prefix=DEFAULT_PREFIX):
    return SaveReferenceBank.execute(reference_bank=bank, filename_prefix=prefix)


def load(name):
    return LoadReferenceBank.execute(reference_bank_name=name).result[0]


def garments(slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    return prepare_garments([(i + 1, torch.rand(1, 32, 24, 3, generator=g), None, s) for i, s in enumerate(slots)],
                            768)


def garment_weights(model, slots):
    """Random garment weights for the model's blocks, in the file format (LoRAs per slot, W'_k, W'_v)."""
    widths = block_widths_from_unet(model.model.diffusion_model.state_dict())
    lora, dressing = random_garment_weights(widths, slots, rank=4, seed=5)
    return parse_garment_weights(garment_weights_state_dict(lora, dressing),
                                 garment_weights_metadata("SD15", slots, 4), "test.safetensors")


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_schemas():
    save_schema, load_schema = SaveReferenceBank.define_schema(), LoadReferenceBank.define_schema()
    for schema in (save_schema, load_schema):
        schema.validate()
        assert schema.category == "HumanRef/References"
    assert save_schema.is_output_node and not load_schema.is_output_node
    assert [i.id for i in save_schema.inputs] == ["reference_bank", "filename_prefix"]
    assert [i.id for i in load_schema.inputs] == ["reference_bank_name"]


def test_saved_bank_loads_and_samples_bit_identically(folders, tiny_model, bank, conds):
    output, _ = folders
    out = save(bank)
    assert out.result[0] is bank  # passes through
    assert out.ui[UI_KEY] == [{"filename": "bank_00001_.safetensors", "subfolder": "HumanRef/reference_banks",
                               "type": "output"}]
    assert save(bank).ui[UI_KEY][0]["filename"] == "bank_00002_.safetensors"  # a second save, a new file
    assert files_under(output) == [os.path.join("HumanRef", "reference_banks", f"bank_0000{i}_.safetensors")
                                   for i in (1, 2)]
    options = LoadReferenceBank.define_schema().inputs[0].options
    assert options == ["bank_00001_.safetensors", "bank_00002_.safetensors"]
    loaded = load("bank_00001_.safetensors")
    assert loaded is not bank and loaded.family == bank.family == "SD15" and loaded.cached
    assert dict(loaded.block_channels) == dict(bank.block_channels)
    plain = ksample(tiny_model, conds, LATENT)
    for mode in ("concat", "adain+attn"):
        original = ksample(apply_reference_patch(tiny_model, bank, mode=mode), conds, LATENT)
        again = ksample(apply_reference_patch(tiny_model, loaded, mode=mode), conds, LATENT)
        assert torch.equal(original, again), mode
        assert (original - plain).abs().max() > 1e-3, mode  # the bank acts, so equality means something


def test_a_garment_bank_keeps_projections_and_regions(folders, tiny_model, tiny_sdxl_model, clip_vae, conds):
    """Dual mode with trained W'_k, W'_v and per-garment regions from a loaded bank, bit for bit; and the same kind
    of bank saved from an SDXL writer is refused on the SD15 model by the patch's own architecture check."""
    regions = torch.zeros(2, 16, 12)
    regions[0, :8], regions[1, 6:] = 1.0, 1.0
    slots = ["upper", "lower"]
    bank = build_garment_bank(tiny_model, clip_vae[1], garments(slots), garment_weights(tiny_model, slots), regions)
    assert bank.projections is not None
    save(bank, "HumanRef/reference_banks/garments")
    loaded = load("garments_00001_.safetensors")
    assert torch.equal(loaded.regions, regions) and [r.label for r in loaded.references] == slots
    original = ksample(apply_reference_patch(tiny_model, bank, mode="dual", strength=0.7), conds, LATENT)
    again = ksample(apply_reference_patch(tiny_model, loaded, mode="dual", strength=0.7), conds, LATENT)
    assert torch.equal(original, again)

    sdxl_bank = build_garment_bank(tiny_sdxl_model, clip_vae[1], garments(slots, seed=6))
    save(sdxl_bank, "HumanRef/reference_banks/sdxl")
    with pytest.raises(ValueError, match=r"reference_bank was encoded with a writer of SDXL \(.*\), but model is "
                                         r"SD15 .*Encode the references with a writer of the same architecture"):
        apply_reference_patch(tiny_model, load("sdxl_00001_.safetensors"), mode="dual")


def test_an_every_step_bank_is_refused_and_nothing_written(folders, bank):
    step_bank = dataclasses.replace(bank, timing=Timing.EVERY_STEP, features=None, stats=None, writer=object())
    with pytest.raises(ValueError, match="timing 'every step'.*Encode the references with timing 'once at t=0' to "
                                         "save the bank"):
        save(step_bank)
    assert files_under(folders[0]) == []


@pytest.mark.parametrize("prefix", ["", "  ", "../outside/bank", "/tmp/bank", "HumanRef/../../bank", "HumanRef/"])
def test_saving_outside_the_output_folder_is_refused(folders, bank, prefix):
    with pytest.raises(ValueError, match="filename_prefix must be a file name inside ComfyUI's output folder"):
        save(bank, prefix)
    assert files_under(folders[0].parent) == []


def test_another_prefix_saves_elsewhere_in_the_output_folder(folders, bank):
    out = save(bank, "my banks/alice")
    assert out.ui[UI_KEY][0] == {"filename": "alice_00001_.safetensors", "subfolder": "my banks", "type": "output"}
    assert os.path.isfile(folders[0] / "my banks" / "alice_00001_.safetensors")
    assert list_files(REFERENCE_BANKS) == []  # not listed: outside output/HumanRef/reference_banks/


def test_the_folder_lists_banks_of_models_and_output_and_models_win(folders, bank):
    import folder_paths

    output, models = folders
    register_model_folders()
    banks = output / "HumanRef" / "reference_banks"
    assert folder_paths.get_folder_paths(REFERENCE_BANKS) == [str(models), str(banks)]
    save(bank)
    (banks / "preview.png").write_bytes(b"png")
    (models / "sub").mkdir()
    (models / "notes.txt").write_text("not a bank")
    (models / "sub" / "bank_00001_.safetensors").write_bytes(b"damaged")
    (models / "bank_00001_.safetensors").write_bytes(b"damaged")  # same name as the saved one: models/ wins
    assert list_files(REFERENCE_BANKS) == ["bank_00001_.safetensors", "sub/bank_00001_.safetensors"]
    for name in ("bank_00001_.safetensors", "sub/bank_00001_.safetensors"):
        with pytest.raises(ValueError, match=r"reference bank bank_00001_.safetensors is damaged or not a "
                                             r"safetensors file .*save the bank again or copy the file again"):
            load(name)
    with pytest.raises(ValueError, match=r"reference_bank_name 'gone.safetensors' not found in .*: put a reference "
                                         r"bank saved by Save Reference Bank .* at models/reference_banks/gone"):
        load("gone.safetensors")
