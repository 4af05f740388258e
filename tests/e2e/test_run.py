"""`python -m humanref run` against a real ComfyUI server with the pack installed and a tiny checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e_support import (
    API_WORKFLOW,
    INPUTS,
    REPO,
    SMALL,
    UI_NAMES,
    UI_WORKFLOW,
    comfyui_path,
    humanref_cli,
    reachable,
    running_server,
)
from PIL import Image


def saved_pngs(proc: subprocess.CompletedProcess) -> list[Path]:
    return [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]


def check_png(path: Path, size: tuple[int, int]) -> Image.Image:
    assert path.is_file(), path
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    assert image.size == size
    return image


def test_template_browser_lists_the_ui_workflows(client):
    """ComfyUI's template browser finds every workflows/*.json of the installed pack (not workflows/api/): one per
    method, named N-method-... (the card's title and its place in the alphabetical order); a method's second
    workflow is keyed METHOD_VARIANT (its API file: workflows/api/METHOD_VARIANT.json)."""
    templates = client.get_json("/workflow_templates")
    expected = sorted(p.stem for p in UI_WORKFLOW.parent.glob("*.json"))
    assert expected == sorted(UI_NAMES.values())
    for number, (key, name) in enumerate(UI_NAMES.items(), 1):
        method, _, variant = key.partition("_")
        assert name.startswith(f"{number}-{method}-{variant}"), name
        assert (UI_WORKFLOW.parent / "api" / f"{key}.json").is_file(), key
    assert sorted(templates.get("humanref", [])) == expected
    for name in expected:
        served = client.get_json(f"/api/workflow_templates/humanref/{name}.json")
        with open(UI_WORKFLOW.parent / f"{name}.json", encoding="utf-8") as f:
            assert served == json.load(f), name


def test_api_workflow_over_http(server_url, tmp_path):
    """(a) the API workflow, the reference images uploaded through --set, returns a PNG of the requested size."""
    out = tmp_path / "out"
    uploads = []
    for nid, name in (("2", "face"), ("3", "face_mask"), ("4", "upper"), ("5", "upper_mask"), ("6", "lower"),
                      ("7", "lower_mask")):
        uploads += ["--set", f"{nid}.image={INPUTS / (name + '.png')}"]
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, *SMALL, *uploads, "--out", str(out),
                        "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pngs = saved_pngs(proc)
    assert len(pngs) == 1 and pngs[0].parent.parent == out, proc.stdout
    assert pngs[0].name.startswith("references") and pngs[0].parent.name == "HumanRef"
    image = check_png(pngs[0], (128, 192))
    prompt = json.loads(image.info["prompt"])  # SaveImage metadata: the prompt that ran
    assert prompt["8"]["class_type"] == "HumanRef_ReferenceEncoder"
    assert prompt["13"]["inputs"]["steps"] == 3
    assert "uploaded" in proc.stderr and "HumanRef_ReferenceEncoder" in proc.stderr  # progress lines
    assert "3/3" in proc.stderr


def test_rejected_prompt_prints_node_errors(server_url, tmp_path):
    """(c) a missing checkpoint name: HTTP 400 from /prompt, exit 1 with the node's validation error."""
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, *SMALL,
                        "--set", "1.ckpt_name=no-such-checkpoint.safetensors", "--inputs", str(INPUTS),
                        "--out", str(tmp_path / "out"), "--timeout", "60", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "prompt rejected" in proc.stderr
    assert "node 1 (CheckpointLoaderSimple)" in proc.stderr
    assert "no-such-checkpoint.safetensors" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_failing_node_prints_the_exception(server_url, tmp_path, client):
    """(c) an empty mask: the ReferenceEncoder raises; exit 1 with node id, type and message; server lives on."""
    empty = tmp_path / "empty_mask.png"
    Image.new("L", (128, 128), 0).save(empty)
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, *SMALL, "--inputs", str(INPUTS),
                        "--set", f"3.image={empty}", "--out", str(tmp_path / "out"), "--timeout", "120",
                        cwd=tmp_path, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "node 8 (HumanRef_ReferenceEncoder) failed" in proc.stderr
    assert "mask_1 is empty" in proc.stderr
    # the server keeps serving and has nothing left running
    stats = client.system_stats()
    assert "system" in stats
    queue = client.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []


def test_bad_arguments_exit_2(server_url, tmp_path):
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, "--set", "steps=4", cwd=tmp_path,
                        timeout=60)
    assert proc.returncode == 2 and "NODE.INPUT=VALUE" in proc.stderr
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, "--set", "99.steps=4", cwd=tmp_path,
                        timeout=60)
    assert proc.returncode == 2 and "no node '99'" in proc.stderr
    bad = tmp_path / "not_a_workflow.json"
    bad.write_text(json.dumps({"hello": "world"}))
    proc = humanref_cli("run", str(bad), "--server", server_url, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "not a ComfyUI workflow" in proc.stderr


def test_ui_workflow_converted_and_queued(server_url, tmp_path):
    """(b) the UI workflow, converted through /object_info, runs (after the failures above: the server lives)."""
    out = tmp_path / "out"
    proc = humanref_cli("run", str(UI_WORKFLOW), "--server", server_url, *SMALL, "--set", "13.seed=7",
                        "--inputs", str(INPUTS), "--out", str(out), "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    pngs = saved_pngs(proc)
    assert len(pngs) == 1
    image = check_png(pngs[0], (128, 192))
    workflow = json.loads(image.info["workflow"])  # the UI graph travels as extra_pnginfo
    assert {n["type"] for n in workflow["nodes"]} >= {"HumanRef_ReferenceEncoder",
                                                       "HumanRef_MaskedSharedAttentionPatch"}
    assert json.loads(image.info["prompt"])["13"]["inputs"]["seed"] == 7


def test_private_server_from_comfyui_folder(tiny_models, tmp_path):
    """The documented one-liner: --comfyui starts a private server, runs, saves, and stops it again."""
    out = tmp_path / "out"
    log = tmp_path / "server.log"
    proc = humanref_cli("run", str(API_WORKFLOW), "--comfyui", comfyui_path(), "--models", str(tiny_models),
                        "--inputs", str(INPUTS), *SMALL, "--set", "13.steps=2", "--out", str(out),
                        "--server-log", str(log), "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + "\n" + (log.read_text() if log.exists() else "")
    check_png(saved_pngs(proc)[0], (128, 192))
    up = next(line for line in proc.stderr.splitlines() if "ComfyUI is up at" in line)
    url = up.split("ComfyUI is up at ", 1)[1].split()[0]
    temp = up.split("temporary folder ", 1)[1].rstrip(")")
    assert url.startswith("http://127.0.0.1:")
    assert not reachable(url)
    assert not os.path.exists(temp)
    assert "humanref" in log.read_text()


def test_interrupt_stops_the_private_server(tiny_models, tmp_path):
    """Ctrl-C (SIGINT) while the private server runs a prompt: exit 130, server stopped, temp folder gone."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "humanref", "run", str(API_WORKFLOW), "--comfyui", comfyui_path(),
           "--models", str(tiny_models), "--inputs", str(INPUTS), *SMALL, "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        up = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if "ComfyUI is up at" in line:
                up = line
            if "queued prompt" in line:
                break
        assert up is not None, "the private server did not come up"
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, rest
    url = up.split("ComfyUI is up at ", 1)[1].split()[0]
    temp = up.split("temporary folder ", 1)[1].strip().rstrip(")")
    assert not reachable(url)
    assert not os.path.exists(temp)


def test_a_server_that_dies_mid_prompt_fails_the_run_in_seconds(tiny_models, tmp_path):
    """The server killed while it samples: the runner says the server stopped answering, within the client's
    LOST_AFTER of silence, and exits 1 (it waited the whole --timeout before, here 300 s)."""
    from humanref.cli.client import LOST_AFTER

    with running_server(tiny_models) as server:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "humanref", "run", str(API_WORKFLOW), "--server", server.url,
                                 *SMALL, "--set", "13.steps=5000", "--inputs", str(INPUTS), "--out",
                                 str(tmp_path / "out"), "--timeout", "300"], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            for line in proc.stderr:  # wait until the sampler is stepping
                seen.append(line)
                if "KSampler" in line and "/5000" in line:
                    break
            assert proc.poll() is None, "".join(seen)
            os.killpg(server.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            rest = proc.stderr.read()
            proc.wait(timeout=120)
            waited = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1, "".join(seen) + rest
    assert "stopped answering while prompt" in rest and "the server exited or crashed" in rest, rest
    assert waited < LOST_AFTER + 30, waited
    assert not (tmp_path / "out").exists()


def test_a_saved_reference_bank_comes_back_with_the_picture(server_url, comfy_server, tmp_path):
    """Save Reference Bank in an API workflow: its file is downloaded into --out like the picture (it stayed on
    the server before), byte for byte the server's file, and it loads as the bank of the three references."""
    from humanref.pipelines.references.bank_files import load_reference_bank

    prompt = json.loads(API_WORKFLOW.read_text(encoding="utf-8"))
    prompt["8"]["inputs"]["timing"] = "once at t=0"  # only such a bank can be saved
    prompt["20"] = {"class_type": "HumanRef_SaveReferenceBank",
                    "inputs": {"reference_bank": ["8", 0], "filename_prefix": "HumanRef/reference_banks/e2e"}}
    prompt["9"]["inputs"]["reference_bank"] = ["20", 0]
    workflow = tmp_path / "save_bank.json"
    workflow.write_text(json.dumps(prompt), encoding="utf-8")
    out = tmp_path / "out"
    proc = humanref_cli("run", str(workflow), "--server", server_url, *SMALL, "--inputs", str(INPUTS),
                        "--out", str(out), "--timeout", "240", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = [Path(line) for line in proc.stdout.splitlines()]
    banks = [p for p in saved if p.suffix == ".safetensors"]
    assert len(saved) == 2 and len(banks) == 1, proc.stdout
    assert banks[0].parent == out / "HumanRef" / "reference_banks" and banks[0].name.startswith("e2e_")
    on_server = Path(comfy_server.output_dir) / "HumanRef" / "reference_banks" / banks[0].name
    assert banks[0].read_bytes() == on_server.read_bytes()
    bank = load_reference_bank(str(banks[0]))
    assert [r.label for r in bank.references] == ["face", "upper body clothes", "lower body clothes"]
    assert bank.timing == "once at t=0" and bank.features is not None


def test_nothing_written_under_comfyui_or_the_repo(untouched_stamp, comfy_server):
    """Everything above wrote only into temporary folders: not into ComfyUI, not into the pack."""
    stamp = untouched_stamp.stat().st_mtime

    def newer(root: str) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")]
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_mtime > stamp and not name.endswith(".pyc"):
                        found.append(path)
                except OSError:
                    pass
        return found

    assert newer(comfyui_path()) == []
    assert not (REPO / "humanref-out").exists()
    assert not [p for p in newer(str(REPO)) if p.endswith((".png", ".db", ".log", ".yaml"))]

