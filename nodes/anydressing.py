"""GarmentLoRAExtractor: AnyDressing's GarmentsNet, one writer pass over any set of garments -> REFERENCE_BANK."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipelines.anydressing.weights import load_garment_weights
from ..pipelines.anydressing.pipeline import build_garment_bank, garment_regions, prepare_garments
from .types import ReferenceBankType

GARMENTS = 6
DEFAULT_SLOTS = ("upper", "lower", "hat", "shoes", "bag", "outer")
NO_WEIGHTS = "none (training-free)"
FOLDER = "garment_weights"


def weight_files() -> list[str]:
    import folder_paths

    from .. import register_model_folders

    register_model_folders()  # already done when ComfyUI loaded the pack; needed in-process (tests, scripts)
    return [NO_WEIGHTS] + list(folder_paths.get_filename_list(FOLDER))


class GarmentLoRAExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("writer", tooltip="GarmentsNet: any SD1.5 UNet (training-free: the checkpoint you "
                                             "sample with). Its cross-attention is removed for this pass."),
            io.Vae.Input("vae"),
            io.Combo.Input("garment_weights", options=weight_files(), default=NO_WEIGHTS,
                           tooltip="Trained garment weights (models/garment_weights, HumanRef format): per-slot "
                                   "LoRA for the writer and W'_k/W'_v for the dressing attention. none = "
                                   "training-free (no LoRA, W' = the reader's own to_k/to_v)."),
            io.Int.Input("max_side", default=768, min=0, max=4096, step=8,
                         tooltip="Long side of the garments for the writer (aspect kept, multiples of 8); 0 keeps "
                                 "the size."),
        ]
        for i in range(1, GARMENTS + 1):
            inputs += [
                io.Image.Input(f"garment_{i}", optional=i > 1,
                               tooltip="One garment image (RGB; every garment the same size)."),
                io.Mask.Input(f"mask_{i}", optional=True,
                              tooltip="The garment's pixels (1 = garment): background tokens are left out."),
                io.String.Input(f"slot_{i}", default=DEFAULT_SLOTS[i - 1],
                                tooltip="The garment's slot (upper, lower, hat, ...): picks its LoRA in the "
                                        "garment weights; every garment needs its own slot."),
                io.Mask.Input(f"region_{i}", optional=True,
                              tooltip="Where this garment goes on the generated image (e.g. the torso for the "
                                      "upper garment): elsewhere nothing attends to it. Beyond the paper."),
            ]
        return io.Schema(
            node_id="HumanRef_GarmentLoRAExtractor",
            display_name="Garment LoRA Extractor (HumanRef)",
            category="HumanRef",
            description="AnyDressing's GarmentsNet: runs the writer once at t=0 with cross-attention removed, "
                        "every garment its own batch item with its slot's LoRA, and outputs a bank of garment "
                        "features for MaskedSharedAttentionPatch in dual mode (Dressing-Attention).",
            inputs=inputs,
            outputs=[ReferenceBankType.Output(display_name="garment_bank")],
        )

    @classmethod
    def execute(cls, writer, vae, garment_weights, max_side, **slots) -> io.NodeOutput:
        inputs = [(i, slots.get(f"garment_{i}"), slots.get(f"mask_{i}"), slots.get(f"slot_{i}", DEFAULT_SLOTS[i - 1]))
                  for i in range(1, GARMENTS + 1)]
        garments = prepare_garments(inputs, max_side)
        regions = garment_regions([(i, slots.get(f"region_{i}")) for i in range(1, GARMENTS + 1)], garments)
        weights = None
        if garment_weights and garment_weights != NO_WEIGHTS:
            import folder_paths

            weights = load_garment_weights(folder_paths.get_full_path_or_raise(FOLDER, garment_weights))
        return io.NodeOutput(build_garment_bank(writer, vae, garments, weights, regions))


NODES = [GarmentLoRAExtractor]
