"""pipelines/loading/files.py: the one weight-file reader, on files written by safetensors and torch themselves.

The refusal checks use a pickle whose ``__reduce__`` would create a folder: the folder must not appear, so the
test sees that the code never ran, not only that an error was raised.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from humanref.pipelines.loading.files import is_safetensors, read_state_dict


class LeavesATrace:
    """Unpickling this calls os.mkdir(path): the trace shows whether a reader ran pickled code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 2, generator=g), "a.bias": torch.zeros(3, dtype=torch.float16),
            "b": torch.arange(4)}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_safetensors_with_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path), metadata={"format": "x", "version": "1"})
    sd, meta = read_state_dict(str(path))
    assert_same(sd, tensors())
    assert meta == {"format": "x", "version": "1"}
    save_file(tensors(), str(path))
    assert read_state_dict(str(path))[1] == {}


def test_safetensors_content_under_another_name(tmp_path):
    """The Parts2Whole release ships safetensors as decoupled_attn.pth: read by content, never unpickled."""
    path = tmp_path / "decoupled_attn.pth"
    save_file(tensors(), str(path), metadata={"k": "v"})
    assert is_safetensors(str(path))
    sd, meta = read_state_dict(str(path))
    assert_same(sd, tensors())
    assert meta == {"k": "v"}


@pytest.mark.parametrize("wrap", ["flat", "state_dict", "nested"])
def test_weights_only_pickles(tmp_path, wrap):
    flat = tensors()
    data = {"flat": flat, "state_dict": {"state_dict": flat, "global_step": 3},
            "nested": {"a": {"weight": flat["a.weight"], "bias": flat["a.bias"]}, "b": flat["b"]}}[wrap]
    path = tmp_path / "w.ckpt"
    torch.save(data, str(path))
    assert not is_safetensors(str(path))
    sd, meta = read_state_dict(str(path))
    assert_same(sd, flat)
    assert meta == {}


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_needs_code_is_refused_without_running_it(tmp_path, writer):
    trace = tmp_path / "trace"
    path = tmp_path / "evil.bin"
    data = {"w": torch.zeros(2), "config": LeavesATrace(str(trace))}
    if writer == "torch.save":
        torch.save(data, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f)
    with pytest.raises(ValueError, match=r"evil\.bin is neither safetensors nor .*refused.*weights_only=True.*"
                                         r"needs code"):
        read_state_dict(str(path))
    assert not trace.exists()


def test_a_safetensors_name_is_never_unpickled(tmp_path):
    trace = tmp_path / "trace"
    path = tmp_path / "model.safetensors"
    torch.save({"config": LeavesATrace(str(trace))}, str(path))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        read_state_dict(str(path))
    assert not trace.exists()


@pytest.mark.parametrize("name, content", [("text.bin", b"this is not a model file\n" * 4), ("empty.bin", b""),
                                           ("truncated.pt", b"PK\x03\x04" + b"\x00" * 40)])
def test_not_a_weight_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} is not a readable weight file"):
        read_state_dict(str(path))


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tensors(), str(path))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file"):
        read_state_dict(str(path))


@pytest.mark.parametrize("data", [[torch.zeros(1)], {"w": torch.zeros(1), "step": 3}, {"w": [torch.zeros(1)]}])
def test_not_a_state_dict_of_tensors(tmp_path, data):
    path = tmp_path / "odd.pt"
    torch.save(data, str(path))
    with pytest.raises(ValueError, match=r"odd\.pt does not hold a state dict of tensors"):
        read_state_dict(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors does not exist"):
        read_state_dict(str(tmp_path / "nowhere.safetensors"))


def test_header_length_must_fit_the_file(tmp_path):
    """Eight bytes that read as a length larger than the file, then '{': not safetensors by content."""
    path = tmp_path / "x.bin"
    path.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    assert not is_safetensors(str(path))
    path.write_bytes((2).to_bytes(8, "little") + b"{}")
    assert is_safetensors(str(path))
