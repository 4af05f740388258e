"""Nothing fails silently (issue 12, item 3): what "succeeded" with a server-log line now either refuses with an
error naming the input, or warns where the user sees it (the node's UI output under ``humanref_warnings``, shown
on the node and in a toast, printed by the runner); and one RGBA rule for every node (README: RGBA images)."""
from __future__ import annotations

import pytest
import torch
from helpers import box_mask, reference_images

from humanref.nodes.anydressing import NO_WEIGHTS, GarmentLoRAExtractor
from humanref.nodes.hands import HandCanvas, SequentialMaskExpandOutpaint
from humanref.nodes.notices import UI_KEY
from humanref.nodes.references import MaskedSharedAttentionPatch, ReferenceEncoder
from humanref.pipelines.images import flatten_alpha

PATCH = dict(mode="concat", strength=1.0, start_percent=0.0, end_percent=1.0, blocks="all", custom_blocks="",
             uncond_sees_references=False)
ENCODER = dict(timing="once at t=0", mask_rule="parts2whole", max_side=768)


def encode(model, clip_vae, **slots):
    clip, vae = clip_vae
    return ReferenceEncoder.execute(writer=model, vae=vae, clip=clip, **ENCODER, **slots)


def same_bank(a, b) -> None:
    assert [(r.label, r.slot, r.masked) for r in a.references] == [(r.label, r.slot, r.masked) for r in b.references]
    assert a.features.keys() == b.features.keys()
    for key in a.features:
        for x, y in zip(a.features[key], b.features[key]):
            assert x.dropped == y.dropped and torch.allclose(x.tokens, y.tokens, atol=1e-5)


