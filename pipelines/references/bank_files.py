"""Reference banks as files: a cached bank written as safetensors and read back exactly, on any server.

Only a bank encoded ``once at t=0`` can be saved: it holds the writer's captured tokens. An ``every step`` bank
holds the prepared references and the writer model itself (the writer runs again at every sampling step), so
there are no features to save; saving one is refused with a message that says to encode ``once at t=0``.

One safetensors file; every tensor keeps the dtype and values it had in the bank, so a loaded bank samples bit for
bit as the original::

    features.<block>.<r>                    [M, C]  reference r's kept tokens at transformer block <block>
                                                    (``input_4.0``), already multiplied by their mask weights
    projections.<block>.to_k|to_v.weight    [C, C]  a garment bank's trained W'_k, W'_v (optional ``.bias`` [C])
    regions                                 [R, H, W] a garment bank's target regions
    stats.<unet block>.<r>.mean|var         [C]     AdaIN statistics of reference r at UNet block ``middle_0``
                                                    (absent where its mask selects nothing on that block)

Metadata (all strings): ``format`` = ``humanref.reference_bank``, ``format_version`` = ``1``, ``family`` (the
writer's model family as ComfyUI names it, ``SD15``/``SDXL``), ``timing``, ``mask_rule``, ``references`` (a JSON
list with every :class:`ReferenceInfo` field of each reference, written generically, so a field added later
round-trips), ``blocks`` (JSON ``[[block, channels, dropped], ...]`` for every transformer block of the writer in
its order; ``dropped``: the masked-out token count per reference, or null where no features were captured),
``projections`` (JSON list of blocks, or null), ``stats`` (JSON ``{unet block: [present per reference]}``, or
null) and ``content_sha256``, a digest of every tensor's name, dtype, shape and bytes, so a file damaged anywhere
is refused rather than sampled with wrong values. Masks are not stored as pictures: their effect is in the tokens
(weights multiplied in, weight-0 tokens dropped and counted).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from enum import Enum
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ...attention.adain import FeatureStats, UNetBlock
from ...attention.bank import MAX_REFERENCES, CapturedTokens, ReferenceBank, ReferenceInfo, Timing
from ...attention.blocks import BlockKey, block_label
from ...attention.kernels import LinearWeights
from ...attention.masks import MASK_RULES
from ...version import __version__
from ..loading.files import SAFETENSORS_EXTENSION, read_state_dict

FORMAT = "humanref.reference_bank"
FORMAT_VERSION = "1"
# the ReferenceBank fields this format writes (``writer`` is what an ``every step`` bank has instead of features);
# a field added to ReferenceBank must be added here and to the format, or saving a bank that uses it is refused
SAVED_FIELDS = frozenset({"references", "block_channels", "timing", "mask_rule", "features", "family", "projections",
                          "regions", "stats", "writer"})
_BLOCK = re.compile(r"^(input|middle|output)_(\d+)\.(\d+)$")
_UNET_BLOCK = re.compile(r"^(input|middle|output)_(\d+)$")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------- saving
def bank_tensors_and_metadata(bank: ReferenceBank) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The file's tensors (contiguous, CPU, the bank's own dtypes) and metadata; a clear error for a bank that
    cannot be saved."""
    if not bank.cached:
        raise ValueError(f"reference_bank was encoded with timing {Timing.EVERY_STEP.value!r}: it holds the reference "
                         "images and the writer model, which runs again at every sampling step, not features that "
                         f"can be saved. Encode the references with timing {Timing.ONCE.value!r} to save the bank")
    for f in dataclasses.fields(ReferenceBank):
        if f.name not in SAVED_FIELDS and not _is_default(getattr(bank, f.name), f):
            raise ValueError(f"reference_bank has {f.name!r}, which the reference bank file format "
                             f"(version {FORMAT_VERSION}) cannot hold yet; the bank cannot be saved")
    count = len(bank.references)
    tensors: dict[str, Tensor] = {}
    blocks = []
    for key, channels in bank.block_channels.items():
        entries = bank.features.get(key)
        dropped = None
        if entries is not None:
            if len(entries) != count:
                raise ValueError(f"reference_bank block {block_label(key)} has {len(entries)} entries for {count} "
                                 "references")
            dropped = [int(e.dropped) for e in entries]
            for r, e in enumerate(entries):
                tensors[f"features.{block_label(key)}.{r}"] = e.tokens
        blocks.append([block_label(key), int(channels), dropped])
    unknown = [block_label(k) for k in bank.features if k not in bank.block_channels]
    if unknown:
        raise ValueError(f"reference_bank has features of block {unknown[0]}, which its writer does not have")
    projections = None
    if bank.projections is not None:
        projections = []
        for key, pair in bank.projections.items():
            projections.append(block_label(key))
            for proj, lin in zip(("to_k", "to_v"), pair):
                tensors[f"projections.{block_label(key)}.{proj}.weight"] = lin.weight
                if lin.bias is not None:
                    tensors[f"projections.{block_label(key)}.{proj}.bias"] = lin.bias
    if bank.regions is not None:
        tensors["regions"] = bank.regions
    stats = None
    if bank.stats is not None:
        stats = {}
        for point, per_ref in bank.stats.items():
            name = f"{point[0]}_{point[1]}"
            stats[name] = [s is not None for s in per_ref]
            for r, s in enumerate(per_ref):
                if s is not None:
                    tensors[f"stats.{name}.{r}.mean"] = s.mean
                    tensors[f"stats.{name}.{r}.var"] = s.var
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    try:
        references = json.dumps([dataclasses.asdict(info) for info in bank.references])
    except TypeError as e:
        raise ValueError(f"reference_bank's reference information cannot be written as JSON ({e})") from e
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": bank.family,
        "timing": bank.timing.value,
        "mask_rule": bank.mask_rule,
        "references": references,
        "blocks": json.dumps(blocks),
        "projections": json.dumps(projections),
        "stats": json.dumps(stats),
        "content_sha256": content_digest(tensors),
        "created_by": f"HumanRef {__version__}",
    }
    return tensors, metadata


