"""The node list ComfyUI gets, in menu order: one method after another, loaders first."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .anydressing import GarmentLoRAExtractor
from .banks import LoadReferenceBank, SaveReferenceBank
from .hands import HandCanvas, HandGenerator, HandGeneratorLoader, SequentialMaskExpandOutpaint
from .mimicbrush import MimicBrushConditioning, MimicBrushLoader, MimicBrushPaste
from .parts2whole import Parts2WholeApply, Parts2WholeLoader
from .references import (
    MaskedSharedAttentionPatch,
    ReferenceAttentionMaps,
    ReferenceAttentionRecorder,
    ReferenceEncoder,
)

NODES: list[type[io.ComfyNode]] = [
    ReferenceEncoder,
    MaskedSharedAttentionPatch,
    ReferenceAttentionRecorder,
    ReferenceAttentionMaps,
    SaveReferenceBank,
    LoadReferenceBank,
    Parts2WholeLoader,
    Parts2WholeApply,
    MimicBrushLoader,
    MimicBrushConditioning,
    MimicBrushPaste,
    HandGeneratorLoader,
    HandGenerator,
    HandCanvas,
    SequentialMaskExpandOutpaint,
    GarmentLoRAExtractor,
]


class HumanRefExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
