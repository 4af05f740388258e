"""Shared constants and helpers of the end-to-end tier (imported by conftest.py and the test modules)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from humanref.pipelines.comfy_env import comfyui_path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
API_WORKFLOW = WORKFLOWS / "api" / "references.json"
UI_WORKFLOW = WORKFLOWS / "references.json"
INPUTS = WORKFLOWS / "inputs"
TINY_CKPT = "humanref-tiny-sd15.safetensors"

# small but real: a 128x192 latent image, three steps (tiny UNet; CLIP-L and the VAE are full size)
SMALL = ["--set", f"1.ckpt_name={TINY_CKPT}", "--set", "12.width=128", "--set", "12.height=192",
         "--set", "13.steps=3"]

CLI_TIMEOUT = 300  # seconds for one `python -m humanref ...` process


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
