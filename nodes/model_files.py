"""The pack's model folders under ComfyUI's models/: their names, registering them, listing and resolving entries.

Importable without ComfyUI (the runner maps these folder names into a ``--models`` directory); ComfyUI's
``folder_paths`` is imported when a function runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFolder:
    holds: str  # what a user puts there, for the "not found" message
    marker: str = ""  # set when entries are folders (a diffusers-style release): the file each must hold
    extensions: tuple[str, ...] = ()  # the file endings listed (empty: every file)
    output_subfolder: str = ""  # also searched: this folder of ComfyUI's output folder (where a save node writes)


PARTS2WHOLE = "parts2whole"
MIMICBRUSH = "mimicbrush"
HAND_GENERATOR = "hand_generator"
GARMENT_WEIGHTS = "garment_weights"
REFERENCE_BANKS = "reference_banks"
FOLDERS: dict[str, ModelFolder] = {
    PARTS2WHOLE: ModelFolder("the Parts2Whole release folders (unet/, reference_unet/, pose_guider/, image_encoder/, "
                             "feature_extractor/, decoupled_attn.pth)", marker=os.path.join("unet", "config.json")),
    MIMICBRUSH: ModelFolder("the official mimicbrush.bin"),
    HAND_GENERATOR: ModelFolder("a trained hand generator (HumanRef's safetensors layout)"),
    GARMENT_WEIGHTS: ModelFolder("trained garment weights (HumanRef's safetensors format)"),
    REFERENCE_BANKS: ModelFolder("a reference bank saved by Save Reference Bank (a .safetensors file)",
                                 extensions=(".safetensors",), output_subfolder="HumanRef/reference_banks"),
}
MODEL_FOLDERS: tuple[str, ...] = tuple(FOLDERS)
# Save Reference Bank's UI output (in /history): the files it wrote, listed as SaveImage lists its images, so the
# runner and the batch command download them with the pictures.
SAVED_BANKS_UI_KEY = "humanref_reference_banks"


def register_model_folders() -> None:
    """Adds each folder as models/<name> unless it is already known (e.g. from extra_model_paths.yaml), and a
    folder's output sub-folder after its other locations (so a file under models/ wins over one of the same name
    under output/); restricts the folder to its file endings.

    ComfyUI's entry point calls it; listing and resolving call it too, so a node built in-process (tests,
    scripts) sees the same folders.
    """
    import folder_paths

    for name in MODEL_FOLDERS:
        spec = FOLDERS[name]
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        if spec.output_subfolder:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.get_output_directory(),
                                                                  *spec.output_subfolder.split("/")))
        paths, extensions = folder_paths.folder_names_and_paths[name]
        if spec.extensions and not set(spec.extensions) <= set(extensions):
            folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | set(spec.extensions))


def list_files(folder: str) -> list[str]:
    """The names a loader's combo offers: the folder's files, or for a release folder its valid sub-folders."""
    import folder_paths

    register_model_folders()
    marker = FOLDERS[folder].marker
    if not marker:
        return list(folder_paths.get_filename_list(folder))
    names = set()
    for base in folder_paths.get_folder_paths(folder):
        if os.path.isdir(base):
            names.update(entry for entry in os.listdir(base) if os.path.isfile(os.path.join(base, entry, marker)))
    return sorted(names)


def full_path(folder: str, name: str, input_name: str) -> str:
    """The path of ``name`` in the folder's locations, or an error naming the input, the entry and the folder."""
    import folder_paths

    register_model_folders()
    spec = FOLDERS[folder]
    kind = "folder" if spec.marker else "file"
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{input_name} must be a {kind} name under models/{folder}/, got {name!r}")
    bases = folder_paths.get_folder_paths(folder)
    for base in bases:
        path = os.path.join(base, name)
        if os.path.isdir(path) if spec.marker else os.path.isfile(path):
            return path
    where = f"models/{folder}/{name}/" if spec.marker else f"models/{folder}/{name}"
    raise ValueError(f"{input_name} {name!r} not found in {', '.join(bases)}: put {spec.holds} at {where}")
