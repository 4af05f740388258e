"""Save Reference Bank and Load Reference Bank: a bank encoded once, reused on another day or another server.

Saving writes into ComfyUI's output folder only (like SaveImage: a counter in the name, never an overwrite), by
default under output/HumanRef/reference_banks/, which the loader lists next to models/reference_banks/.
"""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..pipelines.references.bank_files import load_reference_bank, save_reference_bank
from .model_files import FOLDERS, REFERENCE_BANKS, SAVED_BANKS_UI_KEY, full_path, list_files
from .notices import show_on_node, shows_warnings
from .types import ReferenceBankType

CATEGORY = "HumanRef/References"
DEFAULT_PREFIX = FOLDERS[REFERENCE_BANKS].output_subfolder + "/bank"


def check_prefix(prefix: str) -> str:
    """A filename_prefix that stays inside the output folder, or an error saying what one looks like."""
    prefix = prefix.strip()
    parts = prefix.replace("\\", "/").split("/")
    if not prefix or os.path.isabs(prefix) or ".." in parts or not parts[-1]:
        raise ValueError(f"filename_prefix must be a file name inside ComfyUI's output folder, optionally with "
                         f"sub-folders, e.g. {DEFAULT_PREFIX!r}; got {prefix!r}")
    return prefix


class SaveReferenceBank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_SaveReferenceBank",
            display_name="Save Reference Bank (HumanRef)",
            category=CATEGORY,
            description="Saves a reference bank (or garment bank) as a file in ComfyUI's output folder, to load it "
                        "later with Load Reference Bank instead of encoding the references again. Only a bank "
                        "encoded 'once at t=0' can be saved. The bank passes through unchanged.",
            inputs=[
                ReferenceBankType.Input("reference_bank",
                                        tooltip="The bank to save: from a Reference Encoder with timing 'once at "
                                                "t=0', or a Garment Encoder. A bank encoded 'every step' cannot be "
                                                "saved (it reads the images again at every step)."),
                io.String.Input("filename_prefix", default=DEFAULT_PREFIX,
                                tooltip="Name of the file inside ComfyUI's output folder; a number is added, so no "
                                        "file is ever overwritten. Under HumanRef/reference_banks/ (the default) "
                                        "Load Reference Bank lists it at once; elsewhere, copy it to "
                                        "models/reference_banks/ to load it."),
            ],
            outputs=[ReferenceBankType.Output("reference_bank")],
            is_output_node=True,
        )

    @classmethod
    @shows_warnings
    def execute(cls, reference_bank, filename_prefix=DEFAULT_PREFIX) -> io.NodeOutput:
        import folder_paths

        prefix = check_prefix(filename_prefix)
        output_dir = folder_paths.get_output_directory()
        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
        path = save_reference_bank(reference_bank, folder, stem, counter)
        name = os.path.basename(path)
        size = os.path.getsize(path)
        show_on_node(f"saved {os.path.relpath(path, output_dir)} ({size / 1e6:.1f} MB)")
        return io.NodeOutput(reference_bank,
                             ui={SAVED_BANKS_UI_KEY: [{"filename": name, "subfolder": subfolder, "type": "output"}]})


class LoadReferenceBank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_LoadReferenceBank",
            display_name="Load Reference Bank (HumanRef)",
            category=CATEGORY,
            description="Loads a reference bank saved by Save Reference Bank, for Masked Shared Attention Patch, "
                        "on this server or another one. It must be used with a model of the same family as the "
                        "one that encoded it.",
            inputs=[
                io.Combo.Input("reference_bank_name", options=list_files(REFERENCE_BANKS),
                               tooltip="A saved bank from models/reference_banks/ or from output/HumanRef/"
                                       "reference_banks/ (where Save Reference Bank writes). To use a bank saved on "
                                       "another server, copy its file into models/reference_banks/."),
            ],
            outputs=[ReferenceBankType.Output("reference_bank")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, reference_bank_name) -> io.NodeOutput:
        path = full_path(REFERENCE_BANKS, reference_bank_name, "reference_bank_name")
        return io.NodeOutput(load_reference_bank(path))
