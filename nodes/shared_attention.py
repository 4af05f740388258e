"""MaskedSharedAttentionPatch: MODEL + REFERENCE_BANK -> a clone whose self-attention also sees the references."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.blocks import BLOCK_SETS
from ..pipelines.references.patch import apply_reference_patch
from .types import ReferenceBankType

NODE_MODES = ("concat", "strict", "blend", "dual")


class MaskedSharedAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MaskedSharedAttentionPatch",
            display_name="Masked Shared Attention Patch (HumanRef)",
            category="HumanRef",
            description="Patches the model's self-attention so the target attends to the reference tokens of a "
                        "bank (masked-out tokens never enter attention). Chain several to combine banks.",
            inputs=[
                io.Model.Input("model"),
                ReferenceBankType.Input("reference_bank"),
                io.Combo.Input("mode", options=list(NODE_MODES), default="concat",
                               tooltip="concat: keys/values = [target, references] (Parts2Whole; masked-out "
                                       "tokens still dilute). strict: masked-out tokens excluded. blend: "
                                       "ratio * shared + (1 - ratio) * plain (MimicBrush). dual: plain + lambda * "
                                       "a separate attention over the references through W'_k, W'_v "
                                       "(AnyDressing's Dressing-Attention; a garment bank's trained W')."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="concat/strict: multiplies the attention mass of reference tokens (1 = "
                                       "official, 0 = off). blend: the ratio (0.5 = MimicBrush). dual: lambda "
                                       "(0.7 = AnyDressing)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("blocks", options=list(BLOCK_SETS), default="all",
                               tooltip="Which transformer blocks read the references: all (Parts2Whole), mid+up "
                                       "(MimicBrush), down-only, or custom."),
                io.String.Input("custom_blocks", default="",
                                tooltip="For blocks = custom: e.g. 'input_4, middle_0, output_9.0'."),
                io.Boolean.Input("uncond_sees_references", default=False,
                                 tooltip="Off (official): the negative/uncond pass runs plain attention."),
                io.Mask.Input("region_masks", optional=True,
                              tooltip="dual only: one target region per reference of the bank, in bank order "
                                      "(e.g. torso for the upper garment): target tokens outside a reference's "
                                      "region do not attend to it."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, reference_bank, mode, strength, start_percent, end_percent, blocks, custom_blocks,
                uncond_sees_references, region_masks=None) -> io.NodeOutput:
        patched = apply_reference_patch(model, reference_bank, mode, strength, start_percent, end_percent,
                                        blocks, custom_blocks, uncond_sees_references, regions=region_masks)
        return io.NodeOutput(patched)
NODES = [MaskedSharedAttentionPatch]
