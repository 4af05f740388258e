"""End-to-end tier: one ComfyUI server on 127.0.0.1 per test session, started through the pack's own CLI code.

The server gets the pack (custom_nodes symlink) and a temporary models folder holding the tiny checkpoint
written by ``python -m humanref tiny-models``. Set HUMANREF_TINY_MODELS=DIR to reuse models written earlier.
ComfyUI goes on sys.path (CPU mode) when pytest imports this file; without ComfyUI each test module is reported
skipped with the reason.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from comfyenv import bootstrap, mark_tier, skipped_module
from e2e_support import TINY_CKPT, comfyui_path, humanref_cli, running_server

bootstrap()


def pytest_pycollect_makemodule(module_path, parent):
    return skipped_module(module_path, parent)


def pytest_collection_modifyitems(items):
    mark_tier(items, Path(__file__).parent, "comfy", "e2e")


@pytest.fixture(scope="session")
def untouched_stamp(tmp_path_factory) -> Path:
    """A file whose mtime predates everything the e2e tier starts (to check nothing is written elsewhere)."""
    stamp = tmp_path_factory.mktemp("stamp") / "stamp"
    stamp.write_text("")
    past = time.time() - 2
    os.utime(stamp, (past, past))
    return stamp


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, untouched_stamp) -> Path:
    reuse = os.environ.get("HUMANREF_TINY_MODELS")
    directory = Path(reuse) if reuse else tmp_path_factory.mktemp("models")
    proc = humanref_cli("tiny-models", str(directory), "--comfyui", comfyui_path(),
                        cwd=tmp_path_factory.getbasetemp())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (directory / "checkpoints" / TINY_CKPT).is_file(), proc.stdout
    return directory


@pytest.fixture(scope="session")
def comfy_server(tiny_models, untouched_stamp):
    """A running ComfyUI (humanref.cli.server.LocalComfyUI); always stopped at the end of the session."""
    with running_server(str(tiny_models)) as server:
        yield server


@pytest.fixture(scope="session")
def server_url(comfy_server) -> str:
    return comfy_server.url


@pytest.fixture(scope="session")
def client(server_url):
    from humanref.cli.client import ComfyClient

    return ComfyClient(server_url, timeout=30)


@pytest.fixture(scope="session")
def object_info(client) -> dict:
    return client.object_info()
