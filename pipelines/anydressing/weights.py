"""HumanRef's garment-weights format for AnyDressing (no official weights exist), its loader and validator.

One safetensors file holds everything a trained AnyDressing adds to a base SD1.5 UNet:

- per garment slot, a LoRA (down/up) on to_q, to_k and to_v of every writer self-attention (GarmentsNet's
  Garment-Specific Feature Extractor), and
- per dressing layer (every reader self-attention), the separate key/value projections W'_k, W'_v of
  Dressing-Attention.

Key names use ComfyUI's module path of each transformer block inside the diffusion model (the same path for
the writer and the reader, which share an architecture)::

    garment.<slot>.<block path>.attn1.to_q.lora_down.weight   [rank, C]
    garment.<slot>.<block path>.attn1.to_q.lora_up.weight     [C, rank]     (same for to_k, to_v)
    dressing.<block path>.attn1.to_k.weight                    [C, C]        W'_k  (optional .bias [C])
    dressing.<block path>.attn1.to_v.weight                    [C, C]        W'_v  (optional .bias [C])

e.g. ``garment.upper.input_blocks.1.1.transformer_blocks.0.attn1.to_k.lora_up.weight``. The LoRA delta is
``scale * up @ down`` with ``scale = alpha / rank``. Metadata (all strings): ``format`` =
``humanref.garment_weights``, ``format_version`` = ``1``, ``base_model`` (ComfyUI's family name, ``SD15``),
``slots`` (JSON list, e.g. ``["upper", "lower"]``), ``rank``, optional ``alpha`` (default = rank).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...attention.blocks import BlockInfo
from ...attention.kernels import LinearWeights
from ..loading.files import read_state_dict

FORMAT = "humanref.garment_weights"
FORMAT_VERSION = "1"
LORA_PROJS: tuple[str, ...] = ("to_q", "to_k", "to_v")
DRESSING_PROJS: tuple[str, ...] = ("to_k", "to_v")
SLOT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MASK_RULE = "parts2whole"  # garment token masks: a binary mask stays binary on every grid (one-token dilation)
_LORA_KEY = re.compile(r"^garment\.(?P<slot>[A-Za-z0-9_-]+)\.(?P<path>.+)\.attn1\.(?P<proj>to_q|to_k|to_v)"
                       r"\.lora_(?P<part>down|up)\.weight$")
_DRESSING_KEY = re.compile(r"^dressing\.(?P<path>.+)\.attn1\.(?P<proj>to_k|to_v)\.(?P<part>weight|bias)$")


@dataclass(frozen=True, eq=False)
class SlotLoRA:
    """One slot's LoRA on one block's attn1: (down [r, C], up [C, r]) per projection."""

    q: tuple[Tensor, Tensor]
    k: tuple[Tensor, Tensor]
    v: tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class GarmentWeights:
    """A validated garment-weights file. Immutable and shared (never deep-copied)."""

    name: str  # file name, for messages
    base_model: str
    slots: tuple[str, ...]
    rank: int
    alpha: float
    lora: Mapping[str, Mapping[str, SlotLoRA]]  # slot -> block path -> LoRA
    dressing: Mapping[str, tuple[LinearWeights, LinearWeights]]  # block path -> (W'_k, W'_v)
    widths: Mapping[str, int]  # block path -> channels

    def __deepcopy__(self, memo: dict) -> GarmentWeights:
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def slot_index(self, slot: str, input_name: str) -> int:
        if slot not in self.slots:
            raise ValueError(f"{input_name} is slot {slot!r}, which garment_weights {self.name} has no LoRA for "
                             f"(its slots: {', '.join(self.slots)}); use one of those, or no garment_weights")
        return self.slots.index(slot)

    def check_model(self, blocks: Sequence[BlockInfo], family: str, what: str) -> None:
        """The file must be for this architecture: same family, same transformer blocks, same widths."""
        if family and self.base_model != family:
            raise ValueError(f"garment_weights {self.name} is for base model {self.base_model}, but {what} is "
                             f"{family}: use garment weights trained for {family}, or none (training-free)")
        model_paths = {b.path: b.channels for b in blocks}
        missing = sorted(set(model_paths) - set(self.widths))
        extra = sorted(set(self.widths) - set(model_paths))
        if missing or extra:
            raise ValueError(f"garment_weights {self.name} does not match {what}'s transformer blocks "
                             f"({len(model_paths)} in the model, {len(self.widths)} in the file; "
                             f"missing {missing[:3]}, unknown {extra[:3]}): another base architecture?")
        for path, c in model_paths.items():
            if self.widths[path] != c:
                raise ValueError(f"garment_weights {self.name}: block {path} is {self.widths[path]} wide in the "
                                 f"file but {c} in {what}: another base architecture?")


def _meta(metadata: Optional[Mapping[str, str]], name: str) -> tuple[str, tuple[str, ...], int, float]:
    if not metadata or metadata.get("format") != FORMAT:
        raise ValueError(f"garment_weights {name} is not a HumanRef garment-weights file (metadata 'format' must "
                         f"be {FORMAT!r}, found {None if not metadata else metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"garment_weights {name} has format_version {metadata.get('format_version')!r}; this "
                         f"HumanRef reads version {FORMAT_VERSION}")
    base = metadata.get("base_model", "")
    if not base:
        raise ValueError(f"garment_weights {name} has no base_model in its metadata (e.g. 'SD15')")
    try:
        slots = json.loads(metadata.get("slots", ""))
    except json.JSONDecodeError:
        slots = None
    if not isinstance(slots, list) or not slots or not all(isinstance(s, str) for s in slots):
        raise ValueError(f"garment_weights {name}: metadata 'slots' must be a JSON list of slot names, e.g. "
                         f"[\"upper\", \"lower\"], found {metadata.get('slots')!r}")
    bad = [s for s in slots if not SLOT_NAME.match(s)]
    if bad or len(set(slots)) != len(slots):
        raise ValueError(f"garment_weights {name}: slot names must be unique letters, digits, '_' or '-', "
                         f"found {slots}")
    try:
        rank = int(metadata.get("rank", ""))
        alpha = float(metadata.get("alpha", rank))
    except ValueError:
        raise ValueError(f"garment_weights {name}: metadata 'rank' must be an integer and 'alpha' a number, found "
                         f"rank={metadata.get('rank')!r}, alpha={metadata.get('alpha')!r}") from None
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"garment_weights {name}: rank and alpha must be positive, found {rank} and {alpha}")
    return base, tuple(slots), rank, alpha


def parse_garment_weights(sd: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]],
                          name: str) -> GarmentWeights:
    """Validate a state dict + metadata against the format; every problem is a ValueError naming the file."""
    base, slots, rank, alpha = _meta(metadata, name)
    lora_raw: dict[str, dict[str, dict[str, dict[str, Tensor]]]] = {}
    dress_raw: dict[str, dict[str, dict[str, Tensor]]] = {}
    for key, t in sd.items():
        m = _LORA_KEY.match(key)
        if m:
            if m["slot"] not in slots:
                raise ValueError(f"garment_weights {name}: key {key} is for slot {m['slot']!r}, which the metadata "
                                 f"does not list (slots: {', '.join(slots)})")
            lora_raw.setdefault(m["slot"], {}).setdefault(m["path"], {}).setdefault(m["proj"], {})[m["part"]] = t
            continue
        m = _DRESSING_KEY.match(key)
        if m:
            dress_raw.setdefault(m["path"], {}).setdefault(m["proj"], {})[m["part"]] = t
            continue
        raise ValueError(f"garment_weights {name}: unexpected key {key!r} (expected 'garment.<slot>.<block>.attn1."
                         "to_q|to_k|to_v.lora_down|lora_up.weight' or 'dressing.<block>.attn1.to_k|to_v.weight')")
    paths = sorted(dress_raw)
    if not paths:
        raise ValueError(f"garment_weights {name} has no dressing.* projections (W'_k, W'_v)")
    widths: dict[str, int] = {}
    dressing: dict[str, tuple[LinearWeights, LinearWeights]] = {}
    for path in paths:
        pair = []
        for proj in DRESSING_PROJS:
            parts = dress_raw[path].get(proj, {})
            w = parts.get("weight")
            if w is None:
                raise ValueError(f"garment_weights {name}: missing dressing.{path}.attn1.{proj}.weight")
            if w.ndim != 2 or w.shape[0] != w.shape[1]:
                raise ValueError(f"garment_weights {name}: dressing.{path}.attn1.{proj}.weight has shape "
                                 f"{tuple(w.shape)}; expected a square [C, C]")
            c = widths.setdefault(path, int(w.shape[0]))
            if w.shape[0] != c:
                raise ValueError(f"garment_weights {name}: shape mismatch at dressing.{path}.attn1.{proj}.weight "
                                 f"{tuple(w.shape)}, expected [{c}, {c}]")
            b = parts.get("bias")
            if b is not None and tuple(b.shape) != (c,):
                raise ValueError(f"garment_weights {name}: shape mismatch at dressing.{path}.attn1.{proj}.bias "
                                 f"{tuple(b.shape)}, expected [{c}]")
            pair.append(LinearWeights(w, b))
        dressing[path] = (pair[0], pair[1])
    lora: dict[str, dict[str, SlotLoRA]] = {}
    for slot in slots:
        per_path = lora_raw.get(slot, {})
        unknown = sorted(set(per_path) - set(paths))
        if unknown:
            raise ValueError(f"garment_weights {name}: slot {slot!r} has LoRA for block {unknown[0]}, which has no "
                             "dressing projections: blocks must be the same in both parts")
        lora[slot] = {}
        for path in paths:
            c = widths[path]
            found = []
            for proj in LORA_PROJS:
                parts = per_path.get(path, {}).get(proj, {})
                prefix = f"garment.{slot}.{path}.attn1.{proj}"
                down, up = parts.get("down"), parts.get("up")
                if down is None or up is None:
                    which = "lora_down" if down is None else "lora_up"
                    raise ValueError(f"garment_weights {name}: missing {prefix}.{which}.weight (every slot needs "
                                     "q, k and v LoRA on every block)")
                if tuple(down.shape) != (rank, c) or tuple(up.shape) != (c, rank):
                    raise ValueError(f"garment_weights {name}: rank or shape mismatch at {prefix}: lora_down "
                                     f"{tuple(down.shape)}, lora_up {tuple(up.shape)}; expected [{rank}, {c}] and "
                                     f"[{c}, {rank}] (metadata rank {rank}, block width {c})")
                found.append((down, up))
            lora[slot][path] = SlotLoRA(*found)
    return GarmentWeights(name, base, slots, rank, alpha, lora, dressing, widths)


def load_garment_weights(path: str) -> GarmentWeights:
    """Load and validate a garment-weights safetensors file."""
    name = os.path.basename(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"garment_weights {name}: only .safetensors files are read")
    try:
        sd, metadata = read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"garment_weights {name} cannot be read as safetensors ({e}); is the file complete?") from e
    return parse_garment_weights(sd, metadata, name)


def garment_weights_state_dict(
    lora: Mapping[str, Mapping[str, SlotLoRA]],
    dressing: Mapping[str, tuple[LinearWeights, LinearWeights]],
) -> dict[str, Tensor]:
    """The inverse of parsing: key names of the format (for writers of the format: the trainer, tests)."""
    sd: dict[str, Tensor] = {}
    for slot, per_path in lora.items():
        for path, lo in per_path.items():
            for proj, (down, up) in zip(LORA_PROJS, (lo.q, lo.k, lo.v)):
                sd[f"garment.{slot}.{path}.attn1.{proj}.lora_down.weight"] = down
                sd[f"garment.{slot}.{path}.attn1.{proj}.lora_up.weight"] = up
    for path, pair in dressing.items():
        for proj, lin in zip(DRESSING_PROJS, pair):
            sd[f"dressing.{path}.attn1.{proj}.weight"] = lin.weight
            if lin.bias is not None:
                sd[f"dressing.{path}.attn1.{proj}.bias"] = lin.bias
    return sd


def garment_weights_metadata(base_model: str, slots: Iterable[str], rank: int,
                             alpha: Optional[float] = None) -> dict[str, str]:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": base_model,
            "slots": json.dumps(list(slots)), "rank": str(int(rank))}
    if alpha is not None:
        meta["alpha"] = repr(float(alpha))
    return meta


def save_garment_weights(path: str, base_model: str, slots: Sequence[str], rank: int,
                         lora: Mapping[str, Mapping[str, SlotLoRA]],
                         dressing: Mapping[str, tuple[LinearWeights, LinearWeights]],
                         alpha: Optional[float] = None) -> None:
    """Write a file in the format (validated first, so nothing invalid is ever written)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in garment_weights_state_dict(lora, dressing).items()}
    meta = garment_weights_metadata(base_model, slots, rank, alpha)
    parse_garment_weights(sd, meta, os.path.basename(path))
    save_file(sd, path, metadata=meta)


