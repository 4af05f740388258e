"""UI-format (LiteGraph) workflow -> API-format prompt, with the server's ``GET /object_info``.

ComfyUI itself only converts in the browser (``graphToPrompt``), so this re-implements the parts of the
frontend (comfyui-frontend-package 1.35) that decide what goes into the prompt:

- ``widgets_values`` is positional, one entry per widget, in the order of ``input_order`` (required, then
  optional, then inputs added by frontend extensions such as the image ``upload`` button). Some widgets are
  UI-only and hold a slot without becoming an input: ``control_after_generate`` after an INT named ``seed``
  or ``noise_seed`` (or with ``control_after_generate`` set; a COMBO with it also gets a filter-list slot) and
  the ``upload`` widget of image/video upload combos. Inputs with ``forceInput`` have no widget.
- A linked input (``node.inputs[i].link``) becomes ``[source_id, source_slot]``; links through ``Reroute``
  nodes are followed; a ``PrimitiveNode`` source means the value already sits in the target's widget.
- Muted nodes (mode 2) and bypassed nodes (mode 4) are left out. A link out of a bypassed node is passed
  through to the bypassed node's input of the same type (same slot first, as the frontend does). A required
  input that ends at a muted node, or at a bypassed node with nothing to pass through, is an error.
- Notes (``Note``, ``MarkdownNote``) are dropped. Subgraphs and legacy group nodes are refused with a hint.

Pure stdlib; no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

MODE_ALWAYS, MODE_ON_EVENT, MODE_NEVER, MODE_ON_TRIGGER, MODE_BYPASS = 0, 1, 2, 3, 4

NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPES = frozenset({"Reroute"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})

# Frontend widget constructors that hold exactly one widgets_values slot.
SINGLE_SLOT_WIDGETS = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR",
                                 "IMAGECOMPARE", "CHART", "GALLERIA", "TEXTAREA"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


class ConversionError(ValueError):
    """The workflow cannot be turned into an API prompt; the message names the node."""


@dataclass
class Conversion:
    prompt: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- detection
def is_api_workflow(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def unwrap_api(data: Any) -> Optional[dict]:
    """An API prompt, also when wrapped as a /prompt body ({"prompt": {...}}); None otherwise."""
    if is_api_workflow(data):
        return data
    if isinstance(data, dict) and is_api_workflow(data.get("prompt")):
        return data["prompt"]
    return None


# --------------------------------------------------------------------------------------------- input specs
def _spec(spec: Any) -> tuple[Any, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return spec, {}
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], opts


def _is_combo(type_: Any) -> bool:
    return isinstance(type_, (list, tuple)) or type_ == "COMBO"


def _is_upload_combo(spec: Any) -> bool:
    type_, opts = _spec(spec)
    return _is_combo(type_) and any(opts.get(k) is True for k in UPLOAD_OPTIONS)


@dataclass(frozen=True)
class InputSlot:
    name: str
    type: Any
    options: dict
    required: bool
    widget_slots: int  # widgets_values entries this input owns (0 = socket only)


def widget_slot_count(name: str, spec: Any) -> int:
    """How many widgets_values entries the frontend writes for this input (value + UI-only companions)."""
    type_, opts = _spec(spec)
    if opts.get("forceInput"):
        return 0
    if _is_combo(type_):
        # a combo with control_after_generate gets a control widget and a filter-list widget
        return 3 if opts.get("control_after_generate") else 1
    if type_ == "INT":
        control = opts["control_after_generate"] if "control_after_generate" in opts else name in SEED_NAMES
        return 2 if control else 1
    if type_ == "FLOAT":
        return 2 if opts.get("control_after_generate") else 1
    if type_ in SINGLE_SLOT_WIDGETS:
        return 1
    return 0


def ordered_inputs(info: dict) -> list[InputSlot]:
    """Inputs of an /object_info entry in the frontend's widget order."""
    inputs = info.get("input") or {}
    required = inputs.get("required") or {}
    optional = inputs.get("optional") or {}
    order = info.get("input_order") or {}
    names_req = [n for n in order.get("required", required.keys()) if n in required]
    names_req += [n for n in required if n not in names_req]
    names_opt = [n for n in order.get("optional", optional.keys()) if n in optional]
    names_opt += [n for n in optional if n not in names_opt]
    slots = []
    for n in names_req:
        type_, opts = _spec(required[n])
        slots.append(InputSlot(n, type_, opts, True, widget_slot_count(n, required[n])))
    for n in names_opt:
        type_, opts = _spec(optional[n])
        slots.append(InputSlot(n, type_, opts, False, widget_slot_count(n, optional[n])))
    return slots


