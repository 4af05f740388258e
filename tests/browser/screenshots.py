"""Regenerate the README's workflow pictures from ComfyUI's real frontend: docs/METHOD.png for every shipped UI
workflow (workflows/N-METHOD-....json), or the methods given. The template browser's thumbnails
(workflows/N-METHOD-....jpg) show what a workflow makes, not its graph: tests/browser/thumbnails.py draws them.

    python tests/browser/screenshots.py [NAME ...] [--models DIR]

Starts a private ComfyUI on 127.0.0.1 with the pack and the tiny models (written to a temporary folder, or
reused from --models / HUMANREF_TINY_MODELS, a ``python -m humanref tiny-models`` folder), opens each workflow
with File > Open in headless chromium and refuses to draw a graph the frontend complains about (except the
known JSON issues the browser tests list). Needs the same as the browser tier: ComfyUI, Debian's chromium and
the playwright package.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # browser_support (it adds tests/e2e for e2e_support)
from browser_support import (
    DOCS,
    KNOWN_JSON_ISSUES,
    UI_WORKFLOWS,
    VIEWPORT,
    WORKFLOW_NAMES,
    Frontend,
    capture_graph,
    install_models,
    launch_chromium,
    make_server,
    missing_browser,
    prepare_server,
)
from e2e_support import TINY_CKPT, comfyui_path, humanref_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"workflows to draw (default: all of {', '.join(WORKFLOW_NAMES)})")
    parser.add_argument("--models", default=os.environ.get("HUMANREF_TINY_MODELS"),
                        help="a `python -m humanref tiny-models` folder to reuse (default: write one to a temp dir)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(WORKFLOW_NAMES))
    if unknown:
        parser.error(f"no workflow {unknown[0]!r} (have: {', '.join(WORKFLOW_NAMES)})")
    why_not = missing_browser()
    if why_not:
        print(f"cannot draw the pictures: {why_not}", file=sys.stderr)
        return 2
    names = args.names or list(WORKFLOW_NAMES)

    from playwright.sync_api import sync_playwright

    from humanref.cli.client import ComfyClient

    with tempfile.TemporaryDirectory(prefix="humanref-screenshots-") as tmp:
        tiny = Path(args.models) if args.models else Path(tmp) / "tiny"
        proc = humanref_cli("tiny-models", str(tiny), "--comfyui", comfyui_path(), cwd=Path(tmp))
        if proc.returncode != 0 or not (tiny / "checkpoints" / TINY_CKPT).is_file():
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        install_models(tiny, Path(tmp) / "models")
        with make_server(Path(tmp) / "models") as server, sync_playwright() as playwright:
            prepare_server(ComfyClient(server.url, timeout=30), server.input_dir)
            browser = launch_chromium(playwright)
            failed = 0
            for name in names:
                context = browser.new_context(viewport=VIEWPORT)
                frontend = Frontend(context.new_page(), server.url).open()
                mark = frontend.mark()
                frontend.open_file(UI_WORKFLOWS[name])
                problems = [p for p in frontend.problems(since=mark)
                            if p not in KNOWN_JSON_ISSUES.get(name, ([], ""))[0]]
                if problems:
                    print(f"{name}: not drawn, the frontend reports:\n  " + "\n  ".join(problems), file=sys.stderr)
                    failed += 1
                else:
                    frontend.dismiss_toasts()
                    png = DOCS / f"{name}.png"
                    size = capture_graph(frontend, png)
                    print(f"{png.relative_to(DOCS.parent)} ({size[0]}x{size[1]})")
                context.close()
            browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