def block_widths_from_unet(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, int]:
    """Transformer block paths and widths of a UNet state dict (keys ``<prefix><path>.attn1.to_k.weight``)."""
    found = {}
    for key, t in sd.items():
        if key.startswith(prefix) and key.endswith(".attn1.to_k.weight"):
            found[key[len(prefix):-len(".attn1.to_k.weight")]] = int(t.shape[1])
    return found


def random_garment_weights(widths: Mapping[str, int], slots: Sequence[str], rank: int, seed: int = 0,
                           lora_scale: float = 0.5, own: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
                           dtype: torch.dtype = torch.float32):
    """Synthetic weights in the format: random LoRAs, and W' = own (to_k, to_v) weights + noise, or random."""
    g = torch.Generator().manual_seed(seed)
    lora: dict[str, dict[str, SlotLoRA]] = {}
    for slot in slots:
        lora[slot] = {}
        for path, c in widths.items():
            pairs = [(lora_scale * torch.randn(rank, c, generator=g) / c ** 0.5,
                      torch.randn(c, rank, generator=g) / rank ** 0.5) for _ in LORA_PROJS]
            lora[slot][path] = SlotLoRA(*[(d.to(dtype), u.to(dtype)) for d, u in pairs])
    dressing = {}
    for path, c in widths.items():
        pair = []
        for i in range(2):
            noise = torch.randn(c, c, generator=g) / c ** 0.5
            w = noise if own is None else own[path][i].float() + 0.1 * noise
            pair.append(LinearWeights(w.to(dtype)))
        dressing[path] = (pair[0], pair[1])
    return lora, dressing
