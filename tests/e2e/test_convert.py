"""UI -> API conversion (humanref.cli.convert) against the live server's /object_info."""
import copy
import glob
import json
import os
import sysconfig

import pytest
from e2e_support import API_WORKFLOW, UI_WORKFLOW

from humanref.cli.convert import (
    ConversionError,
    image_upload_inputs,
    is_api_workflow,
    is_ui_workflow,
    ordered_inputs,
    ui_to_api,
    widget_slot_count,
)


@pytest.fixture
def ui():
    with open(UI_WORKFLOW, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def api():
    with open(API_WORKFLOW, encoding="utf-8") as f:
        return json.load(f)


def node(ui, nid):
    return next(n for n in ui["nodes"] if n["id"] == nid)


def add_link(ui, src, src_slot, dst, dst_slot, type_):
    ui["last_link_id"] += 1
    lid = ui["last_link_id"]
    ui["links"].append([lid, src, src_slot, dst, dst_slot, type_])
    return lid


def test_formats_are_detected(ui, api):
    assert is_ui_workflow(ui) and not is_api_workflow(ui)
    assert is_api_workflow(api) and not is_ui_workflow(api)


def test_shipped_ui_workflow_converts_to_the_shipped_api_workflow(ui, api, object_info):
    conversion = ui_to_api(ui, object_info, strict=True)
    assert conversion.warnings == []
    assert conversion.prompt == api
    assert "16" not in conversion.prompt  # the MarkdownNote is UI-only


def test_our_nodes_schemas_match_the_workflow(object_info, ui):
    """widgets_values of our V3 nodes follow the server's input order (required, then optional)."""
    for nid, ntype in ((8, "HumanRef_ReferenceEncoder"), (9, "HumanRef_MaskedSharedAttentionPatch")):
        info = object_info[ntype]
        slots = ordered_inputs(info)
        widgets = [s.name for s in slots if s.widget_slots]
        assert len(widgets) == len(node(ui, nid)["widgets_values"]), widgets
        sockets = [s.name for s in slots if not s.widget_slots]
        assert [i["name"] for i in node(ui, nid)["inputs"]] == sockets


def test_ui_only_widget_slots(object_info, ui):
    ks = object_info["KSampler"]
    seed = next(s for s in ordered_inputs(ks) if s.name == "seed")
    assert seed.widget_slots == 2  # seed + control_after_generate
    assert widget_slot_count("steps", ["INT", {}]) == 1
    assert widget_slot_count("x", ["INT", {"control_after_generate": True}]) == 2
    assert widget_slot_count("x", ["COMBO", {"options": ["a"], "control_after_generate": True}]) == 3
    assert widget_slot_count("x", ["INT", {"forceInput": True}]) == 0
    assert image_upload_inputs(object_info["LoadImageMask"]) == ["image"]
    prompt = ui_to_api(ui, object_info).prompt
    assert prompt["13"]["inputs"]["seed"] == 42 and prompt["13"]["inputs"]["steps"] == 25
    assert prompt["3"]["inputs"] == {"image": "face_mask.png", "channel": "red"}  # no 'upload'
    assert prompt["2"]["inputs"] == {"image": "face.png"}


def test_bypassed_node_passes_its_input_through(ui, object_info):
    node(ui, 9)["mode"] = 4  # bypass the attention patch: KSampler gets the checkpoint's MODEL
    prompt = ui_to_api(ui, object_info).prompt
    assert "9" not in prompt
    assert prompt["13"]["inputs"]["model"] == ["1", 0]


def test_muted_source_of_a_required_input_is_an_error(ui, object_info):
    node(ui, 9)["mode"] = 2
    with pytest.raises(ConversionError, match=r"node 13 \(KSampler\).*'model'.*node 9 .*muted"):
        ui_to_api(ui, object_info)


def test_muted_source_of_an_optional_input_is_left_out(ui, object_info):
    node(ui, 3)["mode"] = 2  # the face mask loader
    prompt = ui_to_api(ui, object_info).prompt
    assert "3" not in prompt
    assert "mask_1" not in prompt["8"]["inputs"]
    assert prompt["8"]["inputs"]["image_1"] == ["2", 0]


def test_reroute_is_followed(ui, object_info):
    ui["last_node_id"] += 1
    rid = ui["last_node_id"]
    vae_in = node(ui, 14)["inputs"][1]
    old = vae_in["link"]
    ui["links"] = [link for link in ui["links"] if link[0] != old]
    to_reroute = add_link(ui, 1, 2, rid, 0, "VAE")
    vae_in["link"] = add_link(ui, rid, 0, 14, 1, "VAE")
    ui["nodes"].append({"id": rid, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": to_reroute}],
                        "outputs": [{"name": "", "type": "VAE", "links": [vae_in["link"]]}],
                        "properties": {"showOutputText": False, "horizontal": False}})
    prompt = ui_to_api(ui, object_info).prompt
    assert prompt["14"]["inputs"]["vae"] == ["1", 2]
    assert str(rid) not in prompt


def test_primitive_node_value_comes_from_the_target_widget(ui, object_info):
    ui["last_node_id"] += 1
    pid = ui["last_node_id"]
    ks = node(ui, 13)
    lid = add_link(ui, pid, 0, 13, len(ks["inputs"]), "INT")
    ks["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": lid})
    ks["widgets_values"][2] = 9  # the primitive writes its value into the target widget
    ui["nodes"].append({"id": pid, "type": "PrimitiveNode", "pos": [0, 0], "size": [210, 82], "flags": {},
                        "order": 0, "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "steps"}, "links": [lid]}],
                        "properties": {"Run widget replace on values": False}, "widgets_values": [9, "fixed"]})
    prompt = ui_to_api(ui, object_info).prompt
    assert prompt["13"]["inputs"]["steps"] == 9
    assert str(pid) not in prompt


