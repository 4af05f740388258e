"""The browser tier's shared code (the tests and the screenshot script): a models folder holding the tiny
synthetic models under the file names the shipped workflows use, the README's install step that puts the example
inputs into a server's input folder, and a driver for the ComfyUI page in headless chromium that opens workflows
the way a user does and reports what the frontend complains about and how the graph is laid out.

Nothing here writes into the repository except :func:`capture_graph` (the explicit screenshot command).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # e2e_support, also for screenshots.py
from e2e_support import INPUTS, REPO, UI_NAMES, UI_WORKFLOWS

DOCS = REPO / "docs"
README = REPO / "README.md"
WORKFLOW_NAMES = tuple(UI_NAMES)  # the workflows by method; their file names (the template cards) are UI_NAMES

# Debian's chromium (apt-get install chromium); HUMANREF_CHROMIUM overrides. Never a downloaded browser.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu")
VIEWPORT = {"width": 1600, "height": 1000}

# Server flags: --disable-api-nodes also stops the frontend asking api.comfy.org for release notes (the
# tier runs offline; that request would fail with a console error).
SERVER_ARGS = ("--disable-api-nodes",)

# The loader nodes of the shipped workflows: the model file (the node's first widget value) lives in this
# ComfyUI model folder. The browser tier installs the tiny model of that folder under the shipped name, so the
# graphs load as a user with the real models sees them (no missing-models dialog) and run unchanged. An optional
# loader ships inactive (muted or bypassed) with no file chosen ("").
MODEL_LOADERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "ControlNetLoader": "controlnet",
    "LoraLoaderModelOnly": "loras",
    "HumanRef_MimicBrushLoader": "mimicbrush",
    "HumanRef_Parts2WholeLoader": "parts2whole",
    "HumanRef_HandGeneratorLoader": "hand_generator",
}
# Loaders whose value is a folder (a whole release): the missing-models dialog only knows files, so the About note
# says where the folder goes instead.
RELEASE_FOLDER_LOADERS = frozenset({"HumanRef_Parts2WholeLoader"})
# Where the missing-models dialog's downloads come from (the frontend allows these hosts).
MODEL_HOSTS = ("https://huggingface.co/",)
ABOUT_TITLE = "About this workflow"

# What a CPU user edits after loading: small images, few steps (node id -> widget name -> value). Nothing else
# changes; model names, prompts, seeds and every other setting stay as shipped.
SMALL_RUN = {
    "references": {12: {"width": 128, "height": 192}, 13: {"steps": 3}},
    "parts2whole": {12: {"width": 64, "height": 96}, 13: {"steps": 3}},
    "mimicbrush": {7: {"resolution": 256}, 8: {"steps": 2}},
    "hands": {5: {"resolution": 64, "steps": 2, "width": 128, "height": 192}, 9: {"steps": 3}},
    "anydressing": {14: {"width": 128, "height": 192}, 15: {"steps": 3}},
    "references_likeness": {12: {"width": 128, "height": 192}, 13: {"steps": 3}},
}

# The sizes of the images each small run saves (SaveImage outputs, sorted).
EXPECTED_SIZES = {
    "references": [(128, 192)],
    "parts2whole": [(64, 96)],
    "mimicbrush": None,  # pasted back at the source image's size: filled in by expected_sizes()
    "hands": [(64, 64), (64, 64), (128, 192)],  # two hand crops and the outpainted body
    "anydressing": [(128, 192)],
    "references_likeness": [(128, 192)] * 4,  # the portrait and one heatmap per reference
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


def prepare_server(client, input_dir: Optional[str] = None) -> list[str]:
    """What a user has done before opening the workflows: the README's install step run against the server's
    input folder (input_dir; None: leave the inputs out), and a returning user's profile (the first-run
    templates dialog does not pop up by itself; the tests open the template browser through the menu,
    deterministically). Returns what the install step put into the input folder."""
    installed = install_example_inputs(input_dir) if input_dir is not None else []
    returning_user(client)
    return installed


def returning_user(client) -> None:
    status, body = client.post_json("/settings/Comfy.TutorialCompleted", True)
    if status != 200:
        raise RuntimeError(f"POST /settings/Comfy.TutorialCompleted: HTTP {status}: {body}")


def load_workflow(name: str) -> dict:
    """The shipped UI workflow of a method (WORKFLOW_NAMES)."""
    with open(UI_WORKFLOWS[name], encoding="utf-8") as f:
        return json.load(f)


def active(node: dict) -> bool:
    """Runs when queued (mode 0; 2 is muted, 4 bypassed)."""
    return node.get("mode", 0) == 0


def loader_models(workflow: dict, only_active: bool = True) -> list[tuple[str, str, dict]]:
    """(model folder, value, node) of the workflow's loader nodes (MODEL_LOADERS)."""
    return [(MODEL_LOADERS[n["type"]], n["widgets_values"][0], n) for n in workflow["nodes"]
            if n["type"] in MODEL_LOADERS and (active(n) or not only_active)]


