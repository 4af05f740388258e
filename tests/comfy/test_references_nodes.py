"""nodes/: the V3 schemas and the errors a user sees for bad input."""
from __future__ import annotations

import pytest
import torch
from helpers import box_mask, ksample, reference_images

from humanref.nodes.extension import NODES, HumanRefExtension
from humanref.nodes.references import MaskedSharedAttentionPatch, ReferenceEncoder
from humanref.pipelines.notices import collect

PATCH_DEFAULTS = dict(mode="concat", strength=1.0, start_percent=0.0, end_percent=1.0, blocks="all",
                      custom_blocks="", uncond_sees_references=False)


def encode(model, clip_vae, timing="once at t=0", **slots):
    clip, vae = clip_vae
    return ReferenceEncoder.execute(writer=model, vae=vae, clip=clip, timing=timing, mask_rule="parts2whole",
                                    max_side=768, **slots).result[0]


def test_schemas_validate_and_are_registered():
    import asyncio

    listed = asyncio.run(HumanRefExtension().get_node_list())
    assert listed == NODES
    ids = set()
    for node in NODES:
        schema = node.define_schema()
        schema.validate()
        assert schema.node_id.startswith("HumanRef_") and schema.node_id not in ids
        ids.add(schema.node_id)
    assert {"HumanRef_ReferenceEncoder", "HumanRef_MaskedSharedAttentionPatch"} <= ids
    enc = ReferenceEncoder.define_schema()
    names = [i.id for i in enc.inputs]
    assert names[:6] == ["writer", "vae", "clip", "timing", "mask_rule", "max_side"]
    assert {f"image_{i}" for i in range(1, 7)} <= set(names) and {f"label_{i}" for i in range(1, 7)} <= set(names)


def test_encoder_and_patch_nodes_sample(tiny_model, clip_vae, conds):
    imgs = reference_images(3)
    bank = encode(tiny_model, clip_vae, image_1=imgs[0], mask_1=box_mask((64, 48), 0, 0, 30, 48), label_1="face",
                  image_2=torch.cat(imgs[1:]), label_2="upper body clothes\nlower body clothes")
    assert [r.label for r in bank.references] == ["face", "upper body clothes", "lower body clothes"]
    assert [r.slot for r in bank.references] == [0, 1, 1]
    patched = MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=bank, **PATCH_DEFAULTS).result[0]
    assert patched is not tiny_model
    latent = torch.zeros(1, 4, 6, 10)
    assert (ksample(patched, conds, latent) - ksample(tiny_model, conds, latent)).abs().max() > 1e-3


def test_mask_of_another_size_is_resized_with_a_warning(tiny_model, clip_vae):
    img = reference_images(1)[0]
    with collect() as warnings:
        bank = encode(tiny_model, clip_vae, image_1=img, mask_1=box_mask((32, 24), 0, 0, 16, 24), label_1="face")
    assert warnings and "mask_1 is 24x32 but image_1 is 48x64; the mask is stretched" in warnings[0]
    assert bank.references[0].masked


@pytest.mark.parametrize("slots, message", [
    (lambda imgs: dict(image_1=imgs[0], mask_1=torch.zeros(1, 64, 48), label_1="face"), r"mask_1 is empty"),
    (lambda imgs: dict(image_1=torch.cat(imgs[:7]), label_1="face"), r"at most 6"),
    (lambda imgs: dict(image_1=imgs[0], label_1="face", mask_2=torch.ones(1, 64, 48)),
     r"mask_2 is connected but image_2 is not"),
    (lambda imgs: dict(image_1=torch.cat(imgs[:2]), mask_1=torch.ones(3, 64, 48), label_1="face"),
     r"mask_1 has 3 masks but image_1 has 2 images"),
    (lambda imgs: dict(image_1=torch.cat(imgs[:2]), label_1="a\nb\nc"), r"label_1 has 3 lines"),
    (lambda imgs: dict(image_1=imgs[0][0], label_1="face"), r"image_1 must be an IMAGE"),
])
def test_encoder_bad_inputs_name_the_input(tiny_model, clip_vae, slots, message):
    imgs = reference_images(7)
    with pytest.raises(ValueError, match=message):
        encode(tiny_model, clip_vae, **slots(imgs))


def test_patch_node_refuses_a_bank_of_another_architecture(tiny_model, tiny_sdxl_model, clip_vae):
    bank = encode(tiny_model, clip_vae, image_1=reference_images(1)[0], label_1="face")
    with pytest.raises(ValueError, match=r"reference_bank was encoded with a writer of SD15 \(7 transformer blocks"
                                         r".* but model is SDXL \("):
        MaskedSharedAttentionPatch.execute(model=tiny_sdxl_model, reference_bank=bank, **PATCH_DEFAULTS)
