"""The Parts2Whole API workflow on a real ComfyUI server, with a synthetic release in the release layout
(models/parts2whole/humanref-tiny-parts2whole/, written by ``python -m humanref tiny-models``)."""
import json
from pathlib import Path

from e2e_support import INPUTS, TINY_CKPT, UI_WORKFLOWS, WORKFLOWS, humanref_cli
from PIL import Image

API = WORKFLOWS / "api" / "parts2whole.json"
UI = UI_WORKFLOWS["parts2whole"]
TINY_RELEASE = "humanref-tiny-parts2whole"
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", f"2.release={TINY_RELEASE}", "--set", "12.width=64",
         "--set", "12.height=96", "--set", "13.steps=3"]


def _pngs(stdout: str) -> list[Path]:
    return [Path(line) for line in stdout.splitlines() if line.endswith(".png")]


def test_release_folder_written_in_the_release_layout(tiny_models):
    root = tiny_models / "parts2whole" / TINY_RELEASE
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "reference_unet/config.json",
                "reference_unet/diffusion_pytorch_model.safetensors", "pose_guider/config.json",
                "pose_guider/diffusion_pytorch_model.safetensors", "image_encoder/config.json",
                "image_encoder/model.safetensors", "feature_extractor/preprocessor_config.json",
                "scheduler/scheduler_config.json", "decoupled_attn.pth"):
        assert (root / rel).is_file(), rel
    with open(root / "decoupled_attn.pth", "rb") as f:  # safetensors content despite the name
        header = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header))


def test_loader_lists_the_release(object_info):
    options = object_info["HumanRef_Parts2WholeLoader"]["input"]["required"]["release"]
    values = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert TINY_RELEASE in values


def test_api_workflow_runs(server_url, tmp_path):
    out = tmp_path / "out"
    proc = humanref_cli("run", str(API), "--server", server_url, *SMALL, "--inputs", str(INPUTS),
                        "--out", str(out), "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pngs = _pngs(proc.stdout)
    assert len(pngs) == 1 and pngs[0].name.startswith("parts2whole")
    image = Image.open(pngs[0])
    image.load()
    assert image.size == (64, 96)
    prompt = json.loads(image.info["prompt"])
    assert prompt["12"]["class_type"] == "HumanRef_Parts2Whole"
    assert prompt["13"]["inputs"]["sampler_name"] == "ddim" and prompt["13"]["inputs"]["scheduler"] == "ddim_uniform"


def test_ui_workflow_matches_the_api_workflow(object_info):
    """Every node of the UI graph exists on the server and its widget values line up with the API graph."""
    ui = json.loads(UI.read_text())
    api = json.loads(API.read_text())
    for node in ui["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        assert node["type"] in object_info, node["type"]
        assert api[str(node["id"])]["class_type"] == node["type"]


def test_not_a_release_fails_with_the_folder_named(server_url, tmp_path):
    proc = humanref_cli("run", str(API), "--server", server_url, *SMALL, "--set", "2.release=nothing-here",
                        "--inputs", str(INPUTS), "--out", str(tmp_path / "out"), "--timeout", "60", cwd=tmp_path,
                        timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "nothing-here" in proc.stderr


def test_ui_workflow_converted_and_queued(server_url, tmp_path):
    """The UI graph (widget values by position) converts through /object_info and runs."""
    out = tmp_path / "out"
    proc = humanref_cli("run", str(UI), "--server", server_url, *SMALL, "--set", "13.seed=3", "--inputs", str(INPUTS),
                        "--out", str(out), "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    pngs = _pngs(proc.stdout)
    assert len(pngs) == 1
    prompt = json.loads(Image.open(pngs[0]).info["prompt"])
    inputs = prompt["12"]["inputs"]
    assert inputs["mode"] == "as trained" and inputs["label_5"] == "face" and inputs["width"] == 64
    assert prompt["13"]["inputs"]["seed"] == 3 and prompt["13"]["inputs"]["cfg"] == 3.5
