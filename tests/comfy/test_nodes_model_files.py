"""nodes/model_files.py: listing and resolving the pack's model folders, against a folder laid out by hand."""
from __future__ import annotations

import os

import pytest

from humanref.nodes.model_files import (
    GARMENT_WEIGHTS,
    MODEL_FOLDERS,
    PARTS2WHOLE,
    full_path,
    list_files,
    register_model_folders,
)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """garment_weights with two files (one in a sub-folder) and a dangling link; parts2whole with one release."""
    import folder_paths

    files, releases = tmp_path / "garment_weights", tmp_path / "parts2whole"
    (files / "sub").mkdir(parents=True)
    (files / "a.safetensors").write_bytes(b"x")
    (files / "sub" / "b.safetensors").write_bytes(b"x")
    os.symlink(files / "deleted.safetensors", files / "gone.safetensors")
    (releases / "good" / "unet").mkdir(parents=True)
    (releases / "good" / "unet" / "config.json").write_text("{}")
    (releases / "empty").mkdir()
    (releases / "file.txt").write_text("")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, GARMENT_WEIGHTS, ([str(files)], set()))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, PARTS2WHOLE, ([str(releases)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return files, releases


def test_register_adds_every_folder_and_keeps_one_already_set(folders):
    import folder_paths

    register_model_folders()
    assert set(MODEL_FOLDERS) <= set(folder_paths.folder_names_and_paths)
    assert folder_paths.get_folder_paths(GARMENT_WEIGHTS) == [str(folders[0])]


def test_list_files_lists_files_and_release_folders(folders):
    assert list_files(GARMENT_WEIGHTS) == ["a.safetensors", "gone.safetensors", "sub/b.safetensors"]
    assert list_files(PARTS2WHOLE) == ["good"]


def test_full_path_resolves_files_and_folders(folders):
    files, releases = folders
    assert full_path(GARMENT_WEIGHTS, "sub/b.safetensors", "garment_weights") == str(files / "sub" / "b.safetensors")
    assert full_path(PARTS2WHOLE, "good", "release") == str(releases / "good")
    assert full_path(PARTS2WHOLE, "empty", "release") == str(releases / "empty")  # the loader says what it lacks


@pytest.mark.parametrize("folder, name, message", [
    (GARMENT_WEIGHTS, "gone.safetensors", r"garment_weights 'gone.safetensors' not found in .*garment_weights: put "
                                          r"trained garment weights .* at models/garment_weights/gone.safetensors$"),
    (GARMENT_WEIGHTS, "sub", r"garment_weights 'sub' not found"),
    (PARTS2WHOLE, "file.txt", r"release 'file.txt' not found .*at models/parts2whole/file.txt/$"),
    (PARTS2WHOLE, "../parts2whole/good", r"release must be a folder name under models/parts2whole/"),
    (GARMENT_WEIGHTS, "", r"garment_weights must be a file name under models/garment_weights/, got ''"),
    (GARMENT_WEIGHTS, "/etc/passwd", r"garment_weights must be a file name"),
])
def test_full_path_errors_name_the_input_the_entry_and_the_folder(folders, folder, name, message):
    with pytest.raises(ValueError, match=message):
        full_path(folder, name, "release" if folder == PARTS2WHOLE else "garment_weights")
