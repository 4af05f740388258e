"""The MimicBrush workflows against a real ComfyUI server with the pack and the tiny synthetic mimicbrush.bin."""
import json

from e2e_support import INPUTS, TINY_CKPT, UI_WORKFLOWS, WORKFLOWS, humanref_cli
from PIL import Image

from humanref.pipelines.synthetic.mimicbrush import TINY_MIMICBRUSH

API = WORKFLOWS / "api" / "mimicbrush.json"
UI = UI_WORKFLOWS["mimicbrush"]
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", f"2.ckpt_name={TINY_MIMICBRUSH}",
         "--set", "7.resolution=256", "--set", "8.steps=2"]


def test_ui_workflow_converts_to_the_api_workflow(object_info):
    from humanref.cli.convert import ui_to_api

    with open(UI, encoding="utf-8") as f:
        ui = json.load(f)
    with open(API, encoding="utf-8") as f:
        api = json.load(f)
    assert ui_to_api(ui, object_info, strict=True).prompt == api
    for nid in ("HumanRef_MimicBrushLoader", "HumanRef_MimicBrushConditioning", "HumanRef_MimicBrushPaste"):
        assert nid in object_info


def test_api_workflow_edits_the_masked_region_only(server_url, tmp_path):
    out = tmp_path / "out"
    proc = humanref_cli("run", str(API), "--server", server_url, *SMALL, "--inputs", str(INPUTS), "--out", str(out),
                        "--timeout", "280", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pngs = [line for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert len(pngs) == 1, proc.stdout
    result = Image.open(pngs[0]).convert("RGB")
    source = Image.open(INPUTS / "mb_source.png").convert("RGB")
    mask = Image.open(INPUTS / "mb_mask.png").convert("L")
    assert result.size == source.size  # pasted back at the original size, not the 256 working square
    import numpy as np

    r, s, m = (np.asarray(x).astype(np.int32) for x in (result, source, mask))
    far = np.ones(m.shape, bool)  # pixels more than 16 px from the mask: the blurred alpha is 0 there
    ys, xs = np.nonzero(m > 127)
    far[max(ys.min() - 16, 0):ys.max() + 17, max(xs.min() - 16, 0):xs.max() + 17] = False
    assert np.abs(r[far] - s[far]).max() <= 1  # PNG round trip only
    assert np.abs(r[m > 127] - s[m > 127]).mean() > 5  # the masked region was redrawn
    prompt = json.loads(Image.open(pngs[0]).info["prompt"])
    assert prompt["7"]["class_type"] == "HumanRef_MimicBrushConditioning"
