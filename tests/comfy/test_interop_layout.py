"""Model patches that change the self-attention token layout, next to HumanRef's reference patch.

ComfyUI's own HyperTile node (comfy_extras/nodes_hypertile.py: the queries are cut into tiles, the batch grows)
and Token Merging (comfy_extras/nodes_tomesd.py, ComfyUI's port of tomesd: a third of the queries merged, and a
test-local variant merging the whole attn1 input, keys and values too, as tomesd's own patch of
BasicTransformerBlock does) hand our attn1 replace queries that are not one per latent pixel. Reference
attention needs that layout (masks and regions are laid on the block's grid), so such a run is refused with a
message that names the block and the cause, whichever order the nodes are applied in; a run where the
references are inactive (outside start/end percent) steps aside and is exactly the other patch alone; and the
model is left clean for the next run.
"""
from __future__ import annotations

import pytest
import torch
from helpers import LATENT, ksample, make_bank

from humanref.pipelines.references.patch import apply_reference_patch

LAYOUT_MESSAGE = r"HumanRef: block \S+ got \d+ query tokens for a \d+x\d+ grid\. A patch that changes the token layout"


def first_output(out):
    """A V3 node's first output (HyperTile returns a plain tuple, TomePatchModel an io.NodeOutput)."""
    return out[0] if isinstance(out, tuple) else out.result[0]


def hypertile(model):
    """ComfyUI's HyperTile node; tile 32 px = 4 latent pixels, so the tiny model's 6x10 grid is cut in two."""
    from comfy_extras.nodes_hypertile import HyperTile

    return first_output(HyperTile.execute(model, tile_size=32, swap_size=2, max_depth=0, scale_depth=False))


def tome(model, ratio: float = 0.3):
    """ComfyUI's Token Merging node (TomePatchModel): merges queries of the full-resolution blocks."""
    from comfy_extras.nodes_tomesd import TomePatchModel

    return first_output(TomePatchModel.execute(model, ratio))


def tomesd_block(model, ratio: float = 0.5):
    """tomesd's own behaviour: the attn1 input itself is merged (queries, keys and values alike) and the output is
    unmerged, on the full-resolution blocks (tomesd.patch.ToMeBlock with merge_attn=True, max_downsample=1)."""
    from comfy_extras.nodes_tomesd import get_functions

    state = {}

    def merge(n, context, value, extra_options):
        m, state["u"] = get_functions(n, ratio, extra_options["original_shape"])
        merged = m(n)
        return merged, merged, merged

    def unmerge(out, extra_options):
        return state.pop("u")(out)

    patched = model.clone()
    patched.set_model_attn1_patch(merge)
    patched.set_model_attn1_output_patch(unmerge)
    return patched


LAYOUT_PATCHES = {"HyperTile": hypertile, "TomePatchModel": tome, "tomesd block merge": tomesd_block}


@pytest.mark.parametrize("name", sorted(LAYOUT_PATCHES))
def test_layout_patches_do_change_the_layout_and_run_alone(tiny_model, conds, name):
    """Sanity: each patch really changes what attn1 sees on this model, and samples fine without HumanRef."""
    seen = []
    probe = LAYOUT_PATCHES[name](tiny_model)

    def record(q, k, v, extra_options):
        seen.append((q.shape[1], extra_options["activations_shape"][-2] * extra_options["activations_shape"][-1]))
        return q, k, v

    probe.set_model_attn1_patch(record)  # runs after the layout patch
    out = ksample(probe, conds, LATENT)
    assert torch.isfinite(out).all()
    assert any(tokens != grid for tokens, grid in seen), seen
    assert (out - ksample(tiny_model, conds, LATENT)).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(LAYOUT_PATCHES))
@pytest.mark.parametrize("order", ["layout patch after HumanRef", "layout patch before HumanRef"])
def test_token_layout_patch_is_refused_with_a_clear_message(tiny_model, conds, bank, name, order):
    layout = LAYOUT_PATCHES[name]
    if order == "layout patch after HumanRef":
        model = layout(apply_reference_patch(tiny_model, bank))
    else:
        model = apply_reference_patch(layout(tiny_model), bank)
    with pytest.raises(RuntimeError, match=LAYOUT_MESSAGE) as info:
        ksample(model, conds, LATENT)
    assert "HyperTile, Token Merging" in str(info.value)


@pytest.mark.parametrize("mode", ["concat", "strict", "blend", "dual"])
def test_every_mode_refuses_hypertile(tiny_model, conds, bank, mode):
    regions = torch.ones(len(bank.references), 12, 20) if mode == "dual" else None
    model = hypertile(apply_reference_patch(tiny_model, bank, mode=mode, strength=0.5, regions=regions))
    with pytest.raises(RuntimeError, match=LAYOUT_MESSAGE):
        ksample(model, conds, LATENT)


def test_writer_with_a_layout_patch_is_refused(tiny_model, clip_vae, conds):
    """An 'every step' bank whose writer carries HyperTile: the writer's capture refuses it by name."""
    writer = hypertile(tiny_model)
    step_bank = make_bank(writer, clip_vae, timing="every step")
    with pytest.raises(RuntimeError, match=r"HumanRef: writer block .* tokens for a \d+x\d+ grid; a patch that "
                                           r"changes the token layout \(HyperTile, ToMe\) is on the writer model"):
        ksample(apply_reference_patch(tiny_model, step_bank), conds, LATENT)
    with pytest.raises(RuntimeError, match=r"writer block .* \(HyperTile, ToMe\) is on the writer model"):
        make_bank(writer, clip_vae, timing="once at t=0")


@pytest.mark.parametrize("name", sorted(LAYOUT_PATCHES))
def test_inactive_references_step_aside_exactly(tiny_model, conds, bank, step_bank, name):
    """References switched off for the whole run (start = end = 100%): the layout patch alone, bit for bit."""
    layout = LAYOUT_PATCHES[name]
    for b in (bank, step_bank):
        patched = layout(apply_reference_patch(tiny_model, b, start_percent=1.0, end_percent=1.0))
        torch.manual_seed(0)  # HyperTile draws its tiling from torch's global generator
        expected = ksample(layout(tiny_model), conds, LATENT)
        torch.manual_seed(0)
        assert torch.equal(ksample(patched, conds, LATENT), expected)


def test_model_is_clean_after_a_refused_run(tiny_model, conds, bank, step_bank):
    before = ksample(tiny_model, conds, LATENT)
    patched_before = ksample(apply_reference_patch(tiny_model, step_bank), conds, LATENT)
    for b in (bank, step_bank):
        for layout in LAYOUT_PATCHES.values():
            with pytest.raises(RuntimeError, match=LAYOUT_MESSAGE):
                ksample(layout(apply_reference_patch(tiny_model, b)), conds, LATENT)
    assert torch.equal(ksample(tiny_model, conds, LATENT), before)
    assert torch.equal(ksample(apply_reference_patch(tiny_model, step_bank), conds, LATENT), patched_before)
    to = tiny_model.model_options.get("transformer_options", {})
    assert "attn1" not in to.get("patches_replace", {}) and "attn1_patch" not in to.get("patches", {})
