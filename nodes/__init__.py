"""The pack's V3 nodes: thin schemas over pipelines/ and attention/."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .reference_encoder import ReferenceEncoder
from .shared_attention import MaskedSharedAttentionPatch

NODES: list[type[io.ComfyNode]] = [ReferenceEncoder, MaskedSharedAttentionPatch]


class HumanRefExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
