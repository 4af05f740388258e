"""The browser tier's shared code (the tests and the screenshot script): a models folder holding the tiny
synthetic models under the file names the shipped workflows use, and a driver for the ComfyUI page in headless
chromium that opens workflows the way a user does and reports what the frontend complains about.

Nothing here writes into the repository except :func:`save_pictures` (the explicit screenshot command).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

from e2e_support import INPUTS, REPO, WORKFLOWS  # noqa: E402

DOCS = REPO / "docs"
WORKFLOW_NAMES = tuple(sorted(p.stem for p in WORKFLOWS.glob("*.json")))

# Debian's chromium (apt-get install chromium); HUMANREF_CHROMIUM overrides. Never a downloaded browser.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu")
VIEWPORT = {"width": 1600, "height": 1000}

# Server flags: --disable-api-nodes also stops the frontend asking api.comfy.org for release notes (the
# tier runs offline; that request would fail with a console error).
SERVER_ARGS = ("--disable-api-nodes",)

# The loader nodes of the shipped workflows: the model file (the node's first widget value) lives in this
# ComfyUI model folder. The browser tier installs the tiny model of that folder under the shipped name, so the
# graphs load as a user with the real models sees them (no missing-models dialog) and run unchanged.
MODEL_LOADERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "ControlNetLoader": "controlnet",
    "LoraLoaderModelOnly": "loras",
    "HumanRef_MimicBrushLoader": "mimicbrush",
    "HumanRef_Parts2WholeLoader": "parts2whole",
    "HumanRef_HandGeneratorLoader": "hand_generator",
}

# What a CPU user edits after loading: small images, few steps (node id -> widget name -> value). Nothing else
# changes; model names, prompts, seeds and every other setting stay as shipped.
SMALL_RUN = {
    "references": {12: {"width": 128, "height": 192}, 13: {"steps": 3}},
    "parts2whole": {12: {"width": 64, "height": 96}, 13: {"steps": 3}},
    "mimicbrush": {7: {"resolution": 256}, 8: {"steps": 2}},
    "hands": {5: {"resolution": 64, "steps": 2, "width": 128, "height": 192}, 9: {"steps": 3}},
    "anydressing": {14: {"width": 128, "height": 192}, 15: {"steps": 3}},
}

# The sizes of the images each small run saves (SaveImage outputs, sorted).
EXPECTED_SIZES = {
    "references": [(128, 192)],
    "parts2whole": [(64, 96)],
    "mimicbrush": None,  # pasted back at the source image's size: filled in by expected_sizes()
    "hands": [(64, 64), (64, 64), (128, 192)],  # two hand crops and the outpainted body
    "anydressing": [(128, 192)],
}

# Frontend errors that a shipped JSON really has, exactly as the page shows them, with the fix the JSON needs.
# The test asserts these and nothing else appear, runs everything else, and ends as xfail with the reason; once
# the JSON is fixed the list no longer matches and the test fails until the entry is removed.
KNOWN_JSON_ISSUES: dict[str, tuple[list[str], str]] = {}  # workflow -> (expected frontend complaints, why)

# Console errors a fresh page on a fresh user profile always gets from the frontend itself, before any
# workflow is touched: the index page's two user.css links, the favicon, and the probes for the user's
# saved workflows, subgraphs and legacy templates file. Each is exactly this text at exactly this URL
# (path and query); any other console error fails the tier.
RESOURCE_404 = "Failed to load resource: the server responded with a status of 404 (Not Found)"
FRESH_PROFILE_404S = (
    "/user.css",
    "/api/userdata/user.css",
    "/favicon.ico",
    "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
    "/api/userdata?dir=subgraphs&recurse=true&split=false&full_info=true",
    "/api/userdata/comfy.templates.json",
)


def find_chromium() -> Optional[str]:
    env = os.environ.get("HUMANREF_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def missing_browser() -> Optional[str]:
    """Why the browser tier cannot run here (None when it can)."""
    import importlib

    try:
        importlib.import_module("playwright.sync_api")
    except ImportError:
        return ("the playwright package is not installed (pip install 'humanref[browser]'; it drives the "
                "system chromium, no browser download)")
    if find_chromium() is None:
        if os.environ.get("HUMANREF_CHROMIUM"):
            return f"HUMANREF_CHROMIUM={os.environ['HUMANREF_CHROMIUM']} is not an executable"
        return "Debian's chromium is not installed (apt-get install chromium) and HUMANREF_CHROMIUM is not set"
    return None


def launch_chromium(playwright):
    """The system chromium, headless (as root too: --no-sandbox)."""
    return playwright.chromium.launch(executable_path=find_chromium(), args=list(CHROMIUM_ARGS), headless=True)


def make_server(models: Path):
    """A private ComfyUI (humanref.cli.server.LocalComfyUI) on 127.0.0.1 with the pack and these models."""
    from e2e_support import comfyui_path

    from humanref.cli.server import LocalComfyUI

    return LocalComfyUI(comfyui_path(), models=str(models), extra_args=SERVER_ARGS, start_timeout=180)


def prepare_server(client) -> None:
    """What a user has done before opening the workflows: the example inputs uploaded, and a returning
    user's profile (the first-run templates dialog does not pop up by itself; the tests open the template
    browser through the menu, deterministically)."""
    upload_inputs(client)
    status, body = client.post_json("/settings/Comfy.TutorialCompleted", True)
    if status != 200:
        raise RuntimeError(f"POST /settings/Comfy.TutorialCompleted: HTTP {status}: {body}")


def load_workflow(name: str) -> dict:
    with open(WORKFLOWS / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- models
def shipped_models() -> list[tuple[str, str]]:
    """(model folder, file name) of every loader widget in the shipped workflows (muted nodes included)."""
    found = set()
    for name in WORKFLOW_NAMES:
        for node in load_workflow(name)["nodes"]:
            folder = MODEL_LOADERS.get(node["type"])
            if folder:
                found.add((folder, node["widgets_values"][0]))
    return sorted(found)


def install_models(tiny: Path, dest: Path) -> list[tuple[str, str]]:
    """Fill dest with links to everything in tiny (a `python -m humanref tiny-models` folder) plus the tiny
    model of each loader's folder under the shipped file name; returns the (folder, name) pairs added.

    A shipped ``.pth``/``.pt`` name gets the tiny safetensors weights re-saved as a plain pickled tensor dict,
    because ComfyUI picks the reader from the extension (torch.load(weights_only=True) for those)."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in tiny.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(exist_ok=True)
        for entry in folder.iterdir():
            link = dest / folder.name / entry.name
            if not os.path.lexists(link):
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    added = []
    for folder, name in shipped_models():
        target = dest / folder / name
        if os.path.lexists(target):
            continue
        entries = sorted((tiny / folder).iterdir()) if (tiny / folder).is_dir() else []
        if len(entries) != 1:
            raise RuntimeError(f"tiny models folder {tiny / folder} should hold exactly one model to stand in for "
                               f"{name}, holds {[e.name for e in entries]}")
        source = entries[0].resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir() or source.suffix == target.suffix:
            target.symlink_to(source, target_is_directory=source.is_dir())
        elif source.suffix in (".safetensors", ".sft") and target.suffix in (".pth", ".pt"):
            torch.save(load_file(str(source)), str(target))
        else:
            raise RuntimeError(f"no way to stand {source.name} in for {folder}/{name}")
        added.append((folder, name))
    return added


