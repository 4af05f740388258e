"""Workflow 6 (adain+attn, a weight per reference, attention maps) on a real ComfyUI server: the UI file converts
to the shipped API file, and the API file runs on the tiny checkpoint, saving the portrait and one heatmap per
reference."""
import json

from e2e_support import INPUTS, SMALL, UI_WORKFLOWS, WORKFLOWS, humanref_cli
from PIL import Image, ImageChops

from humanref.cli.convert import ui_to_api

API = WORKFLOWS / "api" / "references_likeness.json"
UI = UI_WORKFLOWS["references_likeness"]


def test_ui_workflow_converts_to_the_api_workflow(object_info):
    conversion = ui_to_api(json.loads(UI.read_text()), object_info, strict=True)
    assert conversion.warnings == []
    assert conversion.prompt == json.loads(API.read_text())
    patch = conversion.prompt["9"]["inputs"]
    assert patch["mode"] == "adain+attn" and patch["reference_weights"].startswith("face=1.2")
    assert conversion.prompt["13"]["inputs"]["model"] == ["17", 0]  # the sampler uses the recording model


def test_api_workflow_saves_the_portrait_and_a_heatmap_per_reference(server_url, tmp_path):
    out = tmp_path / "out"
    proc = humanref_cli("run", str(API), "--server", server_url, *SMALL, "--inputs", str(INPUTS), "--out", str(out),
                        "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(line for line in proc.stdout.splitlines() if line.endswith(".png"))
    portraits = [p for p in pngs if "likeness" in p.rsplit("/", 1)[-1]]
    heatmaps = [p for p in pngs if "attention_maps" in p.rsplit("/", 1)[-1]]
    assert len(portraits) == 1 and len(heatmaps) == 3, proc.stdout
    images = []
    for path in portraits + heatmaps:
        image = Image.open(path)
        image.load()
        assert image.size == (128, 192)
        images.append(image.convert("RGB"))
    for i in range(1, 4):  # each heatmap differs from the portrait and from the others
        for j in range(i):
            assert ImageChops.difference(images[i], images[j]).getbbox() is not None, (i, j)
