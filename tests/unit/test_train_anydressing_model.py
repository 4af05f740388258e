"""training/garment_model.py, losses.py and loop.py helpers against float64 naive references and the engine.

The writer processor must route each garment row to its own slot's LoRA; the reader processor must compute
the engine's dual attention (attention/kernels.py) with masked-out garment tokens left out, and the garment
attention mass the localization loss uses must equal the dual term's softmax probabilities summed per garment.
"""
from __future__ import annotations

import os

import pytest
import torch
from diffusers.models.attention_processor import Attention
from naive import naive_attention, naive_attention_probs

from humanref.attention.bank import select_tokens
from humanref.attention.masks import project_mask
from humanref.training.anydressing.model import (
    GarmentAdapters,
    GarmentAttnProcessor,
    ReaderPass,
    WriterPass,
    dual_attention_with_mass,
    grids_for,
)
from humanref.training.loop import EpochSampler, find_resume, resolve_precision, step_generator
from humanref.training.losses import localization_loss, texture_loss

DT = torch.float64
C, HEADS, RANK = 16, 2, 3
SLOTS = ("upper", "lower", "hat")
GRID = (4, 3)


def make(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS, bias=False).to(DT)
    adapters = GarmentAdapters(["b0"], [C], SLOTS, RANK, alpha=2.0, own_kv=[(attn.to_k.weight, attn.to_v.weight)],
                               generator=torch.Generator().manual_seed(seed)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero up (trained), W' different from W
        adapters.lora_up[0].copy_(torch.randn(adapters.lora_up[0].shape, generator=g, dtype=DT))
        adapters.w_k[0].add_(0.3 * torch.randn(C, C, generator=g, dtype=DT))
        adapters.w_v[0].add_(0.3 * torch.randn(C, C, generator=g, dtype=DT))
    return attn, adapters, GarmentAttnProcessor(adapters, 0)


def to_out(attn, x):
    return x @ attn.to_out[0].weight.detach().T + attn.to_out[0].bias.detach()


def test_writer_rows_get_their_own_slot_lora_and_are_captured():
    attn, adapters, proc = make()
    slot_ids = torch.tensor([2, 0, 1, 0])
    x = torch.randn(4, GRID[0] * GRID[1], C, dtype=DT)
    writer = WriterPass(slot_ids, None, [GRID])
    out = proc(attn, x, garment=writer)
    scale = 2.0 / RANK
    for row, s in enumerate(slot_ids.tolist()):
        q, k, v = [x[row] @ (getattr(attn, f"to_{n}").weight.detach()
                             + scale * adapters.lora_up[0][p, s].detach() @ adapters.lora_down[0][p, s].detach()).T
                   for p, n in enumerate("qkv")]
        expected = to_out(attn, naive_attention(q[None], k[None], v[None], HEADS))
        torch.testing.assert_close(out[row:row + 1], expected)
    assert torch.equal(writer.captured[0][0], x) and writer.captured[0][1] is None
    # the same rows with other slots give other outputs: routing is by row
    other = proc(attn, x, garment=WriterPass(torch.tensor([0, 0, 0, 0]), None, [GRID]))
    assert torch.equal(other[1], out[1]) and (other[0] - out[0]).abs().max() > 1e-3
    # no pass: the plain self-attention of the frozen weights
    plain = proc(attn, x)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    torch.testing.assert_close(plain, to_out(attn, naive_attention(q, k, v, HEADS)))


def garment_masks(count, seed):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(count, 32, 24, generator=g) > 0.75).to(DT)
    masks[:, :8, :8] = 1.0  # never empty
    return masks


def test_reader_is_the_engines_dual_attention_with_masked_tokens_left_out():
    attn, adapters, proc = make(1)
    b, g, n = 2, 3, GRID[0] * GRID[1]
    xg = torch.randn(b * g, n, C, dtype=DT)
    masks = garment_masks(b * g, 2)
    writer = WriterPass(torch.arange(g).repeat(b), masks, [GRID])
    proc(attn, xg, garment=writer)
    x = torch.randn(b, n, C, dtype=DT)
    reader = ReaderPass(writer, g, lam=0.7, grids=[GRID], want_maps=True)
    out = proc(attn, x, garment=reader)
    weights = project_mask(masks, GRID, "parts2whole")
    wk, wv = adapters.w_k[0].detach(), adapters.w_v[0].detach()
    q, k, v = attn.to_q(x).detach(), attn.to_k(x).detach(), attn.to_v(x).detach()
    mass, _ = reader.maps[0]
    assert reader.maps[0][1] == GRID and mass.shape == (b, g, n)
    for i in range(b):
        kept = [select_tokens(xg[i * g + j], weights[i * g + j]) for j in range(g)]  # the bank's own rule
        tokens = torch.cat([t.tokens for t in kept])
        assert tokens.shape[0] < g * n  # some tokens really are left out
        dual = naive_attention(q[i:i + 1], (tokens @ wk.T)[None], (tokens @ wv.T)[None], HEADS)
        expected = to_out(attn, naive_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], HEADS) + 0.7 * dual)
        torch.testing.assert_close(out[i:i + 1], expected)
        probs = naive_attention_probs(q[i:i + 1], (tokens @ wk.T)[None], HEADS)  # [1, heads, N, M]
        owners = torch.repeat_interleave(torch.arange(g), torch.tensor([t.tokens.shape[0] for t in kept]))
        expected_mass = torch.stack([probs[..., owners == j].sum(-1) for j in range(g)], -1).mean(1)[0]
        torch.testing.assert_close(mass[i].T, expected_mass)
    rows = ReaderPass(writer, g, lam=0.7, grids=[GRID], rows=torch.tensor([0.0, 1.0]))
    gated = proc(attn, x, garment=rows)
    torch.testing.assert_close(gated[0], proc(attn, x)[0])  # row 0 sees no garments (the uncond of joint CFG)
    torch.testing.assert_close(gated[1], out[1])


