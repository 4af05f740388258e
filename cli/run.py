"""``python -m humanref run``: queue a workflow on a ComfyUI server, follow it, save its outputs."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, TextIO

from ..nodes.model_files import SAVED_BANKS_UI_KEY
from .client import ComfyClient, ComfyError, RunResult
from .convert import image_upload_inputs, is_ui_workflow, ui_to_api, unwrap_api

LOAD_IMAGE_LIKE = frozenset({"LoadImage", "LoadImageMask", "LoadImageOutput"})
OUTPUT_KINDS = ("images", "gifs", "videos", "audio", "animated", "3d", SAVED_BANKS_UI_KEY)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class UsageError(ValueError):
    """Bad arguments or an unusable workflow (exit code 2)."""


# ----------------------------------------------------------------------------------------------- loading
def load_workflow(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not JSON: {e}") from None


def to_api(workflow: Any, client: Optional[ComfyClient], log: TextIO) -> tuple[dict, Optional[dict]]:
    """(API prompt, UI workflow or None) from either format; UI format is converted with /object_info."""
    api = unwrap_api(workflow)
    if api is not None:
        return json.loads(json.dumps(api)), None
    if is_ui_workflow(workflow):
        if client is None:
            raise UsageError("a UI-format workflow needs a server to convert it")
        conversion = ui_to_api(workflow, client.object_info())
        for w in conversion.warnings:
            print(f"warning: {w}", file=log)
        return conversion.prompt, workflow
    raise UsageError("not a ComfyUI workflow: expected API format ({id: {class_type, inputs}}) or UI format "
                     "(a LiteGraph graph with 'nodes' and 'links')")


# ----------------------------------------------------------------------------------------------- --set
def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: list[str]) -> list[tuple[str, str, Any]]:
    out = []
    for item in items or []:
        target, sep, value = item.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot or not node or not name:
            raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 13.steps=4")
        out.append((node.strip(), name.strip(), parse_value(value)))
    return out


def find_node(prompt: dict, ref: str) -> str:
    """A node id from an id, a unique title (_meta.title) or a unique class_type."""
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        hits = [nid for nid, n in prompt.items()
                if (n.get("_meta", {}).get("title") if key == "title" else n.get("class_type")) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"--set: {ref!r} matches nodes {', '.join(sorted(hits))}: use a node id")
    raise UsageError(f"--set: no node {ref!r} in the workflow (ids: {', '.join(sorted(prompt, key=_id_key))})")


def _id_key(nid: str) -> tuple:
    return (len(nid), nid)


class Uploader:
    """Uploads local image files for image inputs of LoadImage-like nodes (once per file)."""

    def __init__(self, client: ComfyClient, log: TextIO):
        self.client = client
        self.log = log
        self._types: dict[str, list[str]] = {}
        self._info: dict[str, dict] = {}
        self._done: dict[str, str] = {}

    def node_info(self, class_type: str) -> dict:
        """The server's /object_info entry of a node class ({} when the server does not know it)."""
        if class_type not in self._info:
            try:
                self._info[class_type] = self.client.object_info(class_type).get(class_type) or {}
            except ComfyError:
                self._info[class_type] = {}
        return self._info[class_type]

    def input_names(self, class_type: str) -> list[str]:
        """Every input the node class declares (required, then optional), in the server's order."""
        declared = self.node_info(class_type).get("input") or {}
        return [name for group in ("required", "optional") for name in (declared.get(group) or {})]

    def image_inputs(self, class_type: str) -> list[str]:
        if class_type not in self._types:
            info = self.node_info(class_type)
            names = image_upload_inputs(info)
            if not names and class_type in LOAD_IMAGE_LIKE:
                names = ["image"]
            self._types[class_type] = names
        return self._types[class_type]

    def upload(self, path: str) -> str:
        path = os.path.abspath(path)
        if path not in self._done:
            self._done[path] = self.client.upload_image(path)
            print(f"uploaded {path} as {self._done[path]}", file=self.log)
        return self._done[path]