def upload_inputs(client) -> list[str]:
    """Upload the example input images (workflows/inputs/*.png) as a user does before opening a workflow."""
    return [client.upload_image(str(p), overwrite=True) for p in sorted(INPUTS.glob("*.png"))]


def expected_sizes(name: str) -> list[tuple[int, int]]:
    sizes = EXPECTED_SIZES[name]
    if sizes is None:
        from PIL import Image

        source = next(n for n in load_workflow(name)["nodes"] if n["id"] == 3)["widgets_values"][0]
        with Image.open(INPUTS / source) as image:
            sizes = [image.size]
    return sizes


# ---------------------------------------------------------------------------------------------- the page
# Everything the frontend knows about the loaded graph that a user would see as an error: node types it
# has no definition for (the missing-nodes dialog), links whose ends do not exist or whose types the
# frontend would refuse to connect, required inputs left open, and widget values outside the server's
# options or ranges.
GRAPH_PROBLEMS_JS = """() => {
  const problems = [];
  const g = window.app.graph;
  const link = (id) => (g.links instanceof Map ? g.links.get(id) : g.links[id]);
  for (const n of g._nodes) {
    const where = `node ${n.id} (${n.type})`;
    if (!(n.type in LiteGraph.registered_node_types) || n.has_errors) {
      problems.push(`${where}: node type not registered in the frontend`);
      continue;
    }
    const required = Object.keys(n.constructor.nodeData?.input?.required ?? {});
    (n.inputs ?? []).forEach((input, slot) => {
      if (input.link == null) {
        if (n.mode === 0 && !input.widget && required.includes(input.name))
          problems.push(`${where}: required input ${input.name} is not connected`);
        return;
      }
      const l = link(input.link);
      if (!l) { problems.push(`${where}: input ${input.name} has link ${input.link}, which does not exist`); return; }
      if (l.target_id !== n.id || l.target_slot !== slot)
        problems.push(`${where}: link ${l.id} points at node ${l.target_id} slot ${l.target_slot}`);
      const origin = g.getNodeById(l.origin_id);
      const out = origin?.outputs?.[l.origin_slot];
      if (!out) { problems.push(`${where}: link ${l.id} comes from a missing output`); return; }
      if (!(out.links ?? []).includes(l.id))
        problems.push(`${where}: link ${l.id} is not listed on node ${origin.id}'s output ${out.name}`);
      if (!LiteGraph.isValidConnection(out.type, input.type))
        problems.push(`${where}: link ${l.id} connects ${origin.type}.${out.name} (${out.type}) to ` +
                      `${input.name} (${input.type})`);
    });
    for (const w of n.widgets ?? []) {
      const values = w.options?.values;
      if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value))
        problems.push(`${where}: widget ${w.name} = ${JSON.stringify(w.value)} is not one of the server's options`);
      if (typeof w.value === 'number' && ((w.options?.min != null && w.value < w.options.min) ||
                                          (w.options?.max != null && w.value > w.options.max)))
        problems.push(`${where}: widget ${w.name} = ${w.value} is outside [${w.options.min}, ${w.options.max}]`);
    }
  }
  return problems;
}"""

