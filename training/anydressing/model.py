"""GarmentsNet and DressingNet as attention processors on ONE frozen diffusers UNet (AnyDressing, paper 4.1-4.2).

The semantics are the inference code's (``pipelines.anydressing`` + the engine's dual mode), re-expressed for
training with autograd:

- writer pass (GarmentsNet): every garment is a batch row at t = 0, cross-attention output zero, and each
  row's q/k/v get its slot's LoRA, ``W x + (alpha / rank) up(down(x))``; every block's self-attention input (the
  norm1 output, the engine's capture point) is kept, weighted by the garment's token mask projected with the
  Parts2Whole rule (tokens of weight 0 are left out, as the bank drops them);
- reader pass (DressingNet, frozen): every self-attention becomes
  ``Attn(x, x) + lambda * Attn(Q_x, F W'_k, F W'_v)`` over the sample's garments' tokens F (all garments in one
  softmax), with the trainable W'_k, W'_v; the dual term's probability mass per garment is recorded for the
  localization loss on request.

What a pass needs travels in ``cross_attention_kwargs={"garment": pass}``, which diffusers hands to every
processor call and to gradient-checkpoint recomputation alike, so a recomputed block does exactly what it did
in the forward pass (no global mode switch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ...attention.lora import slot_lora_delta
from ...attention.masks import project_mask
from ...pipelines.anydressing.weights import MASK_RULE


def grids_for(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The token grids of a UNet on an (h, w) latent: halved (rounding up) per level, as its stride-2 convs."""
    grids = [(height, width)]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))
    return grids