def check_input_name(nid: str, node: dict, name: str, declared: list[str]) -> None:
    """--set must name a real input: a typo would otherwise be queued as an extra input and silently ignored."""
    given = list(node.get("inputs", {}))
    known = declared or given
    if name in known or name in given:
        return
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"--set {nid}.{name}: node {nid} ({node.get('class_type', '?')}) has no input {name!r}{hint}; "
                     f"its inputs are: {', '.join(known) or 'none'}")


def apply_sets(prompt: dict, sets: list[tuple[str, str, Any]], uploader: Optional[Uploader]) -> None:
    for ref, name, value in sets:
        nid = find_node(prompt, ref)
        node = prompt[nid]
        declared = uploader.input_names(node.get("class_type", "")) if uploader is not None else []
        check_input_name(nid, node, name, declared)
        inputs = node.setdefault("inputs", {})
        if (uploader is not None and isinstance(value, str) and os.path.isfile(value)
                and name in uploader.image_inputs(node.get("class_type", ""))):
            value = uploader.upload(value)
        inputs[name] = value


def upload_from_dir(prompt: dict, folder: str, uploader: Uploader) -> None:
    """--inputs DIR: every image input whose file name exists in DIR is uploaded and pointed at the upload."""
    root = os.path.realpath(folder)
    for node in prompt.values():
        names = uploader.image_inputs(node.get("class_type", ""))
        for name in names:
            value = node.get("inputs", {}).get(name)
            if not isinstance(value, str) or not value.lower().endswith(IMAGE_EXTS):
                continue
            # only files inside DIR: a workflow must not be able to send other local files to the server
            path = os.path.realpath(os.path.join(root, value))
            if os.path.commonpath((root, path)) == root and os.path.isfile(path):
                node["inputs"][name] = uploader.upload(path)


# ----------------------------------------------------------------------------------------------- outputs
def save_outputs(client: ComfyClient, result: RunResult, out_dir: str, include_temp: bool = False) -> list[str]:
    saved = []
    for nid in sorted(result.outputs, key=_id_key):
        node_out = result.outputs[nid] or {}
        for kind in OUTPUT_KINDS:
            for item in node_out.get(kind) or []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                type_ = item.get("type", "output")
                if type_ != "output" and not include_temp:
                    continue
                data = client.view(item["filename"], item.get("subfolder", ""), type_)
                dest_dir = os.path.join(out_dir, *[p for p in item.get("subfolder", "").split("/") if p
                                                   and p not in (".", "..")])
                os.makedirs(dest_dir, exist_ok=True)
                dest = _unique(os.path.join(dest_dir, os.path.basename(item["filename"])))
                with open(dest, "wb") as f:
                    f.write(data)
                saved.append(dest)
    return saved


def _unique(path: str) -> str:
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f"{stem}-{i}{ext}"):
        i += 1
    return f"{stem}-{i}{ext}"


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """Compact progress on stderr: one rewritten line on a terminal, one line per change otherwise."""

    def __init__(self, prompt: dict, stream: TextIO):
        self.prompt = prompt
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.last = ""
        self.node: Optional[str] = None
        self.done_nodes = 0

    def _name(self, nid: Optional[str]) -> str:
        node = self.prompt.get(str(nid), {})
        return f"{nid} {node.get('class_type', '?')}"

    def show(self, text: str, final: bool = False) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        elif text != self.last:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last = text

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "queued":
            self.show(f"queued prompt {data.get('prompt_id')}")
        elif kind == "execution_cached":
            nodes = data.get("nodes") or []
            self.done_nodes += len(nodes)
            if nodes:  # named, so a re-run shows which steps ComfyUI reused (they send no "executing")
                self.show(f"cached: {len(nodes)} node(s): " + ", ".join(self._name(n) for n in nodes))
        elif kind == "executing" and data.get("node") is not None:
            self.node = str(data["node"])
            self.done_nodes += 1
            self.show(f"node {self._name(self.node)}")
        elif kind == "progress":
            node = str(data.get("node") or self.node)
            self.show(f"node {self._name(node)}  {data.get('value')}/{data.get('max')}")
        elif kind == "execution_success":
            self.show("finished", final=True)

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()