SET_WIDGETS_JS = """(edits) => {
  const done = [];
  for (const [id, values] of Object.entries(edits)) {
    const node = window.app.graph.getNodeById(Number(id));
    if (!node) throw new Error(`no node ${id}`);
    for (const [name, value] of Object.entries(values)) {
      const w = node.widgets?.find((w) => w.name === name);
      if (!w) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
      w.value = value;
      w.callback?.(value, window.app.canvas, node);
      done.push(`${id}.${name}`);
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return done;
}"""

VISIBLE_DIALOGS_JS = """() => Array.from(document.querySelectorAll('[role=dialog], [role=alertdialog]'))
  .filter((d) => d.offsetParent !== null || d.getClientRects().length > 0)
  .map((d) => d.innerText.trim())"""

VISIBLE_TOASTS_JS = """() => Array.from(document.querySelectorAll('.p-toast-message'))
  .map((t) => t.innerText.trim())"""


@dataclass
class ConsoleEntry:
    kind: str  # console message type ('error', ...) or 'pageerror'
    text: str
    url: str = ""

    def expected_on_fresh_profile(self) -> bool:
        parsed = urllib.parse.urlsplit(self.url)
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        return self.kind == "error" and self.text == RESOURCE_404 and path in FRESH_PROFILE_404S

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}" + (f" ({self.url})" if self.url else "")