def save_reference_bank(bank: ReferenceBank, folder: str, stem: str, counter: int = 1) -> str:
    """Write ``bank`` as ``<folder>/<stem>_<counter:05>_.safetensors`` with the first counter from ``counter`` whose
    file does not exist (the name is claimed with an exclusive create, so two saves never share or overwrite a
    file). Returns the path."""
    tensors, metadata = bank_tensors_and_metadata(bank)
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    while True:
        path = os.path.join(folder, f"{stem}_{counter:05}_{SAFETENSORS_EXTENSION}")
        try:
            with open(path, "xb"):
                pass
            break
        except FileExistsError:
            counter += 1
    try:
        save_file(tensors, path, metadata=metadata)
    except BaseException:
        os.remove(path)
        raise
    return path


def content_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- loading
def load_reference_bank(path: str) -> ReferenceBank:
    """Read and validate a saved bank; every problem is a ValueError naming the file and what is
    wrong (not a bank, another format version, damaged)."""
    name = os.path.basename(path)
    if not name.lower().endswith(SAFETENSORS_EXTENSION):
        raise ValueError(f"reference bank {name}: only {SAFETENSORS_EXTENSION} files are read")
    try:
        tensors, metadata = read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"reference bank {name} is damaged or not a safetensors file ({e}); save the bank "
                            "again or copy the file again") from e
    return parse_reference_bank(tensors, metadata, name)


def parse_reference_bank(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]],
                         name: str) -> ReferenceBank:
    """A bank from a file's tensors and metadata, checked against the format."""
    metadata = metadata or {}
    found = metadata.get("format")
    if found != FORMAT:
        raise ValueError(f"{name} is not a HumanRef reference bank (its metadata 'format' is {found!r}, a bank's "
                            f"is {FORMAT!r}); save one with Save Reference Bank")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"reference bank {name} has format version {version!r}; this HumanRef reads version "
                            f"{FORMAT_VERSION} (a bank saved by a newer HumanRef: update HumanRef, or encode the "
                            "references again)")
    digest = metadata.get("content_sha256")
    if digest is None:
        raise ValueError(f"reference bank {name} has no 'content_sha256' in its metadata (not written by Save "
                            "Reference Bank?)")
    if digest != content_digest(tensors):
        raise ValueError(f"reference bank {name} is damaged: its tensors do not match the checksum written when it "
                            "was saved; save the bank again or copy the file again")
    return _parse_checked(dict(tensors), metadata, name)


