"""ReferenceEncoder: run a writer UNet over one to six references and output a REFERENCE_BANK."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.bank import MAX_REFERENCES, TIMINGS
from ..attention.masks import MASK_RULES
from ..pipelines.references.inputs import prepare_references
from ..pipelines.references.patch import build_reference_bank
from .types import ReferenceBankType

SLOTS = MAX_REFERENCES
DEFAULT_LABELS = ("face", "upper body clothes", "lower body clothes", "hair or headwear", "shoes", "whole body clothes")


class ReferenceEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("writer", tooltip="UNet that reads the references. Training-free: the same checkpoint "
                                             "as the model you sample with."),
            io.Vae.Input("vae"),
            io.Clip.Input("clip", tooltip="Encodes each reference's label as the writer's text condition."),
            io.Combo.Input("timing", options=list(TIMINGS), default="every step",
                           tooltip="every step: the reference is noised to the current sigma at every step "
                                   "(reference-only; suits untrained writers). once at t=0: clean latents, one "
                                   "writer pass before sampling (trained writers such as Parts2Whole's)."),
            io.Combo.Input("mask_rule", options=list(MASK_RULES), default="parts2whole",
                           tooltip="How a mask becomes token weights on each block: parts2whole = nearest + "
                                   "3x3 dilation (official), area = mean coverage."),
            io.Int.Input("max_side", default=768, min=0, max=4096, step=8,
                         tooltip="Long side of a reference for the writer (aspect kept, multiples of 8); 0 keeps "
                                 "the size."),
        ]
        for i in range(1, SLOTS + 1):
            inputs += [
                io.Image.Input(f"image_{i}", optional=i > 1,
                               tooltip="A reference image, or a batch: every image is one reference."),
                io.Mask.Input(f"mask_{i}", optional=True,
                              tooltip="The part of the reference to use (1 = use). Resized to the image if needed."),
                io.String.Input(f"label_{i}", default=DEFAULT_LABELS[i - 1],
                                tooltip="Short text for the writer, e.g. 'face'. One line per image of a batch, "
                                        "or one line for all."),
            ]
        return io.Schema(
            node_id="HumanRef_ReferenceEncoder",
            display_name="Reference Encoder (HumanRef)",
            category="HumanRef",
            description="Encodes one to six reference images (each with an optional mask and a label) with a "
                        "writer UNet into a reference bank for MaskedSharedAttentionPatch.",
            inputs=inputs,
            outputs=[ReferenceBankType.Output(display_name="reference_bank")],
        )

    @classmethod
    def execute(cls, writer, vae, clip, timing, mask_rule, max_side, **slots) -> io.NodeOutput:
        given = []
        for i in range(1, SLOTS + 1):
            image = slots.get(f"image_{i}")
            if image is None:
                if slots.get(f"mask_{i}") is not None:
                    raise ValueError(f"mask_{i} is connected but image_{i} is not")
                continue
            given.append((i, image, slots.get(f"mask_{i}"), slots.get(f"label_{i}", "")))
        refs = prepare_references(given, max_side, MAX_REFERENCES)
        bank = build_reference_bank(writer, vae, clip, refs, timing, mask_rule)
        return io.NodeOutput(bank)
NODES = [ReferenceEncoder]
