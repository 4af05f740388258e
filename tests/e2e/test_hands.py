"""The hands workflows end to end on a ComfyUI server: training-free and trained hand generators."""
import json
from pathlib import Path

from e2e_support import REPO, TINY_CKPT, UI_WORKFLOWS, humanref_cli
from PIL import Image

API = REPO / "workflows" / "api" / "hands.json"
UI = UI_WORKFLOWS["hands"]
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", "4.control_net_name=humanref-tiny-controlnet-sd15.safetensors",
         "--set", "5.resolution=64", "--set", "5.steps=2", "--set", "5.width=128", "--set", "5.height=192",
         "--set", "9.steps=3"]


def pngs(proc):
    return sorted(Path(line) for line in proc.stdout.splitlines() if line.endswith(".png"))


def run(workflow: Path, server_url: str, tmp_path: Path, *extra: str):
    proc = humanref_cli("run", str(workflow), "--server", server_url, *SMALL, *extra, "--out", str(tmp_path / "out"),
                        "--timeout", "280", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc


def check_outputs(proc):
    files = pngs(proc)
    sizes = sorted(Image.open(p).size for p in files)
    # two hand crops (the example pose's hands are apart) and the outpainted body at the requested canvas size
    assert sizes == [(64, 64), (64, 64), (128, 192)], (files, proc.stdout)
    assert any(p.name.startswith("hands_body_0") for p in files)


def test_api_workflow_training_free(server_url, tmp_path):
    proc = run(API, server_url, tmp_path)
    check_outputs(proc)
    assert "HumanRef_SequentialMaskExpandOutpaint" in proc.stderr and "3/3" in proc.stderr


def test_api_workflow_trained_hand_generator(server_url, tmp_path):
    workflow = json.loads(API.read_text())
    workflow["12"] = {"class_type": "HumanRef_HandGeneratorLoader",
                      "inputs": {"hand_generator_name": "humanref-tiny-hand-generator.safetensors"}}
    workflow["5"]["inputs"]["hand_generator"] = ["12", 0]
    path = tmp_path / "hands_trained.json"
    path.write_text(json.dumps(workflow))
    check_outputs(run(path, server_url, tmp_path))


def test_ui_workflow_converts_to_the_api_workflow(object_info):
    """The UI graph (trained-generator alternative muted) is the API graph, input for input."""
    from humanref.cli.convert import ui_to_api

    converted = ui_to_api(json.loads(UI.read_text()), object_info, strict=True).prompt
    api = json.loads(API.read_text())
    assert set(converted) == set(api)
    for nid, node in api.items():
        assert converted[nid]["class_type"] == node["class_type"]
        assert converted[nid]["inputs"] == node["inputs"], nid


def shifted_hands_workflow(tmp_path: Path, dx: float) -> Path:
    """The API workflow with ``dx`` (fractions of the width) added to every x of the left hand (issue 12's repro)."""
    workflow = json.loads(API.read_text())
    pose = json.loads(workflow["5"]["inputs"]["pose_json"])
    person = pose[0]["people"][0]
    pts = person["hand_left_keypoints_2d"]
    person["hand_left_keypoints_2d"] = [v + dx if i % 3 == 0 else v for i, v in enumerate(pts)]
    workflow["5"]["inputs"]["pose_json"] = json.dumps(pose)
    path = tmp_path / f"hands_shifted_{dx}.json"
    path.write_text(json.dumps(workflow))
    return path


def test_a_hand_partly_beyond_the_left_border_is_generated(server_url, tmp_path):
    proc = run(shifted_hands_workflow(tmp_path, -0.62), server_url, tmp_path)
    check_outputs(proc)  # both hands: before, the left one was dropped ("only 3 confident keypoints")
    assert "warning:" not in proc.stderr


def test_a_hand_entirely_outside_is_left_out_and_the_runner_says_so(server_url, tmp_path):
    proc = run(shifted_hands_workflow(tmp_path, -0.95), server_url, tmp_path)
    sizes = sorted(Image.open(p).size for p in pngs(proc))
    assert sizes == [(64, 64), (128, 192)], proc.stdout  # one hand crop, and the body
    assert ("warning: node 5 (HumanRef_HandGenerator): frame 0 person 0: the left hand lies entirely outside the "
            "128x192 image") in proc.stderr, proc.stderr
