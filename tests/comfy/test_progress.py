"""Progress during the work (issue 12, item 4): the Reference Encoder and the Garment Encoder move their bar
per reference, the loaders and MimicBrush Conditioning per stage, before the work is done (ComfyUI's progress
bar: the bar on the node, ``progress`` events for the runner)."""
from __future__ import annotations

import pytest
import torch
from helpers import reference_images

from humanref.nodes.anydressing import NO_WEIGHTS, GarmentLoRAExtractor
from humanref.nodes.references import ReferenceEncoder
from humanref.pipelines.hands.weights import load_hand_generator
from humanref.pipelines.mimicbrush import weights as mw
from humanref.pipelines.parts2whole.release import LOAD_STAGES, load_release
from humanref.pipelines.synthetic import mimicbrush as smb
from humanref.pipelines.synthetic.parts2whole import tiny_release_unet_config, write_release


@pytest.fixture()
def progress(monkeypatch):
    """Every progress-bar update as (value, total), in order."""
    import comfy.utils

    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total)))
    return seen


def steps(total: int) -> list[tuple[int, int]]:
    return [(i, total) for i in range(1, total + 1)]


def test_reference_encoder_moves_once_per_reference(tiny_model, clip_vae, progress):
    clip, vae = clip_vae
    sizes = [(64, 48), (48, 64), (32, 32)]  # three sizes: three writer groups
    slots = {}
    for i, size in enumerate(sizes, start=1):
        slots[f"image_{i}"] = reference_images(1, size, seed=i)[0]
        slots[f"label_{i}"] = "face"
    ReferenceEncoder.execute(writer=tiny_model, vae=vae, clip=clip, timing="once at t=0", mask_rule="parts2whole",
                             max_side=768, **slots)
    # encoding 1, 2, 3 (before: nothing until all were encoded, then 3 at once), then the writer per group
    assert progress == steps(6)


def test_garment_encoder_moves_once_per_garment_while_encoding(tiny_model, clip_vae, progress):
    _, vae = clip_vae
    a, b = reference_images(2, (32, 24))
    GarmentLoRAExtractor.execute(writer=tiny_model, vae=vae, garment_weights=NO_WEIGHTS, max_side=768,
                                 garment_1=a, slot_1="upper", garment_2=b, slot_2="lower")
    assert progress == [(1, 4), (2, 4), (4, 4)]  # one writer pass for both garments (one batch)


def test_parts2whole_release_loads_stage_by_stage(tmp_path, comfy_env, progress):
    write_release(str(tmp_path / "release"), tiny_release_unet_config(), seed=3)
    load_release(str(tmp_path / "release"))
    assert len(LOAD_STAGES) == 5 and progress == steps(5)


def test_mimicbrush_loads_stage_by_stage(tmp_path, comfy_env, progress):
    path = tmp_path / "mimicbrush.bin"
    torch.save(smb.mimicbrush_checkpoint(), str(path))
    mw.load_mimicbrush(str(path))
    assert progress == steps(len(mw.LOAD_STAGES)) and len(mw.LOAD_STAGES) == 5


def test_hand_generator_loads_stage_by_stage(tmp_path, comfy_env, progress):
    from humanref.pipelines.synthetic.hands import write_tiny_hand_generator

    path = tmp_path / "tiny-hands.safetensors"
    write_tiny_hand_generator(str(path))
    load_hand_generator(str(path))
    assert progress == steps(2)