def test_mass_without_the_extra_heads_path_agrees():
    """More garments than channels per head: the separate one-hot call gives the same mass."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, 4, generator=g, dtype=DT) for _ in range(3))
    bias = torch.zeros(1, 5, dtype=DT)
    bias[0, 1] = float("-inf")
    owners = torch.tensor([0, 1, 2, 3, 4])
    out, mass = dual_attention_with_mass(q, k, v, 2, bias, owners, 5)  # d = 2 < 5 groups
    kept = torch.tensor([0, 2, 3, 4])
    torch.testing.assert_close(out, naive_attention(q, k[:, kept], v[:, kept], 2))
    assert torch.equal(mass[..., 1], torch.zeros_like(mass[..., 1]))
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 5, dtype=DT))


def test_adapters_start_as_the_base_and_export_the_format():
    attn, _, _ = make()
    adapters = GarmentAdapters(["b0"], [C], SLOTS, RANK, 4.0, [(attn.to_k.weight, attn.to_v.weight)])
    assert not adapters.lora_up[0].any()  # LoRA delta 0 at the start: the writer is the base UNet
    assert torch.equal(adapters.w_k[0], attn.to_k.weight.float()) and torch.equal(adapters.w_v[0],
                                                                                  attn.to_v.weight.float())
    lora, dressing = adapters.export(["input_blocks.1.1.transformer_blocks.0"])
    lo = lora["lower"]["input_blocks.1.1.transformer_blocks.0"]
    assert torch.equal(lo.k[0], adapters.lora_down[0][1, 1].detach()) and lo.q[1].shape == (C, RANK)
    assert torch.equal(dressing["input_blocks.1.1.transformer_blocks.0"][1].weight, attn.to_v.weight.float())
    with pytest.raises(ValueError, match="--rank must be at least 1"):
        GarmentAdapters(["b0"], [C], SLOTS, 0, 1.0, [(attn.to_k.weight, attn.to_v.weight)])


def test_grids_follow_the_unets_rounding_up():
    assert grids_for(8, 6, 3) == [(8, 6), (4, 3), (2, 2)]
    assert grids_for(96, 72, 4) == [(96, 72), (48, 36), (24, 18), (12, 9)]


def test_localization_loss_hand_case():
    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 0, :2] = 1.0
    regions[0, 1, 2:] = 1.0
    half = torch.full((1, 2, 4), 0.5)  # a 2x2 grid: every token sees both garments equally
    assert float(localization_loss({0: (half, (2, 2))}, regions)) == pytest.approx(0.25)
    perfect = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]])
    assert float(localization_loss({0: (perfect, (2, 2)), 1: (half, (2, 2))}, regions)) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="no Dressing-Attention maps"):
        localization_loss({}, regions)


def test_texture_loss_weights_edges_inside_the_garments():
    target = -torch.ones(1, 3, 32, 32)
    target[..., :, 16:] = 1.0  # a vertical edge at column 16
    regions = torch.zeros(1, 1, 32, 32)
    regions[..., :16, :] = 1.0  # the top half only
    pred = target.clone()
    pred[..., 20:, :] += 0.5  # errors outside the region: ignored
    assert float(texture_loss(pred, target, regions)) == 0.0
    pred = target + 0.2  # the same error everywhere: the normalised loss is that squared error
    assert float(texture_loss(pred, target, regions)) == pytest.approx(0.04, rel=1e-5)
    far = target.clone()
    far[..., :16, :4] += 1.0  # error far from the edge, inside the region: not an edge pixel
    assert float(texture_loss(far, target, regions)) == 0.0


def test_epoch_sampler_resumes_mid_epoch_and_steps_are_seeded():
    full = EpochSampler(5, seed=3)
    it = iter(full)
    seq = [next(it) for _ in range(13)]
    assert sorted(i for e, i in seq[:5]) == list(range(5)) and {e for e, _ in seq[5:10]} == {1}
    resumed = iter(EpochSampler(5, seed=3, start=7))
    assert [next(resumed) for _ in range(6)] == seq[7:13]
    a, b = step_generator(0, 10), step_generator(0, 10)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert not torch.equal(torch.rand(3, generator=step_generator(0, 11)),
                           torch.rand(3, generator=step_generator(0, 10)))


def test_resume_paths_and_cpu_precision(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (2, 10):
        (folder / f"step_{step:07d}.safetensors").write_bytes(b"x")
        (folder / f"step_{step:07d}.state.pt").write_bytes(b"x")
    assert find_resume("latest", str(tmp_path)) == (str(folder / "step_0000010.safetensors"),
                                                    str(folder / "step_0000010.state.pt"))
    assert find_resume(str(folder / "step_0000002.safetensors"), "")[1] == str(folder / "step_0000002.state.pt")
    with pytest.raises(ValueError, match="no checkpoints in"):
        find_resume("latest", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        find_resume(os.path.join(str(folder), "step_0000005.safetensors"), "")
    assert resolve_precision("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="--mixed-precision bf16 needs a CUDA device"):
        resolve_precision("bf16", torch.device("cpu"))