def _parse_checked(tensors: dict[str, Tensor], metadata: Mapping[str, str], name: str) -> ReferenceBank:
    def bad(what: str) -> ValueError:
        return ValueError(f"reference bank {name}: {what}")

    timing = metadata.get("timing")
    if timing != Timing.ONCE.value:
        raise bad(f"timing is {timing!r}; a saved bank is always {Timing.ONCE.value!r}")
    mask_rule = metadata.get("mask_rule")
    if mask_rule not in MASK_RULES:
        raise bad(f"mask_rule is {mask_rule!r}, expected one of {MASK_RULES}")
    family = metadata.get("family", "")
    references = _references(_json(metadata, "references", bad), bad)
    count = len(references)

    blocks = _json(metadata, "blocks", bad)
    if not isinstance(blocks, list) or not blocks:
        raise bad("'blocks' must be a non-empty JSON list of [block, channels, dropped]")
    channels: dict[BlockKey, int] = {}
    features: dict[BlockKey, tuple[CapturedTokens, ...]] = {}
    for item in blocks:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and _is_int(item[1])
                and item[1] > 0):
            raise bad(f"'blocks' entry {item!r} is not [block, channels, dropped]")
        key = _block_key(item[0], bad)
        if key in channels:
            raise bad(f"block {item[0]} is listed twice")
        channels[key] = c = item[1]
        dropped = item[2]
        if dropped is None:
            continue
        if not (isinstance(dropped, list) and len(dropped) == count and all(_is_int(d) and d >= 0 for d in dropped)):
            raise bad(f"block {item[0]}: dropped must be {count} counts >= 0, found {dropped!r}")
        entries = []
        for r, d in enumerate(dropped):
            t = _take(tensors, f"features.{item[0]}.{r}", bad)
            if t.ndim != 2 or t.shape[1] != c or t.dtype not in _FLOATS:
                raise bad(f"features.{item[0]}.{r} is {t.dtype} {tuple(t.shape)}; expected floating [tokens, {c}]")
            entries.append(CapturedTokens(t, d))
        features[key] = tuple(entries)

    projections = None
    listed = _json(metadata, "projections", bad)
    if listed is not None:
        if not isinstance(listed, list):
            raise bad("'projections' must be a JSON list of blocks or null")
        projections = {}
        for label in listed:
            key = _block_key(label, bad) if isinstance(label, str) else None
            if key not in channels:
                raise bad(f"'projections' names {label!r}, which is not a block of the bank")
            c = channels[key]
            pair = []
            for proj in ("to_k", "to_v"):
                w = _take(tensors, f"projections.{label}.{proj}.weight", bad)
                b = tensors.pop(f"projections.{label}.{proj}.bias", None)
                if tuple(w.shape) != (c, c) or (b is not None and tuple(b.shape) != (c,)):
                    raise bad(f"projections.{label}.{proj} has shape {tuple(w.shape)} (bias "
                              f"{None if b is None else tuple(b.shape)}); expected [{c}, {c}] and [{c}]")
                pair.append(LinearWeights(w, b))
            projections[key] = (pair[0], pair[1])

    regions = tensors.pop("regions", None)
    if regions is not None and (regions.ndim != 3 or regions.shape[0] != count):
        raise bad(f"regions has shape {tuple(regions.shape)}; expected [{count}, height, width]")

    stats = None
    listed = _json(metadata, "stats", bad)
    if listed is not None:
        if not isinstance(listed, dict):
            raise bad("'stats' must be a JSON object {block: [present per reference]} or null")
        stats = {}
        for label, present in listed.items():
            m = _UNET_BLOCK.match(label)
            if not m or not (isinstance(present, list) and len(present) == count
                             and all(isinstance(p, bool) for p in present)):
                raise bad(f"'stats' entry {label!r}: {present!r} is not {count} true/false values for a block like "
                          "'middle_0'")
            point: UNetBlock = (m.group(1), int(m.group(2)))
            per_ref: list[Optional[FeatureStats]] = []
            for r, here in enumerate(present):
                if not here:
                    per_ref.append(None)
                    continue
                mean, var = (_take(tensors, f"stats.{label}.{r}.{part}", bad) for part in ("mean", "var"))
                if mean.ndim != 1 or mean.shape != var.shape:
                    raise bad(f"stats.{label}.{r} has mean {tuple(mean.shape)} and var {tuple(var.shape)}; expected "
                              "two [channels]")
                per_ref.append(FeatureStats(mean, var))
            stats[point] = tuple(per_ref)

    if tensors:
        raise bad(f"unexpected tensor {sorted(tensors)[0]!r} (not part of format version {FORMAT_VERSION})")
    if not features:
        raise bad("it holds no features")
    return ReferenceBank(references, channels, Timing.ONCE, mask_rule, features=features, family=family,
                         projections=projections, regions=regions, stats=stats)


