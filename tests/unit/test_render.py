"""cli/render.py: the workflow picture shows every node of the shipped graph where the graph puts it."""
import json
from pathlib import Path

from humanref.cli.render import PAD, render_workflow

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "1-references-portrait-from-photos.json"


def test_render_places_every_node_and_colours_our_nodes():
    wf = json.loads(WORKFLOW.read_text())
    img = render_workflow(wf)
    x0 = min(n["pos"][0] for n in wf["nodes"]) - PAD
    y0 = min(n["pos"][1] for n in wf["nodes"]) - PAD
    assert img.width >= max(n["pos"][0] + n["size"][0] for n in wf["nodes"]) - x0
    background = img.getpixel((1, 1))
    for n in wf["nodes"]:
        # the title bar starts at the node's position: not background there
        px = img.getpixel((int(n["pos"][0] - x0 + 20), int(n["pos"][1] - y0 + 3)))
        assert px != background, n["type"]
        if n["type"].startswith("HumanRef_"):
            assert px == (30, 90, 95)
