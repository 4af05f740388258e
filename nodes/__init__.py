"""The pack's V3 nodes: thin schemas over pipelines/ and attention/.

Every module in this package that defines ``NODES`` (a list of node classes) contributes them; modules are
read in name order so the node list is stable. One module per method keeps the methods out of each other's
files.
"""
from __future__ import annotations

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def _collect() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", ()))
    return found


NODES: list[type[io.ComfyNode]] = _collect()


class HumanRefExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