def _json(metadata: Mapping[str, str], key: str, bad) -> Any:
    if key not in metadata:
        raise bad(f"metadata has no {key!r}")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise bad(f"metadata {key!r} is not valid JSON ({e})") from None


def _take(tensors: dict[str, Tensor], key: str, bad) -> Tensor:
    if key not in tensors:
        raise bad(f"tensor {key!r} is missing")
    return tensors.pop(key)


def _block_key(label: str, bad) -> BlockKey:
    m = _BLOCK.match(label)
    if not m:
        raise bad(f"{label!r} is not a transformer block like 'input_4.0'")
    return m.group(1), int(m.group(2)), int(m.group(3))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------- reference info
def _references(items: Any, bad) -> tuple[ReferenceInfo, ...]:
    """ReferenceInfo from JSON objects, field by field from the dataclass itself: a new field with a default reads
    older files, a new required one is named when a file lacks it, an unknown one is refused."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_REFERENCES:
        raise bad(f"'references' must be a JSON list of 1 to {MAX_REFERENCES} references")
    hints = typing.get_type_hints(ReferenceInfo)
    fields = {f.name: f for f in dataclasses.fields(ReferenceInfo)}
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise bad(f"reference {i} is not a JSON object")
        unknown = sorted(set(item) - set(fields))
        if unknown:
            raise bad(f"reference {i} has {unknown[0]!r}, which this HumanRef does not know (a bank saved by a newer "
                      "HumanRef: update HumanRef)")
        values = {}
        for fname, f in fields.items():
            if fname not in item:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise bad(f"reference {i} has no {fname!r}, which every reference needs")
                continue
            try:
                values[fname] = _typed(item[fname], hints[fname])
            except (TypeError, ValueError):
                raise bad(f"reference {i}: {fname} is {item[fname]!r}, expected {_type_name(hints[fname])}") from None
        out.append(ReferenceInfo(**values))
    return tuple(out)


def _typed(value: Any, hint: Any) -> Any:
    """``value`` read from JSON as type ``hint`` (bool, int, float, str, an Enum, tuples, Optional); TypeError if
    it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(value, arg)
            except (TypeError, ValueError):
                pass
        raise TypeError(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(hint)
        return tuple(_typed(v, a) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(hint)
        return value
    if hint is int:
        if not _is_int(value):
            raise TypeError(hint)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(hint)
        return float(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(hint)
        return value
    raise TypeError(f"no JSON reading for {hint!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


def _is_default(value: Any, f: dataclasses.Field) -> bool:
    """Whether a bank field holds its default (a field without one never does)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return False
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, RuntimeError, ValueError):  # a tensor against a default: not the default
        return False