def grid_of(tokens: int, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    for g in grids:
        if g[0] * g[1] == tokens:
            return g
    raise ValueError(f"no token grid with {tokens} tokens among {list(grids)}")


def split_heads(t: Tensor, heads: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(t: Tensor) -> Tensor:
    return rearrange(t, "b h n d -> b n (h d)")


def dual_attention_with_mass(q: Tensor, k: Tensor, v: Tensor, heads: int, bias: Optional[Tensor],
                             owners: Optional[Tensor] = None, groups: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """Attn(q, k, v) with a per-key additive bias [B, M], and optionally each group's attention mass.

    q [B, N, C], k/v [B, M, C]. The mass of group g per query is the sum of the softmax probabilities of g's
    keys (``owners`` [M] long); it is computed by attending to one-hot values, in the same SDPA call as the
    output (extra heads), so the [N, M] probability matrix is never materialised. Returns (out [B, N, C],
    mass [B, N, groups] averaged over heads, or None).
    """
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    mask = None if bias is None else bias.to(dtype=q.dtype, device=q.device)[:, None, None, :]
    if owners is None:
        return merge_heads(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)), None
    d = vh.shape[-1]
    onehot = F.one_hot(owners.to(q.device), groups).to(q.dtype)  # [M, G]
    if groups <= d:
        ind = F.pad(onehot, (0, d - groups)).expand(qh.shape[0], heads, -1, -1)
        out = F.scaled_dot_product_attention(torch.cat([qh, qh], 1), torch.cat([kh, kh], 1),
                                             torch.cat([vh, ind], 1), attn_mask=mask)
        res, mass = out[:, :heads], out[:, heads:, :, :groups]
    else:
        res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        mass = F.scaled_dot_product_attention(qh, kh, onehot.expand(qh.shape[0], heads, -1, -1), attn_mask=mask)
    return merge_heads(res), mass.mean(dim=1)


class GarmentAdapters(nn.Module):
    """The trainable weights: per block, per slot LoRA on q/k/v; per block W'_k, W'_v (init: the block's own).

    ``lora_down[i]`` is [3, slots, rank, C] and ``lora_up[i]`` [3, slots, C, rank] (q, k, v), so a batch of
    garments picks its rows' slots with one gather. Up starts at zero (the writer starts as the base UNet).
    """

    def __init__(self, paths: Sequence[str], widths: Sequence[int], slots: Sequence[str], rank: int, alpha: float,
                 own_kv: Sequence[tuple[Tensor, Tensor]], generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"--rank must be at least 1, got {rank}")
        if alpha <= 0:
            raise ValueError(f"--alpha must be positive, got {alpha}")
        self.paths = list(paths)
        self.slots = tuple(slots)
        self.rank = rank
        self.alpha = float(alpha)
        g = generator or torch.Generator().manual_seed(0)
        downs, ups, wk, wv = [], [], [], []
        for c, (k, v) in zip(widths, own_kv):
            bound = 1.0 / math.sqrt(c)  # kaiming-uniform(a = sqrt(5)) bound of a Linear(c, rank), as PEFT inits down
            downs.append(nn.Parameter((torch.rand(3, len(slots), rank, c, generator=g) * 2 - 1) * bound))
            ups.append(nn.Parameter(torch.zeros(3, len(slots), c, rank)))
            wk.append(nn.Parameter(k.detach().float().clone()))
            wv.append(nn.Parameter(v.detach().float().clone()))
        self.lora_down = nn.ParameterList(downs)
        self.lora_up = nn.ParameterList(ups)
        self.w_k = nn.ParameterList(wk)
        self.w_v = nn.ParameterList(wv)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_delta(self, index: int, proj: int, x: Tensor, slot_ids: Tensor) -> Tensor:
        """scale * up_s(down_s(x)) with each row's own slot s; x [rows, N, C]."""
        down = self.lora_down[index][proj][slot_ids].to(x.dtype)  # [rows, r, C]
        up = self.lora_up[index][proj][slot_ids].to(x.dtype)  # [rows, C, r]
        return slot_lora_delta(x, down, up, self.scale)

    def export(self, comfy_paths: Sequence[str]) -> tuple[dict, dict]:
        """(lora, dressing) in ``pipelines.anydressing.weights``' structures, keyed by ComfyUI block path."""
        from ...attention.kernels import LinearWeights
        from ...pipelines.anydressing.weights import SlotLoRA

        lora: dict[str, dict[str, Any]] = {s: {} for s in self.slots}
        dressing = {}
        for i, path in enumerate(comfy_paths):
            for j, slot in enumerate(self.slots):
                pairs = [(self.lora_down[i][p, j].detach().float().cpu(), self.lora_up[i][p, j].detach().float().cpu())
                         for p in range(3)]
                lora[slot][path] = SlotLoRA(*pairs)
            dressing[path] = (LinearWeights(self.w_k[i].detach().float().cpu()),
                              LinearWeights(self.w_v[i].detach().float().cpu()))
        return lora, dressing

    def load_from(self, weights: Any, comfy_paths: Sequence[str]) -> None:
        """Copy a parsed GarmentWeights file (same slots, rank and blocks) into the parameters."""
        if tuple(weights.slots) != self.slots or weights.rank != self.rank:
            raise ValueError(f"{weights.name} has slots {weights.slots} and rank {weights.rank}; this run trains "
                             f"{self.slots} at rank {self.rank}")
        with torch.no_grad():
            for i, path in enumerate(comfy_paths):
                for j, slot in enumerate(self.slots):
                    lo = weights.lora[slot][path]
                    for p, (down, up) in enumerate((lo.q, lo.k, lo.v)):
                        self.lora_down[i][p, j].copy_(down.float())
                        self.lora_up[i][p, j].copy_(up.float())
                wk, wv = weights.dressing[path]
                if wk.bias is not None or wv.bias is not None:
                    raise ValueError(f"{weights.name}: dressing projections with a bias cannot be trained further here")
                self.w_k[i].copy_(wk.weight.float())
                self.w_v[i].copy_(wv.weight.float())


@dataclass(eq=False)
class WriterPass:
    """One GarmentsNet pass: rows = garments (sample-major: row b * G + g is sample b's garment g)."""

    slot_ids: Tensor  # [rows] long
    masks: Optional[Tensor]  # [rows, H, W] token masks in pixels, or None (every token kept)
    grids: Sequence[tuple[int, int]]
    captured: dict[int, tuple[Tensor, Optional[Tensor]]] = field(default_factory=dict)  # block -> (x, weights)

    def capture(self, index: int, x: Tensor) -> None:
        if index in self.captured:  # a gradient-checkpoint recomputation: keep the forward's tensors
            return
        weights = None
        if self.masks is not None:
            grid = grid_of(x.shape[1], self.grids)
            weights = project_mask(self.masks.to(x.device), grid, MASK_RULE).to(x.dtype)  # [rows, N]
        self.captured[index] = (x, weights)


@dataclass(eq=False)
class ReaderPass:
    """One DressingNet pass over B samples with G garments each, fed by a finished WriterPass."""

    writer: WriterPass
    garments: int
    lam: float = 1.0
    grids: Sequence[tuple[int, int]] = ()
    want_maps: bool = False
    rows: Optional[Tensor] = None  # [B] 1/0: which batch rows see their garments (None: all)
    maps: dict[int, tuple[Tensor, tuple[int, int]]] = field(default_factory=dict)

    def features(self, index: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """(tokens [B, G*N, C] times their weight, key bias [B, G*N] (-inf = left out) or None, owners [G*N])."""
        x, weights = self.writer.captured[index]
        rows, n, c = x.shape
        b, g = rows // self.garments, self.garments
        bias = None
        if weights is not None:
            x = x * weights.unsqueeze(-1)
            bias = torch.zeros_like(weights).masked_fill(weights <= 0, float("-inf")).reshape(b, g * n)
        owners = torch.arange(g, device=x.device).repeat_interleave(n)
        return x.reshape(b, g * n, c), bias, owners

    def record(self, index: int, mass: Tensor, tokens: int) -> None:
        if index not in self.maps:
            self.maps[index] = (mass.transpose(1, 2), grid_of(tokens, self.grids))


class GarmentAttnProcessor:
    """attn1 of every transformer block: plain, writer (slot LoRA + capture) or reader (dual) by the pass."""

    def __init__(self, adapters: GarmentAdapters, index: int) -> None:
        self.adapters = adapters
        self.index = index

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 garment: Optional[WriterPass | ReaderPass] = None) -> Tensor:
        x = hidden_states
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if isinstance(garment, WriterPass):
            garment.capture(self.index, x)
            ids = garment.slot_ids.to(x.device)
            q, k, v = (t + self.adapters.lora_delta(self.index, p, x, ids) for p, t in enumerate((q, k, v)))
        out, _ = dual_attention_with_mass(q, k, v, attn.heads, None)
        if isinstance(garment, ReaderPass) and garment.lam != 0 and self.index in garment.writer.captured:
            feats, bias, owners = garment.features(self.index)
            kk = F.linear(feats.to(q.dtype), self.adapters.w_k[self.index].to(q.dtype))
            vv = F.linear(feats.to(q.dtype), self.adapters.w_v[self.index].to(q.dtype))
            dual, mass = dual_attention_with_mass(q, kk, vv, attn.heads, bias, owners if garment.want_maps else None,
                                                  garment.garments)
            if garment.rows is not None:
                dual = dual * garment.rows.to(dual.dtype).view(-1, 1, 1)
            out = out + garment.lam * dual
            if mass is not None:
                garment.record(self.index, mass, q.shape[1])
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class CrossAttnProcessor:
    """attn2: plain cross-attention, or nothing in the writer pass (GarmentsNet has no cross-attention)."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 garment: Optional[WriterPass | ReaderPass] = None) -> Tensor:
        if isinstance(garment, WriterPass):
            return torch.zeros_like(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        out, _ = dual_attention_with_mass(q, k, v, attn.heads, None)
        return attn.to_out[1](attn.to_out[0](out))


def install(unet: Any, adapters: GarmentAdapters, diffusers_paths: Sequence[str]) -> None:
    """Every attention processor of the UNet: GarmentAttnProcessor on each block's attn1, the rest plain."""
    index = {p: i for i, p in enumerate(diffusers_paths)}
    processors = {}
    for name in unet.attn_processors:
        block, attn = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        if attn == "attn1":
            if block not in index:
                raise ValueError(f"attention {name} is not one of the transformer blocks {list(index)[:3]}...")
            processors[name] = GarmentAttnProcessor(adapters, index[block])
        else:
            processors[name] = CrossAttnProcessor()
    unet.set_attn_processor(processors)


def module_widths(unet: Any, diffusers_paths: Sequence[str]) -> tuple[list[int], list[tuple[Tensor, Tensor]]]:
    """Widths and the reader's own (to_k, to_v) weights of each transformer block's attn1."""
    widths, own = [], []
    for p in diffusers_paths:
        attn1 = unet.get_submodule(p).attn1
        widths.append(int(attn1.to_k.weight.shape[1]))
        own.append((attn1.to_k.weight, attn1.to_v.weight))
    return widths, own

