"""Faults on a running server: an interrupt in the middle of sampling a patched model, and nodes failing in the
middle of a graph. The next prompt must be exactly right: its latent is compared bit for bit with an
uninterrupted run of the same prompt and seed made before any fault, and ComfyUI's cache must have re-run the
sampler on the same (cached) patched model object, so the fault cannot hide behind a cached result.
"""
import copy
import threading

import pytest
import workloads

from humanref.cli.client import ExecutionFailed, Interrupted

SAMPLER = "13"  # the KSampler of workflows/api/references.json
STEPS = 20


def patched_prompt() -> dict:
    """references with two masked references, 'every step' writer, 20 steps, 64x64, a SaveLatent."""
    prompt = workloads.references(seed=77, refs=2, masks=True, size=(64, 64), steps=STEPS, timing="every step")
    workloads.save_latent(prompt, SAMPLER, "faults")
    prompt["15"]["inputs"]["filename_prefix"] = "faults"
    return prompt


def outputs(client, result) -> tuple:
    """(latent tensor, PNG pixels) of a finished run."""
    from safetensors.torch import load

    files = workloads.fetch_outputs(client, result.history)
    latent = [load(v)["latent_tensor"] for k, v in files.items() if k.endswith(".latent")]
    pixels = [workloads.png_pixels(v) for k, v in files.items() if k.endswith(".png")]
    assert len(latent) == 1 and len(pixels) == 1, sorted(files)
    return latent[0], pixels[0]


def evict(client) -> None:
    """Run another graph: ComfyUI's classic cache then drops the patched prompt's sampler and decoder outputs."""
    client.run(workloads.plain_txt2img(seed=5, size=(64, 64), steps=1, prefix="faults_other"), timeout=240)


@pytest.fixture(scope="module")
def uninterrupted(client):
    """The patched prompt run once, start to end, before any fault: (latent, pixels)."""
    workloads.upload_inputs(client)
    return outputs(client, client.run(patched_prompt(), timeout=300))


def check_next_prompt(client, uninterrupted, cached=("1", "8", "9")) -> None:
    """The patched prompt again: sampled anew (on the cached checkpoint, bank and patched model where the fault's
    graph shared them) and bit-identical to the uninterrupted run."""
    result = client.run(patched_prompt(), timeout=300)
    assert SAMPLER not in result.cached, result.cached
    assert set(cached) <= set(result.cached), result.cached
    latent, pixels = outputs(client, result)
    assert latent.equal(uninterrupted[0])
    assert pixels == uninterrupted[1]


def test_interrupt_while_sampling_a_patched_model(client, uninterrupted):
    evict(client)
    seen = []
    sent = threading.Event()

    def on_event(kind, data):
        if kind == "progress" and str(data.get("node")) == SAMPLER:
            seen.append((data["value"], data["max"]))
            if data["value"] >= 1 and not sent.is_set():
                sent.set()
                status, _ = client.post_json("/interrupt", {"prompt_id": data.get("prompt_id")}, timeout=10)
                assert status == 200

    with pytest.raises(Interrupted, match=f"at node {SAMPLER} \\(KSampler\\)"):
        client.run(patched_prompt(), timeout=300, on_event=on_event)
    assert sent.is_set() and seen and max(v for v, _ in seen) < STEPS, seen  # stopped in the middle
    assert workloads.wait_idle(client)
    check_next_prompt(client, uninterrupted)


def test_sampler_failing_on_the_patched_model(client, uninterrupted):
    """HyperTile after our patch: the KSampler fails inside sampling with our message; nothing sticks."""
    prompt = patched_prompt()
    tile = workloads.add_node(prompt, {"class_type": "HyperTile", "inputs": {
        "model": ["9", 0], "tile_size": 32, "swap_size": 1, "max_depth": 0, "scale_depth": False}})
    prompt[SAMPLER]["inputs"]["model"] = [tile, 0]
    with pytest.raises(ExecutionFailed) as info:
        client.run(prompt, timeout=300)
    assert info.value.data["node_id"] == SAMPLER
    assert "A patch that changes the token layout (HyperTile, Token Merging)" in str(info.value)
    check_next_prompt(client, uninterrupted)


def test_humanref_node_failing_in_the_middle(client, uninterrupted):
    """The patch node between encoder and sampler fails (region masks outside dual mode); nothing sticks."""
    prompt = copy.deepcopy(patched_prompt())
    solid = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    region = workloads.add_node(prompt, solid)
    prompt["9"]["inputs"]["region_masks"] = [region, 0]
    with pytest.raises(ExecutionFailed) as info:
        client.run(prompt, timeout=300)
    assert info.value.data["node_id"] == "9"
    assert "region_masks apply to mode 'dual' only" in str(info.value)
    check_next_prompt(client, uninterrupted, cached=("1", "8"))
