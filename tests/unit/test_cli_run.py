"""The runner's argument checks that need no server: --set names a real input; a pack copy in custom_nodes."""
from __future__ import annotations

import os

import pytest

from humanref.cli.run import UsageError, apply_sets, check_input_name
from humanref.cli.server import PACK_ROOT, LocalComfyUI, installed_copy

KSAMPLER_INPUTS = ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                   "latent_image", "denoise"]


def ksampler() -> dict:
    return {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "model": ["4", 0]}}


def test_a_misspelt_input_is_an_error_listing_the_real_inputs():
    with pytest.raises(UsageError) as e:
        check_input_name("13", ksampler(), "stepz", KSAMPLER_INPUTS)
    text = str(e.value)
    assert "13.stepz" in text and "KSampler" in text and "did you mean 'steps'" in text
    assert "its inputs are: model, seed, steps, cfg" in text


def test_a_declared_input_not_yet_in_the_prompt_is_accepted():
    check_input_name("13", ksampler(), "denoise", KSAMPLER_INPUTS)  # optional/absent in the prompt: still real


def test_without_the_server_declarations_the_prompt_inputs_are_the_reference():
    check_input_name("13", ksampler(), "steps", [])
    with pytest.raises(UsageError, match="its inputs are: seed, steps, cfg, model"):
        check_input_name("13", ksampler(), "stepz", [])


def test_apply_sets_refuses_before_changing_anything():
    prompt = {"13": ksampler()}
    with pytest.raises(UsageError):
        apply_sets(prompt, [("13", "steps", 4), ("13", "stepz", 4)], None)
    assert prompt["13"]["inputs"]["steps"] == 4 and "stepz" not in prompt["13"]["inputs"]


def fake_comfyui(root, pack_name: str = None, pyproject: str = None):
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "custom_nodes" / "some_other_pack").mkdir()
    if pack_name:
        folder = root / "custom_nodes" / pack_name
        folder.mkdir()
        (folder / "pyproject.toml").write_text(pyproject or '[project]\nname = "humanref"\nversion = "0.0.9"\n')
    return root


def test_a_humanref_copy_in_custom_nodes_is_found_whatever_its_folder_name(tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI", "ComfyUI-HumanRef")
    assert installed_copy(str(comfy)) == (os.path.realpath(comfy / "custom_nodes" / "ComfyUI-HumanRef"), "0.0.9")


def test_other_packs_and_disabled_copies_are_not_taken_for_humanref(tmp_path):
    comfy = fake_comfyui(tmp_path / "a", "other", '[project]\nname = "humanref-extras"\nversion = "1"\n')
    assert installed_copy(str(comfy)) is None
    comfy = fake_comfyui(tmp_path / "b", "humanref.disabled")
    assert installed_copy(str(comfy)) is None


def test_the_private_server_links_this_copy_only_when_comfyui_has_none(tmp_path):
    import json

    bare = LocalComfyUI(str(fake_comfyui(tmp_path / "bare")))
    bare.tmp = str(tmp_path / "t1")
    os.makedirs(bare.tmp)
    config = json.loads(open(bare._write_config()).read())
    link = os.path.join(config["humanref_pack"]["custom_nodes"], "humanref")
    assert os.path.realpath(link) == str(PACK_ROOT)

    with_copy = LocalComfyUI(str(fake_comfyui(tmp_path / "installed", "humanref")))
    with_copy.tmp = str(tmp_path / "t2")
    os.makedirs(with_copy.tmp)
    config = json.loads(open(with_copy._write_config()).read())
    assert "humanref_pack" not in config
    assert not os.path.exists(os.path.join(with_copy.tmp, "custom_nodes", "humanref"))


def test_progress_text_frames_and_run_warnings():
    """A node's text (ComfyUI's binary event 3) and the HumanRef nodes' ``humanref_warnings`` become one list of
    warnings for the runner, each once."""
    import struct

    from humanref.cli.client import RunResult, parse_progress_text

    frame = struct.pack(">I", 3) + struct.pack(">I", 2) + b"13" + "\u26a0 the pose is stretched".encode()
    assert parse_progress_text(frame) == ("13", "\u26a0 the pose is stretched")
    assert parse_progress_text(struct.pack(">I", 1) + b"\x00" * 12) is None  # a preview image
    result = RunResult("p", {}, outputs={"5": {"humanref_warnings": ["the left hand is left out"]}, "9": {}},
                       node_texts={"5": ["\u26a0 the left hand is left out"], "13": ["\u26a0 the pose is stretched"]})
    assert result.warnings() == [("5", "the left hand is left out"), ("13", "the pose is stretched")]


def test_progress_names_the_nodes_comfyui_reused_from_its_cache():
    """A re-run executes only what changed; the cached nodes send no ``executing`` event, so the progress line
    names them (a count alone left the user unsure whether the HumanRef nodes ran at all)."""
    import io

    from humanref.cli.run import Progress

    prompt = {"1": {"class_type": "CheckpointLoaderSimple"}, "8": {"class_type": "HumanRef_ReferenceEncoder"},
              "13": {"class_type": "KSampler"}}
    stream = io.StringIO()
    progress = Progress(prompt, stream)
    progress("execution_cached", {"nodes": ["1", "8"]})
    progress("executing", {"node": "13"})
    progress("progress", {"node": "13", "value": 3, "max": 3})
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == ["cached: 2 node(s): 1 CheckpointLoaderSimple, 8 HumanRef_ReferenceEncoder",
                     "node 13 KSampler", "node 13 KSampler  3/3"]
    assert progress.done_nodes == 3


def test_saved_reference_banks_are_downloaded_with_the_pictures(tmp_path):
    """Save Reference Bank lists its file in its UI output as SaveImage lists images; the runner (and the batch
    command, which saves through the same function) downloads both, each under its sub-folder."""
    from humanref.cli.client import RunResult
    from humanref.cli.run import save_outputs
    from humanref.nodes.model_files import SAVED_BANKS_UI_KEY

    served = {("portrait_00001_.png", "HumanRef"): b"png", ("bank_00001_.safetensors", "HumanRef/reference_banks"):
              b"bank", ("preview.png", ""): b"temp"}

    class Client:
        def view(self, filename, subfolder="", type_="output"):
            return served[(filename, subfolder)]

    outputs = {"15": {"images": [{"filename": "portrait_00001_.png", "subfolder": "HumanRef", "type": "output"}]},
               "20": {SAVED_BANKS_UI_KEY: [{"filename": "bank_00001_.safetensors",
                                            "subfolder": "HumanRef/reference_banks", "type": "output"}]},
               "21": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}}
    saved = save_outputs(Client(), RunResult("p", {}, outputs), str(tmp_path))
    assert saved == [str(tmp_path / "HumanRef" / "portrait_00001_.png"),
                     str(tmp_path / "HumanRef" / "reference_banks" / "bank_00001_.safetensors")]
    assert (tmp_path / "HumanRef" / "reference_banks" / "bank_00001_.safetensors").read_bytes() == b"bank"
