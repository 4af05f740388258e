"""`python -m humanref run --comfyui PATH` when PATH already has HumanRef in its custom_nodes (the README's install
followed by its main command): one copy is loaded, and the runner says which."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from e2e_support import API_WORKFLOW, INPUTS, SMALL, comfyui_path, humanref_cli

PACK_ROOT = Path(__file__).resolve().parents[2]


def comfyui_with_pack_installed(dest: Path) -> Path:
    """A ComfyUI folder whose custom_nodes holds this pack (as after `git clone ... custom_nodes/humanref`).

    Top-level modules are copied (ComfyUI finds custom_nodes next to the real path of folder_paths.py), the
    packages are links to the real ComfyUI; nothing is written into the real one.
    """
    source = Path(comfyui_path())
    dest.mkdir()
    for entry in source.iterdir():
        if entry.name in ("custom_nodes", "models", "input", "output", "user", "temp") or entry.name.startswith("."):
            continue
        if entry.is_dir():
            os.symlink(entry, dest / entry.name, target_is_directory=True)
        else:
            shutil.copy2(entry, dest / entry.name)
    (dest / "custom_nodes").mkdir()
    os.symlink(PACK_ROOT, dest / "custom_nodes" / "ComfyUI-HumanRef", target_is_directory=True)
    return dest


def test_pack_installed_in_comfyui_is_loaded_once(tiny_models, tmp_path):
    comfy = comfyui_with_pack_installed(tmp_path / "ComfyUI")
    log = tmp_path / "server.log"
    proc = humanref_cli("run", str(API_WORKFLOW), "--comfyui", str(comfy), "--models", str(tiny_models),
                        "--inputs", str(INPUTS), *SMALL, "--set", "13.steps=1", "--out", str(tmp_path / "out"),
                        "--server-log", str(log), "--timeout", "240", cwd=tmp_path)
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stderr + "\n" + text
    assert "the copy installed in ComfyUI's custom_nodes" in proc.stderr, proc.stderr
    loaded = [line for line in text.splitlines() if "seconds" in line and "ComfyUI-HumanRef" in line]
    assert len(loaded) == 1, text
    assert not any("seconds" in line and line.rstrip().endswith(os.sep + "humanref") for line in text.splitlines())


def test_unreachable_server_suggests_starting_one(tmp_path):
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "o"),
                        cwd=tmp_path)
    assert proc.returncode != 0
    assert "no ComfyUI answers at http://127.0.0.1:9" in proc.stderr
    assert "--comfyui /path/to/ComfyUI" in proc.stderr


def test_misspelt_input_is_refused_with_the_node_inputs(server_url, tmp_path):
    proc = humanref_cli("run", str(API_WORKFLOW), "--server", server_url, "--set", "13.stepz=4",
                        "--print-prompt", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "node 13 (KSampler) has no input 'stepz' (did you mean 'steps'?)" in proc.stderr
    assert "steps" in proc.stderr.split("its inputs are:", 1)[1]