def needed_models(workflow: dict) -> set[str]:
    """The models the missing-models dialog must list when absent, as it writes them ("folder / file"): the
    files the running (active) loaders load; a release folder is not a file the dialog can check."""
    return {f"{folder} / {value}" for folder, value, node in loader_models(workflow)
            if node["type"] not in RELEASE_FOLDER_LOADERS}


# ---------------------------------------------------------------------------------------------- example inputs
def readme_input_commands() -> dict[str, str]:
    """The README install section's commands that copy the example inputs: {"posix": "cp ...", "windows":
    "copy ..."}, each as written, without a trailing comment."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Install into ComfyUI\n(.*?)(?=^## )", text, re.M | re.S)
    if section is None:
        raise RuntimeError("README.md has no '## Install into ComfyUI' section")
    posix = re.findall(r"^\s*(cp \S*workflows/inputs/\S+ \S+)", section.group(1), re.M)
    windows = re.findall(r"(copy \S*workflows\\inputs\\\S+ [^`\s]+)", section.group(1))
    if len(posix) != 1 or len(windows) != 1:
        raise RuntimeError(f"README.md's install section should copy the example inputs with one cp line and its "
                           f"Windows copy form; found {posix + windows}")
    return {"posix": posix[0], "windows": windows[0]}


def install_example_inputs(input_dir: str) -> list[str]:
    """Run the README's cp line exactly as written, from custom_nodes/ of a ComfyUI layout whose humanref/ is
    this repository and whose input/ is input_dir (a server's input folder). Returns input_dir's files after."""
    command = readme_input_commands()["posix"]
    with tempfile.TemporaryDirectory(prefix="humanref-layout-") as layout:
        custom_nodes = Path(layout) / "custom_nodes"
        custom_nodes.mkdir()
        (custom_nodes / "humanref").symlink_to(REPO, target_is_directory=True)
        (Path(layout) / "input").symlink_to(Path(input_dir).resolve(), target_is_directory=True)
        proc = subprocess.run(["bash", "-c", command], cwd=str(custom_nodes), capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"the README's step {command!r} failed: {proc.stderr}")
    return input_files(input_dir)


def input_files(input_dir: str) -> list[str]:
    """The files in an input folder (ComfyUI itself makes the subfolder 3d/ there at start)."""
    return sorted(p.name for p in Path(input_dir).iterdir() if p.is_file())


def workflow_images(workflow: dict) -> set[str]:
    """The input-folder files the workflow's image loaders (LoadImage, LoadImageMask) name."""
    return {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("LoadImage", "LoadImageMask")}


# ---------------------------------------------------------------------------------------------- models
def shipped_models() -> list[tuple[str, str]]:
    """(model folder, file name) of every loader widget in the shipped workflows (muted nodes included)."""
    found = set()
    for name in WORKFLOW_NAMES:
        found |= {(folder, value) for folder, value, _ in loader_models(load_workflow(name), only_active=False)
                  if value}
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
      const unchosen = n.mode !== 0 && w.value === '';  // an optional node left off, its file not chosen yet
      if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value) && !unchosen)
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
    def open(self) -> Frontend:
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
        """Workflow templates browser: the module's section, the card's thumbnail, a click on the card of the
        method `name` (its file is UI_NAMES[name]). Returns what the card showed (title and the thumbnail's
        natural size)."""
        self.menu("Browse Templates")
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(module, exact=True).click()
        card = self.page.get_by_test_id(f"template-workflow-{UI_NAMES[name]}")
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

    def layout(self) -> dict:
        return self.page.evaluate(LAYOUT_JS, {"about": ABOUT_TITLE, "overlay": list(OVERLAYS)})

    def missing_models(self) -> Optional[list[str]]:
        """The models the missing-models dialog lists ("folder / file"), or None when it is not shown."""
        for text in self.dialogs():
            if text.startswith("Missing Models"):
                return sorted(line for line in text.splitlines() if re.fullmatch(r"\S+ / \S+", line))
        return None