def upload_slots(info: dict) -> int:
    """The frontend appends one 'upload' widget after all inputs when a required combo is an upload combo."""
    required = (info.get("input") or {}).get("required") or {}
    return 1 if any(_is_upload_combo(s) for s in required.values()) else 0


def image_upload_inputs(info: dict) -> list[str]:
    """Names of the inputs of a node type that take an uploaded image (LoadImage's 'image')."""
    names = []
    for group in ("required", "optional"):
        for name, spec in ((info.get("input") or {}).get(group) or {}).items():
            type_, opts = _spec(spec)
            if _is_combo(type_) and (opts.get("image_upload") or opts.get("animated_image_upload")):
                names.append(name)
    return names


# --------------------------------------------------------------------------------------------- graph
def _node_label(node: dict) -> str:
    title = node.get("title")
    label = f"node {node.get('id')} ({node.get('type')}"
    return label + (f" '{title}')" if title and title != node.get("type") else ")")


def _links_by_id(links: Iterable[Any]) -> dict[int, tuple[Any, int, Any]]:
    """link id -> (origin node id, origin slot, type); accepts arrays and the dict form of schema 1."""
    out: dict[int, tuple[Any, int, Any]] = {}
    for link in links or []:
        if isinstance(link, dict):
            out[int(link["id"])] = (link["origin_id"], int(link["origin_slot"]), link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            out[int(link[0])] = (link[1], int(link[2]), link[5] if len(link) > 5 else None)
    return out


def _types_match(a: Any, b: Any) -> bool:
    if a in (None, "", "*") or b in (None, "", "*"):
        return True
    sa, sb = set(str(a).split(",")), set(str(b).split(","))
    return bool(sa & sb)


class _Unresolved:
    def __init__(self, reason: str):
        self.reason = reason


_PRIMITIVE = object()


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes: dict[str, dict] = {}
        for node in workflow["nodes"]:
            self.nodes[str(node["id"])] = node
        self.links = _links_by_id(workflow.get("links"))

    def input_link(self, node: dict, index: int) -> Optional[tuple[Any, int, Any]]:
        inputs = node.get("inputs") or []
        if index < 0 or index >= len(inputs):
            return None
        link_id = inputs[index].get("link")
        if link_id is None:
            return None
        if int(link_id) not in self.links:
            raise ConversionError(f"{_node_label(node)}: input '{inputs[index].get('name')}' refers to link "
                                  f"{link_id}, which is not in the workflow's links")
        return self.links[int(link_id)]

    def resolve(self, origin_id: Any, slot: int, want_type: Any, seen: set) -> Any:
        """Follow a link back to a real node output: [id, slot], _PRIMITIVE, or _Unresolved."""
        key = (str(origin_id), slot)
        if key in seen:
            raise ConversionError(f"circular link through node {origin_id}")
        seen.add(key)
        node = self.nodes.get(str(origin_id))
        if node is None:
            raise ConversionError(f"a link starts at node {origin_id}, which is not in the workflow")
        ntype = node.get("type")
        if ntype in PRIMITIVE_TYPES:
            return _PRIMITIVE
        if ntype in REROUTE_TYPES:
            link = self.input_link(node, 0)
            if link is None:
                return _Unresolved(f"the Reroute node {origin_id} has no input")
            return self.resolve(link[0], link[1], want_type, seen)
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return _Unresolved(f"{_node_label(node)} is muted")
        if mode == MODE_BYPASS:
            index = self._bypass_input(node, slot, want_type)
            if index < 0:
                return _Unresolved(f"{_node_label(node)} is bypassed and has no input of type {want_type} "
                                   "to pass through")
            link = self.input_link(node, index)
            if link is None:
                return _Unresolved(f"{_node_label(node)} is bypassed and its input "
                                   f"'{node['inputs'][index].get('name')}' is not connected")
            return self.resolve(link[0], link[1], want_type, seen)
        return [str(origin_id), slot]

    @staticmethod
    def _bypass_input(node: dict, slot: int, want_type: Any) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want_type in (None, "", "*"):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type) \
                and _types_match(inputs[slot].get("type"), want_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _types_match(inp.get("type"), want_type) and inp.get("type") not in (None, "", "*"):
                return i
        return -1


# --------------------------------------------------------------------------------------------- conversion
def ui_to_api(workflow: dict, object_info: dict, strict: bool = False) -> Conversion:
    """Convert a UI-format workflow to an API prompt.

    object_info: GET /object_info of the server that will run it (at least every node type used).
    strict: raise instead of warning when a node's widgets_values do not line up with its inputs.
    """
    if not is_ui_workflow(workflow):
        raise ConversionError("not a UI-format workflow (no 'nodes' list)")
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    subgraph_ids = {s.get("id") for s in subgraphs if isinstance(s, dict)}
    graph = _Graph(workflow)
    prompt: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []

    for nid, node in sorted(graph.nodes.items(), key=lambda kv: (len(kv[0]), kv[0])):
        ntype = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if ntype in NOTE_TYPES or ntype in REROUTE_TYPES or ntype in PRIMITIVE_TYPES:
            continue
        if mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if ntype in subgraph_ids:
            raise ConversionError(f"{_node_label(node)} is a subgraph: subgraphs are not supported; unpack it in "
                                  "ComfyUI (right-click > Unpack Subgraph) and save the workflow again")
        if isinstance(ntype, str) and (ntype.startswith("workflow>") or ntype.startswith("workflow/")):
            raise ConversionError(f"{_node_label(node)} is a group node: convert it back to nodes in ComfyUI "
                                  "and save the workflow again")
        info = object_info.get(ntype)
        if info is None:
            raise ConversionError(f"{_node_label(node)}: the server has no node type '{ntype}' (is the custom "
                                  "node pack that provides it installed and loading without errors?)")
        inputs, node_warnings = _convert_node(graph, node, info)
        warnings += node_warnings
        if strict and node_warnings:
            raise ConversionError("; ".join(node_warnings))
        title = node.get("title") or info.get("display_name") or ntype
        prompt[nid] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    if not prompt:
        raise ConversionError("the workflow has no node to run (all muted, bypassed or notes)")
    return Conversion(prompt, warnings)


def _convert_node(graph: _Graph, node: dict, info: dict) -> tuple[dict[str, Any], list[str]]:
    label = _node_label(node)
    slots = ordered_inputs(info)
    values = node.get("widgets_values")
    warnings: list[str] = []
    by_name: dict[str, Any] = {}
    if isinstance(values, dict):  # some packs serialise widgets by name
        by_name = dict(values)
        values = None
    values = list(values or [])

    expected = sum(s.widget_slots for s in slots) + upload_slots(info)
    # a workflow saved before optional widgets were added at the end has fewer values: they take their defaults
    added_later = 0
    for s in reversed([s for s in slots if s.widget_slots]):
        if s.required:
            break
        added_later += s.widget_slots
    if by_name == {} and len(values) != expected and not 0 < expected - len(values) <= added_later:
        warnings.append(f"{label}: {len(values)} widget values for {expected} widget slots; the node's inputs "
                        "may have changed since the workflow was saved: check the converted values")

    # UI inputs by name (a converted widget input is named after its widget)
    ui_inputs: dict[str, int] = {}
    for i, inp in enumerate(node.get("inputs") or []):
        name = (inp.get("widget") or {}).get("name") or inp.get("name")
        if name is not None:
            ui_inputs.setdefault(name, i)

    out: dict[str, Any] = {}
    pos = 0
    for slot in slots:
        widget_value: Any = None
        has_widget = False
        if slot.widget_slots:
            if by_name:
                has_widget = slot.name in by_name
                widget_value = by_name.get(slot.name)
            elif pos < len(values):
                has_widget = True
                widget_value = values[pos]
                # a control widget after a seed is sometimes missing in old files: only skip what is there
                skip = slot.widget_slots - 1
                if skip and pos + 1 < len(values) and values[pos + 1] not in CONTROL_VALUES:
                    skip = 0 if slot.type == "INT" else skip
                pos += 1 + skip
            else:
                # the workflow predates this input: the frontend would show the input's default
                pos += slot.widget_slots
                default = _default(slot)
                if default is not None:
                    has_widget, widget_value = True, default
        link_index = ui_inputs.get(slot.name)
        link = graph.input_link(node, link_index) if link_index is not None else None
        if link is not None:
            want = (node["inputs"][link_index].get("type")) or slot.type
            resolved = graph.resolve(link[0], link[1], want if not isinstance(want, list) else "COMBO", set())
            if resolved is _PRIMITIVE:
                if has_widget:
                    out[slot.name] = widget_value
                continue
            if isinstance(resolved, _Unresolved):
                if slot.required and not has_widget:
                    raise ConversionError(f"{label}: required input '{slot.name}' cannot be connected: "
                                          f"{resolved.reason}")
                if has_widget:
                    out[slot.name] = widget_value
                continue  # an optional input fed by a bypassed or muted node is left out, as in the frontend
            out[slot.name] = resolved
        elif has_widget:
            out[slot.name] = widget_value
    return out, warnings


def _default(slot: InputSlot) -> Any:
    if "default" in slot.options:
        return slot.options["default"]
    if isinstance(slot.type, (list, tuple)) and slot.type:
        return slot.type[0]
    options = slot.options.get("options")
    if slot.type == "COMBO" and isinstance(options, list) and options:
        return options[0]
    return None

