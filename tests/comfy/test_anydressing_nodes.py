"""nodes/anydressing.py and the dual mode of MaskedSharedAttentionPatch: schemas, a weights file from the model
folder, garment regions, and the errors a user sees."""
from __future__ import annotations

import pytest
import torch
from helpers import ksample

from humanref.nodes.anydressing import NO_WEIGHTS, GarmentLoRAExtractor
from humanref.nodes.extension import NODES
from humanref.nodes.references import MaskedSharedAttentionPatch
from humanref.pipelines.anydressing.weights import block_widths_from_unet, random_garment_weights, save_garment_weights

LATENT = torch.zeros(1, 4, 8, 6)
DUAL = dict(mode="dual", strength=0.7, start_percent=0.0, end_percent=1.0, blocks="all", custom_blocks="",
            uncond_sees_references=False)


@pytest.fixture()
def weights_folder(tmp_path, monkeypatch, tiny_model):
    """A models/garment_weights folder holding one synthetic file for the tiny model (and one for SDXL)."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "garment_weights", ([str(tmp_path)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    widths = block_widths_from_unet(tiny_model.model.diffusion_model.state_dict())
    lora, dressing = random_garment_weights(widths, ["upper", "lower"], rank=4, seed=9)
    save_garment_weights(str(tmp_path / "tiny-garments.safetensors"), "SD15", ["upper", "lower"], 4, lora, dressing)
    save_garment_weights(str(tmp_path / "sdxl-garments.safetensors"), "SDXL", ["upper", "lower"], 4, lora, dressing)
    return tmp_path


def images(count, size=(32, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, *size, 3, generator=g) for _ in range(count)]


def extract(model, clip_vae, weights=NO_WEIGHTS, **slots):
    return GarmentLoRAExtractor.execute(writer=model, vae=clip_vae[1], garment_weights=weights, max_side=768,
                                        **slots).result[0]


def test_schema_and_registration(weights_folder):
    assert GarmentLoRAExtractor in NODES
    schema = GarmentLoRAExtractor.define_schema()
    schema.validate()
    assert schema.node_id == "HumanRef_GarmentLoRAExtractor"
    names = [i.id for i in schema.inputs]
    assert names[:4] == ["writer", "vae", "garment_weights", "max_side"]
    assert {f"{p}_{i}" for p in ("garment", "mask", "slot", "region") for i in range(1, 7)} <= set(names)
    combo = next(i for i in schema.inputs if i.id == "garment_weights")
    assert combo.options[0] == NO_WEIGHTS and "tiny-garments.safetensors" in combo.options
    patch = MaskedSharedAttentionPatch.define_schema()
    assert "dual" in next(i for i in patch.inputs if i.id == "mode").options
    assert any(i.id == "region_masks" and i.optional for i in patch.inputs)


def test_extractor_with_weights_file_and_dual_patch_sample(tiny_model, clip_vae, conds, weights_folder):
    a, b = images(2)
    bank = extract(tiny_model, clip_vae, "tiny-garments.safetensors", garment_1=a, slot_1="lower", garment_3=b,
                   slot_3="upper")
    assert [(r.label, r.slot) for r in bank.references] == [("lower", 1), ("upper", 0)]
    assert bank.projections is not None and bank.regions is None
    patched = MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=bank, **DUAL).result[0]
    plain = ksample(tiny_model, conds, LATENT)
    out = ksample(patched, conds, LATENT)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_regions_given_to_the_extractor_equal_region_masks_on_the_patch(tiny_model, clip_vae, conds):
    a, b = images(2, seed=1)
    top, bottom = torch.zeros(1, 64, 48), torch.zeros(1, 32, 24)
    top[:, :32] = 1.0
    bottom[:, 16:] = 1.0  # another size: regions are scale-free
    with_regions = extract(tiny_model, clip_vae, garment_1=a, slot_1="upper", region_1=top, garment_2=b,
                           slot_2="lower", region_2=bottom)
    assert with_regions.regions.shape == (2, 64, 48)
    plain_bank = extract(tiny_model, clip_vae, garment_1=a, slot_1="upper", garment_2=b, slot_2="lower")
    masks = torch.cat([top, torch.nn.functional.interpolate(bottom[None], size=(64, 48), mode="bilinear")[0]])
    x = ksample(MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=with_regions, **DUAL).result[0],
                conds, LATENT)
    y = ksample(MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=plain_bank, region_masks=masks,
                                                   **DUAL).result[0], conds, LATENT)
    z = ksample(MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=plain_bank, **DUAL).result[0],
                conds, LATENT)
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert (x - z).abs().max() > 1e-4  # the regions change the result


@pytest.mark.parametrize("weights, slots, message", [
    ("sdxl-garments.safetensors", dict(garment_1="A", slot_1="upper"),
     r"garment_weights sdxl-garments.safetensors is for base model SDXL, but writer is SD15"),
    ("tiny-garments.safetensors", dict(garment_1="A", slot_1="hat"),
     r"slot_1 is slot 'hat', which garment_weights tiny-garments.safetensors has no LoRA for"),
    (NO_WEIGHTS, dict(garment_1="A", slot_1="upper", region_2="M"), r"region_2 is connected but garment_2 is not"),
    (NO_WEIGHTS, dict(garment_1="A", slot_1="upper", garment_2="B", slot_2="upper"),
     r"slot_2 is 'upper', the same as slot_1"),
    (NO_WEIGHTS, dict(garment_1="CLEAR", slot_1="upper"), r"garment_1 alpha is empty \(all zero\)"),
    (NO_WEIGHTS, dict(garment_1="A", slot_1="upper", garment_2="BIG", slot_2="lower"),
     r"garment_2 is 32x40 but garment_1 is 24x32"),
    (NO_WEIGHTS, dict(slot_1="upper"), r"no garments: connect garment_1"),
])
def test_bad_inputs_name_the_input(tiny_model, clip_vae, weights_folder, weights, slots, message):
    a, b = images(2)
    values = {"A": a, "B": b, "CLEAR": torch.cat([a, torch.zeros(1, 32, 24, 1)], -1), "BIG": torch.rand(1, 40, 32, 3),
              "M": torch.ones(1, 8, 8)}
    given = {k: values.get(v, v) if not k.startswith("slot") else v for k, v in slots.items()}
    with pytest.raises(ValueError, match=message):
        extract(tiny_model, clip_vae, weights, **given)


def test_corrupted_weights_file_in_the_folder_fails_clearly(tiny_model, clip_vae, weights_folder):
    (weights_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"garment_weights broken.safetensors cannot be read as safetensors"):
        extract(tiny_model, clip_vae, "broken.safetensors", garment_1=images(1)[0], slot_1="upper")
