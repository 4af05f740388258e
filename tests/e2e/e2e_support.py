"""Shared constants and helpers of the end-to-end tier (imported by conftest.py and the test modules)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from humanref.pipelines.comfy_env import comfyui_path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
# The template browser shows a custom node's template by its file name (title; the description is the name with
# - and _ as spaces) and sorts by it: "N-method-what-it-makes". The API graphs keep the method's name.
# workflow key -> its UI file (workflows/api/KEY.json is its API twin); a method's
# second workflow is keyed METHOD_VARIANT
UI_NAMES = {
    "references": "1-references-portrait-from-photos",
    "parts2whole": "2-parts2whole-person-from-parts",
    "mimicbrush": "3-mimicbrush-redraw-a-region",
    "hands": "4-hands-first-then-the-body",
    "anydressing": "5-anydressing-dress-a-person",
    "references_likeness": "6-references-likeness-maps",
}
UI_WORKFLOWS = {method: WORKFLOWS / f"{name}.json" for method, name in UI_NAMES.items()}
API_WORKFLOW = WORKFLOWS / "api" / "references.json"
UI_WORKFLOW = UI_WORKFLOWS["references"]
INPUTS = WORKFLOWS / "inputs"
TINY_CKPT = "humanref-tiny-sd15.safetensors"

# small but real: a 128x192 latent image, three steps (tiny UNet; CLIP-L and the VAE are full size)
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", "12.width=128", "--set", "12.height=192",
         "--set", "13.steps=3"]

CLI_TIMEOUT = 300  # seconds for one `python -m humanref ...` process


def with_style_lora(prompt: dict, lora_name: str, strength: float = 0.8) -> dict:
    """The AnyDressing API graph with its optional style LoRA switched on, as a user who un-bypasses the UI graph's
    node 2 has it: LoraLoaderModelOnly (node 2) between the checkpoint and the dressing attention (node 8)."""
    prompt = json.loads(json.dumps(prompt))
    assert "2" not in prompt and prompt["8"]["inputs"]["model"] == ["1", 0], "not the shipped anydressing graph"
    prompt["2"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"lora_name": lora_name, "strength_model": strength, "model": ["1", 0]}}
    prompt["8"]["inputs"]["model"] = ["2", 0]
    return prompt


def reachable(url: str) -> bool:
    """Whether a ComfyUI server answers at ``url`` (a stopped one must not)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/system_stats", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def humanref_cli(*args: str, cwd: Path, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m humanref ARGS`` (the installed package), capturing stdout and stderr."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "humanref", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def running_server(models: str, extra_args: Sequence[str] = ()) -> Iterator:
    """A private ComfyUI (humanref.cli.server.LocalComfyUI) with these models; always stopped, its temporary
    folder checked gone afterwards."""
    from humanref.cli.server import LocalComfyUI

    server = LocalComfyUI(comfyui_path(), models=str(models), extra_args=list(extra_args), start_timeout=180)
    server.start()
    try:
        yield server
    finally:
        tmp = server.tmp
        server.stop()
        assert not server.alive()
        assert tmp is None or not os.path.exists(tmp)