# Screen space the page's own controls cover on the canvas at VIEWPORT (pixels from the left, top, right and bottom
# edges: the side bar, the tab bar and workflow name, the Run bar's row, the canvas controls): what must be in the
# first view has to be inside the rest.
OVERLAYS = (70, 90, 20, 90)

# How the loaded graph reads on screen, measured with the frontend's own objects and rules:
# - zoom: the canvas scale and the frontend's low-detail threshold (below it every node is drawn as a blank box;
#   LiteGraph.Canvas.MinFontSizeForLOD / (NODE_TEXT_SIZE * sqrt(devicePixelRatio)));
# - group title bars (the group's colour strip, font_size * 1.4 high) covered by a node (its bounding rect,
#   title included), and group titles wider than their group;
# - node titles the frontend truncates (it cuts a title wider than the node's width minus two title heights);
# - the About note: its text, whether its markdown fits in the node, whether it is whole in the first view
#   (the visible canvas area less the OVERLAYS).
LAYOUT_JS = """({about, overlay}) => {
  const c = window.app.canvas, g = window.app.graph;
  const ctx = document.createElement('canvas').getContext('2d');
  const overlaps = (a, b) => a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3];
  const out = {scale: c.ds.scale, threshold: c._lowQualityZoomThreshold, low_quality: c.low_quality,
               covered_group_titles: [], wide_group_titles: [], cut_node_titles: [], about: []};
  for (const gr of g._groups) {
    const bar = [gr.pos[0], gr.pos[1], gr.size[0], gr.titleHeight];
    for (const n of g._nodes)
      if (overlaps(bar, Array.from(n.boundingRect)))
        out.covered_group_titles.push(`group "${gr.title}": title bar under node ${n.id} (${n.getTitle()})`);
    ctx.font = `${gr.font_size}px ${LiteGraph.GROUP_FONT}`;
    const width = ctx.measureText(gr.title).width + 4;  // drawn 4 px (LGraphGroup.padding) in from the left
    if (width > gr.size[0]) out.wide_group_titles.push(`group "${gr.title}": title ${Math.ceil(width)} px wide, ` +
                                                        `group ${gr.size[0]}`);
  }
  for (const n of g._nodes) {
    if (n.collapsed) continue;
    ctx.font = n.titleFontStyle;
    const title = String(n.getTitle() ?? '');
    const room = n.size[0] - 2 * LiteGraph.NODE_TITLE_HEIGHT;
    if (ctx.measureText(title).width > room)
      out.cut_node_titles.push(`node ${n.id} (${n.type}): "${title}" is ${Math.ceil(ctx.measureText(title).width)}` +
                               ` px, room for ${room}`);
  }
  const [vx, vy, vw, vh] = c.visible_area, s = c.ds.scale;
  const view = [vx + overlay[0] / s, vy + overlay[1] / s, vw - (overlay[0] + overlay[2]) / s,
                vh - (overlay[1] + overlay[3]) / s];
  for (const n of g._nodes.filter((n) => n.type === 'MarkdownNote' && n.title === about)) {
    const [x, y, w, h] = Array.from(n.boundingRect);
    const text = n.widgets?.[0]?.value ?? '';
    const box = n.widgets?.[0]?.element?.querySelector('.tiptap');  // the rendered markdown (0 high off screen)
    out.about.push({id: n.id, text, in_first_view: x >= view[0] && y >= view[1] && x + w <= view[0] + view[2] &&
                                                    y + h <= view[1] + view[3],
                    text_fits: !!box && box.clientHeight > 0 && box.scrollHeight <= box.clientHeight});
  }
  return out;
}"""


# ---------------------------------------------------------------------------------------------- pictures
PICTURE_MAX_WIDTH = 2000  # pixels; larger graphs are drawn smaller (all text still drawn: no low-detail mode)
PICTURE_PAD = 40

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


def capture_graph(frontend: Frontend, png: Path) -> tuple[int, int]:
    """Screenshot the loaded graph as the page draws it: focus mode (no menus or side bars), no minimap,
    canvas menu or stats, the whole graph in view at up to 100 % zoom. Writes png; returns the picture's size.
    Changes the page's settings: use a server of its own."""
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
