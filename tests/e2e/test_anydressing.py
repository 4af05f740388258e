"""The AnyDressing workflows against a real ComfyUI server: tiny checkpoint, tiny OpenPose-slot ControlNet, tiny
style LoRA and tiny garment weights (all written by ``python -m humanref tiny-models``)."""
import json
from pathlib import Path

from e2e_support import INPUTS, REPO, TINY_CKPT, UI_WORKFLOWS, humanref_cli, with_style_lora
from PIL import Image

API = REPO / "workflows" / "api" / "anydressing.json"
UI = UI_WORKFLOWS["anydressing"]
TINY_CONTROLNET = "humanref-tiny-controlnet-sd15.safetensors"
TINY_LORA = "humanref-tiny-style-lora-sd15.safetensors"
TINY_GARMENTS = "humanref-tiny-garments-sd15.safetensors"
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", f"12.control_net_name={TINY_CONTROLNET}",
         "--set", "14.width=128", "--set", "14.height=192", "--set", "15.steps=3"]


def pngs(stdout: str) -> list[Path]:
    return [Path(line) for line in stdout.splitlines() if line.endswith(".png")]


def test_api_workflow_with_garment_weights(server_url, tiny_models, tmp_path):
    """With the optional style LoRA switched on (bypassed in the UI graph, not in the API graph)."""
    assert (tiny_models / "garment_weights" / TINY_GARMENTS).is_file()
    out = tmp_path / "out"
    workflow = tmp_path / "anydressing_lora.json"
    workflow.write_text(json.dumps(with_style_lora(json.loads(API.read_text()), TINY_LORA)))
    proc = humanref_cli("run", str(workflow), "--server", server_url, *SMALL,
                        "--set", f"7.garment_weights={TINY_GARMENTS}", "--inputs", str(INPUTS), "--out", str(out),
                        "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = pngs(proc.stdout)
    assert len(saved) == 1 and saved[0].name.startswith("anydressing"), proc.stdout
    image = Image.open(saved[0])
    image.load()
    assert image.size == (128, 192)
    prompt = json.loads(image.info["prompt"])
    assert prompt["7"]["class_type"] == "HumanRef_GarmentLoRAExtractor"
    assert prompt["7"]["inputs"]["garment_weights"] == TINY_GARMENTS
    assert prompt["8"]["inputs"]["mode"] == "dual" and prompt["8"]["inputs"]["strength"] == 0.7
    assert {prompt[k]["class_type"] for k in prompt} >= {"ControlNetApplyAdvanced", "LoraLoaderModelOnly"}
    assert "HumanRef_GarmentLoRAExtractor" in proc.stderr and "3/3" in proc.stderr


def test_weights_file_for_another_slot_set_fails_with_the_slot(server_url, tmp_path):
    proc = humanref_cli("run", str(API), "--server", server_url, *SMALL, "--set", f"7.garment_weights={TINY_GARMENTS}",
                        "--set", "7.slot_2=shoes", "--inputs", str(INPUTS), "--out", str(tmp_path / "out"),
                        "--timeout", "120", cwd=tmp_path, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "node 7 (HumanRef_GarmentLoRAExtractor) failed" in proc.stderr
    assert "slot_2 is slot 'shoes'" in proc.stderr


def test_ui_workflow_training_free(server_url, tmp_path):
    out = tmp_path / "out"
    proc = humanref_cli("run", str(UI), "--server", server_url, *SMALL, "--inputs", str(INPUTS), "--out", str(out),
                        "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = pngs(proc.stdout)
    assert len(saved) == 1
    image = Image.open(saved[0])
    image.load()
    assert image.size == (128, 192)
    workflow = json.loads(image.info["workflow"])
    assert {n["type"] for n in workflow["nodes"]} >= {"HumanRef_GarmentLoRAExtractor",
                                                       "HumanRef_MaskedSharedAttentionPatch"}


def test_ui_workflow_converts_to_the_api_workflow(object_info):
    """The UI graph (style LoRA bypassed: its MODEL passes straight through) is the API graph, input for input."""
    from humanref.cli.convert import ui_to_api

    converted = ui_to_api(json.loads(UI.read_text()), object_info, strict=True).prompt
    assert converted == json.loads(API.read_text())
