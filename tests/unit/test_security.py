"""Security rules as tests: pickles only through weights_only loading; importing the pack is side-effect free.

The source scan reads every Python file of the pack (tests included) with the ast module, so a call written
on several lines or through an alias is still seen. The import check runs in a fresh interpreter with an audit
hook (PEP 578) that records every socket operation and every file opened for writing while the pack imports.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from importprobe import probe_import

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv", "venv"}


def pack_sources() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(root) / n for n in names if n.endswith(".py")]
    return sorted(files)


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``pickle.loads``, ``load``)."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that may unpickle arbitrary code: torch.load without weights_only=True, pickle/dill/joblib loads,
    numpy load with allow_pickle=True, ComfyUI's load_torch_file without safe_load=True."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno}: {name}(...)"
        if full == "torch.load" and not _kw_true(node, "weights_only"):
            found.append(where + " without weights_only=True")
        elif full in {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load",
                      "cloudpickle.load", "cloudpickle.loads", "pickle.Unpickler"}:
            found.append(where + " unpickles")
        elif full in {"numpy.load", "np.load"} and _kw_true(node, "allow_pickle"):
            found.append(where + " with allow_pickle=True")
        elif full.endswith("load_torch_file") and not _kw_true(node, "safe_load"):
            found.append(where + " without safe_load=True")
    return found


@pytest.mark.parametrize("snippet, bad", [
    ("import torch\ntorch.load(p)", True),
    ("import torch\ntorch.load(p, weights_only=False)", True),
    ("import torch\ntorch.load(p,\n    map_location='cpu', weights_only=True)", False),
    ("import torch as T\nT.load(p)", True),
    ("from torch import load as L\nL(p)", True),
    ("import pickle\npickle.loads(b)", True),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", True),
    ("import numpy as np\nnp.load(p)", False),
    ("import comfy.utils\ncomfy.utils.load_torch_file(p)", True),
    ("import comfy.utils\ncomfy.utils.load_torch_file(p, safe_load=True)", False),
    ("from safetensors.torch import load_file\nload_file(p)", False),
])
def test_scanner_catches_unsafe_loads(snippet, bad):
    assert bool(unsafe_loads(snippet)) is bad, snippet


def test_no_unsafe_pickle_loading_anywhere_in_the_pack():
    sources = pack_sources()
    assert len(sources) > 20 and any(p.name == "patch.py" for p in sources)
    found = [hit for p in sources for hit in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, "unsafe loading:\n" + "\n".join(found)


def test_probe_sees_writes_and_sockets(tmp_path):
    """The probe itself can fail: a module that writes a file and opens a socket is reported."""
    mod = tmp_path / "noisy_mod.py"
    mod.write_text(f"import socket\nsocket.socket().close()\nopen({str(tmp_path / 'x.txt')!r}, 'w').close()\n")
    events = probe_import(["noisy_mod"], extra_path=str(tmp_path))
    assert any(e.startswith("socket.") for e in events) and any("x.txt" in e for e in events), events


def test_importing_the_engine_and_cli_has_no_side_effects():
    events = probe_import(["humanref", "humanref.attention.reader", "humanref.attention.kernels",
                           "humanref.attention.bank", "humanref.cli", "humanref.cli.server"],
                          preload=["torch", "einops"])
    assert events == [], events
