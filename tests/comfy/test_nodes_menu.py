"""The node menu speaks to users: every node listed, every input with a tooltip that does not open with a paper
term, every behaviour combo's options explained, one category rule, lower-case output names."""
from __future__ import annotations

import importlib
import inspect
import re

import pytest
from comfy_api.latest import io

from humanref.nodes.extension import NODES

METHODS = {"references": "References", "banks": "References", "parts2whole": "Parts2Whole", "mimicbrush": "MimicBrush",
           "hands": "Hands", "anydressing": "AnyDressing"}
PAPER_OPENINGS = ("writer", "sigma", "t=0", "norm1", "w'_k", "w'", "lambda", "masked-out", "garmentsnet")
# Combos whose options are data (files, labels, ComfyUI's samplers) rather than behaviours to explain.
DATA_COMBOS = {"release", "ckpt_name", "hand_generator_name", "garment_weights", "reference_bank_name", "sampler_name",
               "scheduler"}
SCHEMAS = [node.define_schema() for node in NODES]


def ids(schemas=SCHEMAS):
    return [s.node_id for s in schemas]


def test_every_node_class_of_the_package_is_listed_once():
    defined = set()
    for module in METHODS:
        mod = importlib.import_module(f"humanref.nodes.{module}")
        defined |= {c for _, c in inspect.getmembers(mod, inspect.isclass)
                    if issubclass(c, io.ComfyNode) and c.__module__ == mod.__name__}
    assert len(NODES) == len(set(NODES)) and set(NODES) == defined


@pytest.mark.parametrize("node", NODES, ids=ids())
def test_category_is_humanref_slash_the_method_of_its_module(node):
    method = METHODS[node.__module__.rsplit(".", 1)[1]]
    assert node.define_schema().category == f"HumanRef/{method}"


@pytest.mark.parametrize("schema", SCHEMAS, ids=ids())
def test_every_input_has_a_tooltip_in_user_words(schema):
    for inp in schema.inputs:
        tip = (inp.tooltip or "").strip()
        assert len(tip) >= 20, f"{schema.node_id}.{inp.id}: no tooltip"
        assert not tip.lower().startswith(PAPER_OPENINGS), f"{schema.node_id}.{inp.id} opens with a paper term: {tip}"


@pytest.mark.parametrize("schema", SCHEMAS, ids=ids())
def test_every_behaviour_combo_explains_each_option(schema):
    for inp in schema.inputs:
        if isinstance(inp, io.Combo.Input) and inp.id not in DATA_COMBOS and not inp.id.startswith("label_"):
            missing = [o for o in inp.options if o not in inp.tooltip]
            assert not missing, f"{schema.node_id}.{inp.id}: the tooltip does not explain {missing}"


@pytest.mark.parametrize("schema", SCHEMAS, ids=ids())
def test_outputs_have_lower_case_names(schema):
    assert schema.outputs
    for out in schema.outputs:
        assert out.id and re.fullmatch(r"[a-z][a-z0-9_]*", out.id), f"{schema.node_id}: output id {out.id!r}"
        assert out.display_name == out.id, f"{schema.node_id}: output {out.id} shown as {out.display_name!r}"


def test_the_garment_node_says_it_outputs_a_garment_bank():
    schema = next(s for s in SCHEMAS if s.node_id == "HumanRef_GarmentLoRAExtractor")
    assert "LoRA" not in schema.display_name and "garment bank" in schema.description
    assert [o.id for o in schema.outputs] == ["garment_bank"]


def test_why_the_six_slot_nodes_keep_fixed_inputs():
    """Decision record (README: Nodes with six slots): ComfyUI 0.8.0's dynamic inputs cannot carry a reference
    slot without breaking it. An Autogrow template turns a widget into a socket (a label could no longer be typed
    or picked on the node) and the grown inputs are named '<group>.<prefix><n>' (old workflows link 'image_1');
    DynamicCombo renames an option's inputs the same way ('backend.control_net'). If a ComfyUI release changes
    either, this test fails and the choice should be made again."""
    from comfy_api.latest._io import finalize_prefix

    template = io.Autogrow.TemplatePrefix(io.String.Input("label"), prefix="label", min=1, max=6)
    assert template.input.force_input is True  # a typed label becomes an input socket
    assert [i.id for i in template.get_all()][:2] == ["label0", "label1"]
    assert finalize_prefix(["labels"], "label0") == "labels.label0"  # not 'label_1': saved links would not match
    combo = io.DynamicCombo.Input("backend", options=[io.DynamicCombo.Option("training-free", [
        io.ControlNet.Input("control_net")])])
    assert [i.id for i in combo.get_all()] == ["backend", "control_net"]  # expanded as 'backend.control_net'
