"""The training-free reference nodes: ReferenceEncoder (images -> REFERENCE_BANK), MaskedSharedAttentionPatch,
and the attention maps (ReferenceAttentionRecorder, ReferenceAttentionMaps)."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.bank import MAX_REFERENCES, TIMINGS, Timing
from ..attention.blocks import BLOCK_SETS
from ..attention.masks import MASK_RULES
from ..attention.reader import MODES
from ..attention.schedules import WEIGHT_TYPES, WeightType
from ..pipelines.notices import warn
from ..pipelines.references.attention_maps import NORMALIZE, RECORD_BLOCKS, attach_record, render_maps
from ..pipelines.references.inputs import prepare_references
from ..pipelines.references.patch import apply_reference_patch, build_reference_bank
from .notices import shows_warnings
from .slots import collect_slots
from .types import AttentionRecordType, ReferenceBankType

CATEGORY = "HumanRef/References"
SLOTS = MAX_REFERENCES
DEFAULT_LABELS = ("face", "upper body clothes", "lower body clothes", "hair or headwear", "shoes", "whole body clothes")


class ReferenceEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("writer", tooltip="The model that reads the reference images. Without trained weights, "
                                             "connect the same checkpoint you sample with."),
            io.Vae.Input("vae", tooltip="Encodes the reference images: the VAE of the checkpoint you sample with."),
            io.Clip.Input("clip", tooltip="Text encoder for the labels: each label tells the model what its "
                                          "reference shows."),
            io.Combo.Input("timing", options=list(TIMINGS), default="every step",
                           tooltip="every step (default): the references are read again at every sampling step; "
                                   "they are followed more closely and it suits ordinary checkpoints, at the cost of "
                                   "an extra model pass per step. once at t=0: read once before sampling, much "
                                   "faster; pick it for models trained to read clean references (Parts2Whole's "
                                   "reference UNet). Technically: every step noises the reference to the current "
                                   "sigma."),
            io.Combo.Input("mask_rule", options=list(MASK_RULES), default="parts2whole",
                           tooltip="How a mask is fitted to the model's coarser grids. parts2whole (default, the "
                                   "official rule): the masked part is grown slightly, so thin parts and edges are "
                                   "kept. area: edge cells count by how much of them is masked, for tighter, softer "
                                   "edges."),
            io.Int.Input("max_side", default=768, min=0, max=4096, step=8,
                         tooltip="Long side the references are resized to before reading (aspect kept, multiple of "
                                 "8). Larger keeps finer detail but costs memory and time; 512 to 1024 is typical. "
                                 "0 keeps each image's size."),
        ]
        for i in range(1, SLOTS + 1):
            first = "Required. " if i == 1 else ""
            inputs += [
                io.Image.Input(f"image_{i}", optional=i > 1,
                               tooltip=f"{first}A reference to copy from (a face, a garment, ...), or a batch where "
                                       "every image is one reference. At most 6 references in all."),
                io.Mask.Input(f"mask_{i}", optional=True,
                              tooltip=f"Optional: the part of image_{i} to use (white = use). Unconnected: the "
                                      "whole image. Resized to the image if needed."),
                io.String.Input(f"label_{i}", default=DEFAULT_LABELS[i - 1],
                                tooltip=f"A few words on what image_{i} shows, e.g. 'face' or 'upper body "
                                        "clothes'. For a batch: one line per image, or one line for all."),
            ]
        return io.Schema(
            node_id="HumanRef_ReferenceEncoder",
            display_name="Reference Encoder (HumanRef)",
            category=CATEGORY,
            description="Reads one to six reference images (each with an optional mask and a label) with a writer "
                        "UNet into a reference bank for Masked Shared Attention Patch.",
            inputs=inputs,
            outputs=[ReferenceBankType.Output("reference_bank")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, writer, vae, clip, timing, mask_rule, max_side, **slots) -> io.NodeOutput:
        given = collect_slots(slots, SLOTS, ("image", "mask", "label"), {"label": DEFAULT_LABELS})
        refs = prepare_references(given, max_side, MAX_REFERENCES)
        return io.NodeOutput(build_reference_bank(writer, vae, clip, refs, Timing.from_label(timing, "timing"),
                                                  mask_rule))


class MaskedSharedAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MaskedSharedAttentionPatch",
            display_name="Masked Shared Attention Patch (HumanRef)",
            category=CATEGORY,
            description="Patches a copy of the model so that the picture being generated also looks at the "
                        "references of a bank (shared self-attention; masked-out parts of a reference are left "
                        "out). Chain several to combine banks.",
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with (LoRAs, ControlNets and IP-Adapters "
                                                "still apply). It is not modified: a patched copy is output."),
                ReferenceBankType.Input("reference_bank",
                                        tooltip="What to copy from: a Reference Encoder's reference_bank, or a "
                                                "Garment Encoder's garment_bank for dual mode. It must come from a "
                                                "model of the same family (SD1.5 bank, SD1.5 model)."),
                io.Combo.Input("mode", options=list(MODES), default="concat",
                               tooltip="How the picture uses the references. concat (default): the picture looks "
                                       "at the references alongside itself, as Parts2Whole was trained; right for "
                                       "most uses. strict: the same, but the masked-out parts of a reference are "
                                       "left out completely instead of taking some attention as empty parts, so "
                                       "masked references act a little stronger. blend: mixes the result with "
                                       "and without references by strength, for a softer, adjustable effect "
                                       "(MimicBrush). "
                                       "dual: an added, separate look at the garments; only for a garment bank "
                                       "(AnyDressing). adain: copies the references' colour and texture statistics "
                                       "into the deep layers, without looking at them: the overall look and palette, "
                                       "not details (A1111/ACN reference_adain). adain+attn: adain plus concat, the "
                                       "strongest likeness (A1111/ACN reference_adain+attn). Technically: concat "
                                       "keeps masked-out tokens as zero keys that dilute attention; dual is "
                                       "AnyDressing's Dressing-Attention with W'_k, W'_v; adain moves each channel's "
                                       "mean and deviation of chosen block outputs."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How strongly the references show. concat/strict: 1 = as trained, 0 = off, "
                                       "above 1 copies them more closely (1 to 2 is typical; high values distort). "
                                       "blend: the share of the referenced result, 0 to 1 (0.5 = MimicBrush). dual: "
                                       "the garments' weight, 0.7 as in AnyDressing (the paper's lambda); 0 = off. "
                                       "adain: how far the statistics move, 0 to 1 (1 = all the way). adain+attn: "
                                       "both, as for concat."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="When the references start to act, as a fraction of sampling (0 = from the "
                                       "first step). Starting later (0.2 to 0.4) keeps the prompt's composition and "
                                       "takes mostly details from the references."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="When the references stop acting (1 = until the last step). Ending earlier "
                                       "lets the last steps refine freely. At or below start_percent the references "
                                       "never act."),
                io.Combo.Input("blocks", options=list(BLOCK_SETS), default="all",
                               tooltip="Which layers of the model look at the references. all (default, "
                                       "Parts2Whole): every layer, the strongest effect. mid+up (MimicBrush): the "
                                       "middle and decoder layers. down-only: the encoder layers. Fewer layers act "
                                       "weaker and run faster. custom: the layers listed in custom_blocks."),
                io.String.Input("custom_blocks", default="",
                                tooltip="Only when blocks is custom: the layers that look at the references, comma "
                                        "separated, e.g. 'input_4, middle_0, output_9.0' (name_id for a whole "
                                        "block, name_id.index for one transformer of it)."),
                io.Boolean.Input("uncond_sees_references", default=False,
                                 tooltip="Kept so saved workflows load; style_fidelity says the same with more "
                                         "choice. On: both passes see the references (style_fidelity 0). Off "
                                         "(default): style_fidelity decides."),
                io.Mask.Input("region_masks", optional=True,
                              tooltip="dual mode only: where each garment may appear in the picture, one mask per "
                                      "reference in the bank's order (e.g. the torso for the upper garment); "
                                      "outside its region a garment has no effect. Unconnected: the regions given "
                                      "to the Garment Encoder, or anywhere."),
                io.Float.Input("style_fidelity", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="How much the negative prompt's pass keeps away from the references, as "
                                       "style_fidelity in A1111/ACN. 1 (default, as Parts2Whole and MimicBrush): it "
                                       "ignores them, so CFG pushes the picture toward them: closest likeness. 0: "
                                       "both passes see them: softer, more faithful to the prompt. 0.5 is A1111's "
                                       "default."),
                io.String.Input("reference_weights", default="", optional=True,
                                tooltip="A strength per reference, like IPAdapter's weight per image: '1.2, 0.6' in "
                                        "the bank's order, or by label: 'face=1.2, shoes=0.6' (others stay 1). 0 "
                                        "leaves a reference out. Empty: all 1. Multiplies strength."),
                io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default=WeightType.CONSTANT.value,
                               optional=True,
                               tooltip="How strength changes over the steps between start_percent and end_percent. "
                                       "constant (default): the same throughout. linear in: from 0 up to strength "
                                       "(the prompt sets the layout, the references come in for details). linear "
                                       "out: from strength down to 0 (the references set the layout, the prompt "
                                       "finishes). ease in, ease out: the same along a smooth S-curve."),
            ],
            outputs=[io.Model.Output("model")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, reference_bank, mode, strength, start_percent, end_percent, blocks, custom_blocks,
                uncond_sees_references, region_masks=None, style_fidelity=1.0, reference_weights="",
                weight_type=WeightType.CONSTANT.value) -> io.NodeOutput:
        if start_percent == end_percent:
            raise ValueError(f"start_percent and end_percent are both {start_percent}: the references would act on "
                             "no step. Make end_percent larger than start_percent (0 and 1: every step; bypass the "
                             "node to sample without references)")
        if uncond_sees_references and style_fidelity != 1.0:
            warn(f"uncond_sees_references is on, so style_fidelity ({style_fidelity:g}) is taken as 0; turn it off "
                 "to use style_fidelity")
        fidelity = 0.0 if uncond_sees_references else style_fidelity
        patched = apply_reference_patch(model, reference_bank, mode, strength, start_percent, end_percent,
                                        blocks, custom_blocks, fidelity, regions=region_masks,
                                        reference_weights=reference_weights, weight_type=weight_type)
        return io.NodeOutput(patched)


class ReferenceAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_ReferenceAttentionRecorder",
            display_name="Record Reference Attention (HumanRef)",
            category=CATEGORY,
            description="Makes the sampler note where in the picture each reference's attention goes, for "
                        "Reference Attention Maps. Put it on the model you sample with references; it does not "
                        "change the picture.",
            inputs=[
                io.Model.Input("model", tooltip="The model with (or, before or after, to get) a Masked Shared "
                                                "Attention Patch. It is not modified: a recording copy is output."),
                io.Combo.Input("blocks", options=list(RECORD_BLOCKS), default="all",
                               tooltip="Which layers to look at. all (default): every layer the references act "
                                       "in, averaged. input, middle, output: only the encoder, middle or decoder "
                                       "layers (the decoder shows where details land)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Which sampler step to look at, counted from 0; -1 (default): every step, "
                                     "averaged. Early steps show where the layout takes a reference, late steps "
                                     "where its details go."),
            ],
            outputs=[io.Model.Output("model"),
                     AttentionRecordType.Output("attention_record",
                                                tooltip="Connect to Reference Attention Maps. It holds the last "
                                                        "sampling run of this model.")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, blocks, step) -> io.NodeOutput:
        patched, record = attach_record(model, blocks, step)
        return io.NodeOutput(patched, record)


class ReferenceAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_ReferenceAttentionMaps",
            display_name="Reference Attention Maps (HumanRef)",
            category=CATEGORY,
            description="Shows where in the picture each reference's attention went during the last sampling "
                        "run: one heatmap over the picture and one mask per reference (bright = that part of the "
                        "picture looked at this reference). Use it to see a reference pulled into the wrong "
                        "place, or a region mask that is off.",
            inputs=[
                AttentionRecordType.Input("attention_record",
                                          tooltip="From Record Reference Attention, whose model the sampler used."),
                io.Image.Input("images",
                               tooltip="The sampled pictures, decoded (VAE Decode after the sampler): the heatmaps "
                                       "are drawn over them. Connecting them also makes this node wait for the "
                                       "sampler, and run again when it samples again."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="How strongly the heatmap covers the picture (0: the picture only, 1: the "
                                       "heatmap only)."),
                io.Combo.Input("normalize", options=list(NORMALIZE), default=NORMALIZE[0],
                               tooltip="per map (default): each map stretched to its own brightest point, to show "
                                       "where a reference goes even when it takes little attention. none: the "
                                       "share of attention itself (0 to 1), to compare references."),
            ],
            outputs=[io.Image.Output("heatmaps", tooltip="One picture per reference (and per image of the batch), "
                                                         "captioned with its label and its peak and mean share."),
                     io.Mask.Output("masks", tooltip="The same maps as masks, in the same order."),
                     io.String.Output("captions", tooltip="One line per map: label, peak and mean share.")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, attention_record, images, opacity, normalize) -> io.NodeOutput:
        heatmaps, masks, captions = render_maps(attention_record, images, opacity, normalize)
        return io.NodeOutput(heatmaps, masks, "\n".join(captions))
