"""Workflows saved from main at 9f2b61d (before the house move) still load and run: node ids, custom types, input
names and widget values in saved graphs did not change (tests/e2e/saved_9f2b61d/ holds them as shipped then)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import INPUTS, SMALL, humanref_cli

from humanref.cli.convert import ui_to_api

SAVED = Path(__file__).resolve().parent / "saved_9f2b61d"
NAMES = sorted(p.stem for p in SAVED.glob("*.json"))


def test_the_saved_set_is_complete():
    assert NAMES == ["anydressing", "hand2body", "mimicbrush", "parts2whole", "reference_portrait"]


@pytest.mark.parametrize("name", NAMES)
def test_saved_workflow_converts_against_todays_nodes(name, object_info):
    """Every node type still exists; every HumanRef widget value lands on an input of today's schema and is valid
    (model file names excepted: those depend on the server's folders)."""
    ui = json.loads((SAVED / f"{name}.json").read_text(encoding="utf-8"))
    conversion = ui_to_api(ui, object_info)
    assert not [w for w in conversion.warnings if "HumanRef" in w], conversion.warnings
    for nid, node in conversion.prompt.items():
        info = object_info[node["class_type"]]
        if not node["class_type"].startswith("HumanRef_"):
            continue
        model_file = node["class_type"].endswith("Loader")  # its combo lists this server's files, not the saved ones
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for key, value in node["inputs"].items():
            assert key in declared, f"{name}: node {nid} input {key!r} is gone"
            spec = declared[key]
            if model_file:
                continue
            if isinstance(spec[0], list) and not isinstance(value, list):
                assert value in spec[0], f"{name}: node {nid} {key}={value!r} not in {spec[0]}"
            elif spec[0] == "COMBO" and not isinstance(value, list):
                options = spec[1].get("options", []) if len(spec) > 1 else []
                assert not options or value in options, f"{name}: node {nid} {key}={value!r} not in {options}"


def test_saved_reference_portrait_runs(server_url, tmp_path):
    proc = humanref_cli("run", str(SAVED / "reference_portrait.json"), "--server", server_url, "--inputs",
                        str(INPUTS), *SMALL, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(line.endswith(".png") for line in proc.stdout.splitlines()), proc.stdout
