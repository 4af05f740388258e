"""AnyDressing's garment encoder (GarmentsNet): one writer pass over any set of garments -> a garment bank."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipelines.anydressing.pipeline import build_garment_bank, garment_regions, prepare_garments
from ..pipelines.anydressing.weights import load_garment_weights
from .model_files import GARMENT_WEIGHTS, full_path, list_files
from .notices import shows_warnings
from .slots import collect_slots
from .types import ReferenceBankType

CATEGORY = "HumanRef/AnyDressing"
GARMENTS = 6
DEFAULT_SLOTS = ("upper", "lower", "hat", "shoes", "bag", "outer")
NO_WEIGHTS = "none (training-free)"


class GarmentLoRAExtractor(io.ComfyNode):
    """Node id from the design (saved workflows use it); the menu calls it Garment Encoder, after what it outputs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("writer", tooltip="The model that reads the garments: any SD1.5 model. Without trained "
                                             "weights, the checkpoint you sample with, before any style LoRA. It is "
                                             "not modified (AnyDressing's GarmentsNet)."),
            io.Vae.Input("vae", tooltip="Encodes the garment images: the VAE of your checkpoint."),
            io.Combo.Input("garment_weights", options=[NO_WEIGHTS] + list_files(GARMENT_WEIGHTS), default=NO_WEIGHTS,
                           tooltip="Trained garment weights from models/garment_weights/ (HumanRef's format) make "
                                   "the garments come out more faithfully; 'none (training-free)' works with any "
                                   "SD1.5 checkpoint. A file holds a LoRA per slot for the reading model and the "
                                   "dressing attention's W'_k, W'_v."),
            io.Int.Input("max_side", default=768, min=0, max=4096, step=8,
                         tooltip="Long side the garments are resized to before reading (aspect kept, multiple of "
                                 "8). Larger keeps finer detail but costs memory and time; 0 keeps the size."),
        ]
        for i in range(1, GARMENTS + 1):
            first = "Required. " if i == 1 else ""
            inputs += [
                io.Image.Input(f"garment_{i}", optional=i > 1,
                               tooltip=f"{first}One garment image (RGB, e.g. the garment on a plain background). "
                                       "Every garment must have the same size."),
                io.Mask.Input(f"mask_{i}", optional=True,
                              tooltip=f"Optional: the garment's pixels in garment_{i} (white = garment), so its "
                                      "background is not copied onto the person."),
                io.String.Input(f"slot_{i}", default=DEFAULT_SLOTS[i - 1],
                                tooltip="What kind of garment this is (upper, lower, hat, shoes, bag, outer, ...): "
                                        "picks its part of the garment weights. Every garment needs its own slot."),
                io.Mask.Input(f"region_{i}", optional=True,
                              tooltip=f"Optional: where garment_{i} goes in the generated picture (e.g. a torso "
                                      "mask for the upper garment); elsewhere it has no effect. Any size, only the "
                                      "shape counts. Beyond the paper."),
            ]
        return io.Schema(
            node_id="HumanRef_GarmentLoRAExtractor",
            display_name="Garment Encoder (HumanRef)",
            category=CATEGORY,
            description="Reads garment images into a garment bank (it makes no LoRA file): AnyDressing's GarmentsNet "
                        "runs once, every garment on its own with its slot's LoRA when garment weights are chosen. "
                        "Connect garment_bank to Masked Shared Attention Patch in dual mode (Dressing-Attention).",
            inputs=inputs,
            outputs=[ReferenceBankType.Output("garment_bank")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, writer, vae, garment_weights, max_side, **slots) -> io.NodeOutput:
        given = collect_slots(slots, GARMENTS, ("garment", "mask", "slot", "region"), {"slot": DEFAULT_SLOTS})
        garments = prepare_garments([(i, image, mask, slot) for i, image, mask, slot, _ in given], max_side)
        regions = garment_regions([(i, region) for i, _, _, _, region in given], garments)
        weights = None
        if garment_weights and garment_weights != NO_WEIGHTS:
            weights = load_garment_weights(full_path(GARMENT_WEIGHTS, garment_weights, "garment_weights"))
        return io.NodeOutput(build_garment_bank(writer, vae, garments, weights, regions))