def test_links_in_object_form(ui, object_info, api):
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    ui["links"] = [dict(zip(keys, link)) for link in ui["links"]]
    assert ui_to_api(ui, object_info).prompt == api


def test_old_workflow_missing_trailing_widget_gets_the_default(ui, object_info):
    patch = node(ui, 9)
    patch["widgets_values"] = patch["widgets_values"][:-4]  # saved before uncond_sees_references existed
    conversion = ui_to_api(ui, object_info)
    assert conversion.prompt["9"]["inputs"]["uncond_sees_references"] is False
    assert any("node 9" in w for w in conversion.warnings)  # a required widget was missing: check it
    with pytest.raises(ConversionError):
        ui_to_api(ui, object_info, strict=True)


def test_optional_widgets_added_at_the_end_take_their_defaults_quietly(ui, object_info):
    patch = node(ui, 9)
    patch["widgets_values"] = patch["widgets_values"][:-3]  # saved before style_fidelity, reference_weights ...
    conversion = ui_to_api(ui, object_info, strict=True)
    inputs = conversion.prompt["9"]["inputs"]
    assert (inputs["style_fidelity"], inputs["reference_weights"], inputs["weight_type"]) == (1.0, "", "constant")
    assert not conversion.warnings


def test_widget_values_by_name(ui, object_info, api):
    ks = node(ui, 13)
    ks["widgets_values"] = {"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 1.0}
    assert ui_to_api(ui, object_info).prompt["13"] == api["13"]


def test_unknown_node_type_is_named(ui, object_info):
    node(ui, 9)["type"] = "SomePackThatIsNotInstalled"
    with pytest.raises(ConversionError, match="node 9 .*SomePackThatIsNotInstalled.*installed"):
        ui_to_api(ui, object_info)


def test_subgraph_is_refused_with_a_hint(ui, object_info):
    sub_id = "2f0c1e4a-0000-4000-8000-000000000001"
    ui["definitions"] = {"subgraphs": [{"id": sub_id, "name": "packed"}]}
    node(ui, 9)["type"] = sub_id
    with pytest.raises(ConversionError, match="subgraph.*Unpack"):
        ui_to_api(ui, object_info)


def test_original_workflow_is_not_modified(ui, object_info):
    before = copy.deepcopy(ui)
    ui_to_api(ui, object_info)
    assert ui == before


CORE_TYPES = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "RandomNoise",
              "LoadImage", "LoadImageMask", "CLIPTextEncode", "EmptyLatentImage", "SaveImage", "PreviewImage",
              "CheckpointLoaderSimple", "VAEDecode", "VAEEncode", "VAELoader", "LoraLoader", "ControlNetLoader",
              "ControlNetApplyAdvanced", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "ImageScale",
              "KSamplerSelect", "BasicScheduler", "CFGGuider", "ModelSamplingSD3", "ConditioningZeroOut"}


def test_comfyui_templates_convert(object_info):
    """Every UI template shipped with ComfyUI (made by the real frontend) converts; core nodes line up exactly."""
    site = sysconfig.get_paths()["purelib"]
    files = sorted(glob.glob(os.path.join(site, "comfyui_workflow_templates*", "**", "*.json"), recursive=True))
    converted = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not is_ui_workflow(data):
            continue
        try:
            conversion = ui_to_api(data, object_info)
        except ConversionError as e:
            assert "subgraph" in str(e) or "has no node type" in str(e), (path, str(e))
            continue
        converted += 1
        for w in conversion.warnings:
            ntype = w.split("(", 1)[1].split(")", 1)[0].split(" '")[0]
            assert ntype not in CORE_TYPES, (path, w)
        for nid, entry in conversion.prompt.items():
            for name, value in entry["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    assert value[0] in conversion.prompt, (path, nid, name, value)
    if converted == 0:
        pytest.skip("no ComfyUI workflow templates package installed")
    assert converted >= 20