@dataclass
class Frontend:
    """One browser page on the ComfyUI server, recording its console errors and uncaught exceptions."""

    page: Any
    url: str
    console: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console.append(ConsoleEntry("pageerror", str(exc))))

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.console.append(ConsoleEntry("error", message.text, (message.location or {}).get("url", "")))

    # -------------------------------------------------------------- state
    def mark(self) -> int:
        """A position in the console record: errors(since=mark) are the ones that came after it."""
        return len(self.console)

    def errors(self, since: int = 0) -> list[str]:
        """Console errors and page exceptions other than the fresh-profile probes (FRESH_PROFILE_404S)."""
        return [str(e) for e in self.console[since:] if not e.expected_on_fresh_profile()]

    def dialogs(self) -> list[str]:
        return self.page.evaluate(VISIBLE_DIALOGS_JS)

    def toasts(self) -> list[str]:
        return self.page.evaluate(VISIBLE_TOASTS_JS)

    def graph_problems(self) -> list[str]:
        return self.page.evaluate(GRAPH_PROBLEMS_JS)

    def serialize(self) -> dict:
        return self.page.evaluate("() => window.app.graph.serialize()")

    def problems(self, since: int = 0) -> list[str]:
        """Everything a user would see go wrong: dialogs (missing nodes or models, load errors), toasts
        (workflow validation, fixed links), console errors after the mark `since`, and the graph checks."""
        return ([f"dialog: {d}" for d in self.dialogs()] + [f"toast: {t}" for t in self.toasts()]
                + [f"console: {e}" for e in self.errors(since)] + self.graph_problems())

    def dismiss_toasts(self) -> None:
        """Close the toasts on screen (their close buttons), so the next check sees only new ones."""
        self.page.evaluate("() => document.querySelectorAll('.p-toast-message .p-toast-close-button')"
                           ".forEach((button) => button.click())")
        self.page.wait_for_function("() => !document.querySelector('.p-toast-message')", timeout=10_000)

    # -------------------------------------------------------------- actions
    def open(self) -> "Frontend":
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app?.graph && window.app.canvas && window.app.extensionManager"
                                    " && document.querySelector('.comfy-menu-button-wrapper')", timeout=60_000)
        self.settle()
        return self

    def settle(self, seconds: float = 0.5) -> None:
        """Let the frontend finish what a load starts (dialogs, model lookups, previews of the inputs)."""
        self.page.wait_for_load_state("networkidle")
        time.sleep(seconds)
        self.page.wait_for_load_state("networkidle")

    def menu(self, *path: str) -> None:
        """Click through the main menu (the ComfyUI logo): menu('Browse Templates'), menu('File', 'Open').

        A submenu opens on hover; on a loaded machine the hover can land before the menu has finished opening,
        so the whole path is tried again (menu closed with Escape) before giving up."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        for attempt in range(3):
            try:
                self.page.locator(".comfy-menu-button-wrapper").click()
                for name in path[:-1]:
                    self.page.get_by_role("menuitem", name=name, exact=True).hover()
                self.page.get_by_role("menuitem", name=path[-1], exact=True).click(timeout=15_000)
                return
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
                self.page.keyboard.press("Escape")
                self.settle()

    def wait_for_graph(self, workflow: dict) -> None:
        ids = sorted(n["id"] for n in workflow["nodes"])
        self.page.wait_for_function("(ids) => JSON.stringify(window.app.graph._nodes.map((n) => n.id)"
                                    ".sort((a, b) => a - b)) === JSON.stringify(ids)", arg=ids, timeout=30_000)
        self.settle(1.0)

    def open_template(self, module: str, name: str) -> dict:
        """Workflow templates browser: the module's section, the card's thumbnail, a click on the card.
        Returns what the card showed (title and the thumbnail's natural size)."""
        self.menu("Browse Templates")
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(module, exact=True).click()
        card = self.page.get_by_test_id(f"template-workflow-{name}")
        card.wait_for()
        card.scroll_into_view_if_needed()  # thumbnails load lazily, when in view
        thumb = card.locator("img").first
        thumb.wait_for()
        self.page.wait_for_function("(img) => img.complete", arg=thumb.element_handle(), timeout=15_000)
        shown = {"text": card.inner_text(), "thumbnail": thumb.evaluate("(img) => [img.naturalWidth, "
                                                                         "img.naturalHeight, img.src]")}
        card.click()
        dialog.wait_for(state="hidden")
        self.wait_for_graph(load_workflow(name))
        return shown

    def open_file(self, path: Path) -> None:
        """File > Open, choosing the JSON in the file dialog."""
        with self.page.expect_file_chooser() as chooser:
            self.menu("File", "Open")
        chooser.value.set_files(str(path))
        with open(path, encoding="utf-8") as f:
            self.wait_for_graph(json.load(f))

    def set_widgets(self, edits: dict) -> list[str]:
        return self.page.evaluate(SET_WIDGETS_JS, {str(k): v for k, v in edits.items()})

    def queue(self) -> dict:
        """Click Run; returns the /prompt request the page sent and the server's answer."""
        with self.page.expect_response(lambda r: urllib.parse.urlsplit(r.url).path.endswith("/prompt")
                                       and r.request.method == "POST") as response:
            self.page.get_by_role("button", name="Run", exact=True).click()
        answer = response.value
        return {"status": answer.status, "body": answer.json(), "sent": answer.request.post_data_json}

    def node_outputs(self, node_id: int) -> Optional[dict]:
        return self.page.evaluate("(id) => window.app.nodeOutputs?.[String(id)] ?? null", node_id)


# ---------------------------------------------------------------------------------------------- pictures
PICTURE_MAX_WIDTH = 2000  # pixels; larger graphs are drawn smaller (all text still drawn: no low-detail mode)
PICTURE_PAD = 40
THUMBNAIL_WIDTH = 512

GRAPH_BOUNDS_JS = """() => {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const grow = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w);
                                 y1 = Math.max(y1, y + h); };
  for (const n of window.app.graph._nodes)
    grow(n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT);
  for (const g of window.app.graph._groups) grow(g.pos[0], g.pos[1], g.size[0], g.size[1]);
  return [x0, y0, x1, y1];
}"""

PICTURE_SETTINGS_JS = """async () => {
  const s = window.app.extensionManager.setting;
  await s.set('Comfy.Minimap.Visible', false);
  await s.set('Comfy.Graph.CanvasMenu', false);
  await s.set('Comfy.Graph.CanvasInfo', false);
  await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);
  if (!window.app.extensionManager.focusMode) window.app.extensionManager.toggleFocusMode();
}"""


def capture_graph(frontend: "Frontend", png: Path, jpg: Optional[Path] = None) -> tuple[int, int]:
    """Screenshot the loaded graph as the page draws it: focus mode (no menus or side bars), no minimap,
    canvas menu or stats, the whole graph in view at up to 100 % zoom. Writes png (and a JPEG thumbnail of
    THUMBNAIL_WIDTH pixels to jpg); returns the picture's size. Changes the page's settings: use a server
    of its own."""
    from PIL import Image

    page = frontend.page
    page.evaluate(PICTURE_SETTINGS_JS)
    page.add_style_tag(content='button[aria-label="Show Menu"] { display: none !important; }')
    x0, y0, x1, y1 = page.evaluate(GRAPH_BOUNDS_JS)
    scale = min(1.0, (PICTURE_MAX_WIDTH - 2 * PICTURE_PAD) / (x1 - x0))
    size = (int((x1 - x0) * scale) + 2 * PICTURE_PAD, int((y1 - y0) * scale) + 2 * PICTURE_PAD)
    page.set_viewport_size({"width": size[0], "height": size[1]})
    frontend.settle(0.5)
    page.evaluate("([scale, x, y]) => { const ds = window.app.canvas.ds; ds.scale = scale; ds.offset = [x, y];"
                  " window.app.canvas.setDirty(true, true); }",
                  [scale, PICTURE_PAD / scale - x0, PICTURE_PAD / scale - y0])
    frontend.settle(1.0)
    png.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(png))
    with Image.open(png) as picture:
        picture.load()
        if jpg is not None:
            height = round(picture.height * THUMBNAIL_WIDTH / picture.width)
            thumb = picture.convert("RGB").resize((THUMBNAIL_WIDTH, height), Image.LANCZOS)
            thumb.save(jpg, "JPEG", quality=85, optimize=True)
        return picture.size


def wait_for_history(client, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.history(prompt_id)
        status = entry.get("status") or {}
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s (queue: {client.get_json('/queue')})")
