"""Browser tier: ComfyUI's own frontend in headless chromium (Debian's, through Playwright) against one private
ComfyUI server per session (humanref.cli.server.LocalComfyUI, as the e2e tier), with the pack and the tiny
synthetic models installed under the file names the shipped workflows use; its input folder starts empty and gets
the example inputs from the README's install step, run as written. A second server without models shows the
missing-models dialog.

Set HUMANREF_TINY_MODELS=DIR to reuse models written earlier by ``python -m humanref tiny-models DIR``. ComfyUI
goes on sys.path (CPU mode) when pytest imports this file; the test modules are reported skipped with the reason
when ComfyUI, chromium or the playwright package is missing; nothing here imports playwright at collection time.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_support import (
    SERVER_ARGS,
    VIEWPORT,
    Frontend,
    input_files,
    install_example_inputs,
    install_models,
    launch_chromium,
    returning_user,
)
from comfyenv import bootstrap, mark_tier, skipped_module
from e2e_support import TINY_CKPT, comfyui_path, humanref_cli, running_server

bootstrap()


def pytest_pycollect_makemodule(module_path, parent):
    return skipped_module(module_path, parent)


def pytest_collection_modifyitems(items):
    mark_tier(items, Path(__file__).parent, "comfy", "e2e", "browser")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the test item (the frontend fixture saves a screenshot on failure)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")
def browser_models(tmp_path_factory) -> Path:
    reuse = os.environ.get("HUMANREF_TINY_MODELS")
    tiny = Path(reuse) if reuse else tmp_path_factory.mktemp("tiny-models")
    proc = humanref_cli("tiny-models", str(tiny), "--comfyui", comfyui_path(), cwd=tmp_path_factory.getbasetemp())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tiny / "checkpoints" / TINY_CKPT).is_file(), proc.stdout
    models = tmp_path_factory.mktemp("browser-models")
    install_models(tiny, models)
    return models


@pytest.fixture(scope="module")
def browser_server(browser_models):
    with running_server(str(browser_models), SERVER_ARGS) as server:
        yield server


def load_image_options(client) -> list[str]:
    """The files LoadImage offers (its combo's values, from the server's /object_info)."""
    return list(client.object_info("LoadImage")["LoadImage"]["input"]["required"]["image"][0])


@pytest.fixture(scope="module")
def example_inputs(browser_server) -> dict:
    """The server's input folder and LoadImage's list before and after the README's install step, run as written
    against that folder (a fresh ComfyUI's input folder is empty; nothing else puts files there)."""
    from humanref.cli.client import ComfyClient

    client = ComfyClient(browser_server.url, timeout=30)
    before = {"files": input_files(browser_server.input_dir), "load_image": load_image_options(client)}
    files = install_example_inputs(browser_server.input_dir)
    return {"before": before, "after": {"files": files, "load_image": load_image_options(client)}}


@pytest.fixture(scope="module")
def browser_client(browser_server, example_inputs):
    from humanref.cli.client import ComfyClient

    client = ComfyClient(browser_server.url, timeout=30)
    returning_user(client)
    return client


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    """A second server whose models folder is empty (a user who has not downloaded anything yet)."""
    with running_server(str(tmp_path_factory.mktemp("no-models")), SERVER_ARGS) as server:
        from humanref.cli.client import ComfyClient

        returning_user(ComfyClient(server.url, timeout=30))
        yield server


# module scope: Playwright's event loop must not outlive the browser tier (asyncio.run in later tiers)
@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def frontend(request, chromium, browser_server, browser_client, tmp_path):
    """A fresh browser context and page on the server (not yet opened: call .open()). On failure the page is
    saved to tmp_path/failure.png and the server log's tail is printed."""
    yield from page_on(request, chromium, browser_server, tmp_path)


@pytest.fixture
def bare_frontend(request, chromium, bare_server, tmp_path):
    """As `frontend`, on the server without models."""
    yield from page_on(request, chromium, bare_server, tmp_path)


def page_on(request, chromium, server, tmp_path):
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield Frontend(page, server.url)
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            try:
                page.screenshot(path=str(tmp_path / "failure.png"))
                print(f"page at failure: {tmp_path / 'failure.png'}")
            except Exception as exc:  # noqa: BLE001 - a broken page must not hide the test's own failure
                print(f"no screenshot of the page: {exc}")
            print("server log tail:\n" + server.log_tail(30))
        context.close()
