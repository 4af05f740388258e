"""Loading the pack the way ComfyUI does (import, then comfy_entrypoint and the node list) opens no socket and
writes no file; ComfyUI's own modules are imported first, as the server has them before custom nodes."""
from __future__ import annotations

from comfyenv import COMFYUI_PATH
from importprobe import probe_import

SETUP = (f"sys.path.insert(0, {COMFYUI_PATH!r}); from comfy.cli_args import args; args.cpu = True")
COMFY_FIRST = ["folder_paths", "comfy.model_management", "comfy.sd", "comfy.samplers", "comfy_api.latest", "nodes"]
ENTRY = ("import asyncio, humanref; ext = asyncio.run(humanref.comfy_entrypoint()); "
         "nodes_ = asyncio.run(ext.get_node_list()); [n.define_schema() for n in nodes_]; "
         "assert len(nodes_) >= 2")


def test_loading_the_pack_in_comfyui_has_no_side_effects():
    events = probe_import(["humanref", "humanref.nodes"], preload=COMFY_FIRST, setup=SETUP, after=ENTRY)
    assert events == [], events