def cut_out(size=(64, 48), seed=3) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGBA cut-out: a person-like box opaque, the rest transparent, a soft edge."""
    rgb = reference_images(1, size, seed)[0]
    alpha = box_mask(size, 8, 6, 56, 40)
    alpha[:, 8:56, 6] = 0.5
    return torch.cat([rgb, alpha.unsqueeze(-1)], dim=-1), alpha


def test_rgba_reference_is_composited_over_white_and_its_alpha_is_the_mask(tiny_model, clip_vae):
    rgba, alpha = cut_out()
    rgb, _ = flatten_alpha(rgba)
    by_hand = rgba[..., :3] * alpha.unsqueeze(-1) + (1 - alpha.unsqueeze(-1))  # over white
    assert torch.allclose(rgb, by_hand)
    from_rgba = encode(tiny_model, clip_vae, image_1=rgba, label_1="face").result[0]
    explicit = encode(tiny_model, clip_vae, image_1=by_hand, mask_1=alpha, label_1="face").result[0]
    same_bank(from_rgba, explicit)
    assert from_rgba.references[0].masked  # before: the alpha was cut off and the whole reference used
    # a MASK given with the RGBA image wins over its alpha
    box = box_mask((64, 48), 0, 0, 32, 48)
    given = encode(tiny_model, clip_vae, image_1=rgba, mask_1=box, label_1="face").result[0]
    same_bank(given, encode(tiny_model, clip_vae, image_1=by_hand, mask_1=box, label_1="face").result[0])


def test_rgba_garment_follows_the_same_rule(tiny_model, clip_vae):
    rgba, alpha = cut_out((32, 24))
    _, vae = clip_vae
    run = dict(writer=tiny_model, vae=vae, garment_weights=NO_WEIGHTS, max_side=768, slot_1="upper")
    from_rgba = GarmentLoRAExtractor.execute(garment_1=rgba, **run).result[0]  # before: refused
    explicit = GarmentLoRAExtractor.execute(garment_1=flatten_alpha(rgba)[0], mask_1=alpha, **run).result[0]
    same_bank(from_rgba, explicit)


def test_a_node_warning_reaches_the_ui_output(tiny_model, clip_vae):
    image = reference_images(1, (64, 48))[0]
    out = encode(tiny_model, clip_vae, image_1=image, mask_1=torch.ones(1, 32, 24), label_1="face")
    assert out.ui == {UI_KEY: ["mask_1 is 24x32 but image_1 is 48x64; the mask is stretched to the image (give a "
                               "mask of the image's size to place it exactly)"]}
    assert encode(tiny_model, clip_vae, image_1=image, label_1="face").ui is None  # quiet when all is well


def test_custom_blocks_ignored_is_a_warning_and_an_empty_step_range_an_error(tiny_model, bank):
    out = MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=bank,
                                             **{**PATCH, "custom_blocks": "input_4, middle_0"})
    assert out.ui[UI_KEY] == ["custom_blocks ('input_4, middle_0') is ignored because blocks is 'all'; set blocks to "
                              "'custom' to use that list"]
    with pytest.raises(ValueError, match="start_percent and end_percent are both 0.4: the references would act on "
                                         "no step"):
        MaskedSharedAttentionPatch.execute(model=tiny_model, reference_bank=bank,
                                           **{**PATCH, "start_percent": 0.4, "end_percent": 0.4})


def example_hands():
    from test_hands_canvas import example_crops

    hands = example_crops()
    n = len(hands.crops)
    return torch.rand(n, 64, 64, 3), torch.full((n, 64, 64), 0.8), hands


def test_hand_canvas_threshold_that_keeps_nothing_is_an_error():
    images, masks, hands = example_hands()
    with pytest.raises(ValueError, match=r"mask_threshold 1 drops every hand pixel \(the hand masks reach at most "
                                         r"0.80\).*Lower mask_threshold"):
        HandCanvas.execute(images, masks, hands, background=0.5, mask_threshold=1.0)
    with pytest.raises(ValueError, match="hand_masks are empty"):
        HandCanvas.execute(images, torch.zeros_like(masks), hands, background=0.5, mask_threshold=0.0)
    canvas, keep, _ = HandCanvas.execute(images, masks, hands, background=0.5, mask_threshold=0.79).result
    assert float(keep.max()) == pytest.approx(0.8)


def test_outpaint_with_every_step_unmasked_is_an_error(tiny_model, clip_vae, conds):
    _, vae = clip_vae
    canvas, keep = torch.rand(1, 64, 64, 3), box_mask((64, 64), 16, 16, 48, 48)
    with pytest.raises(ValueError, match=r"unmasked_last_steps \(4\) must be less than steps \(4\)"):
        SequentialMaskExpandOutpaint.execute(tiny_model, conds[0], conds[1], vae, canvas, keep, seed=0, steps=4,
                                             cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                                             max_expansion=8, blending="sequential expansion", schedule="linear",
                                             unmasked_last_steps=4)


class RecordingServer:
    """Stands in for PromptServer.instance: records what would go to the frontend as a node's progress text."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text: str, node_id: str, sid=None) -> None:
        self.texts.append((node_id, text))


def test_warnings_show_on_the_running_node(monkeypatch, tiny_model, clip_vae):
    import sys
    import types

    from comfy_execution.utils import CurrentNodeContext

    from humanref.nodes.notices import install_fallback
    from humanref.pipelines import notices

    recorder = RecordingServer()
    # ComfyUI's server module is not importable in-process next to the tests: a stand-in with the same name
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=recorder)))
    monkeypatch.setattr(notices, "_fallback", None)
    install_fallback()
    image = reference_images(1, (64, 48))[0]
    with CurrentNodeContext("prompt-1", "8"):  # a HumanRef node: its warnings, joined, on it
        encode(tiny_model, clip_vae, image_1=image, mask_1=torch.ones(1, 32, 24), label_1="face")
    with CurrentNodeContext("prompt-1", "13"):  # a warning from a patch while KSampler runs: on KSampler
        notices.warn("the pose is stretched to the image")
    assert recorder.texts == [
        ("8", "\u26a0 mask_1 is 24x32 but image_1 is 48x64; the mask is stretched to the image (give a mask of the "
              "image's size to place it exactly)"),
        ("13", "\u26a0 the pose is stretched to the image"),
    ]
