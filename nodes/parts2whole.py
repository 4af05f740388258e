"""Parts2Whole nodes: load the official release natively, and patch a model with up to six part references."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipelines.parts2whole.pipeline import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    LABELS,
    MASK_SOURCES,
    MAX_PARTS,
    MODES,
    MaskSource,
    PartInput,
    Parts2WholeMode,
    apply_parts2whole,
    empty_latent,
)
from ..pipelines.parts2whole.release import load_release
from .model_files import PARTS2WHOLE, full_path, list_files
from .notices import shows_warnings
from .slots import collect_slots
from .types import Parts2WholeType

CATEGORY = "HumanRef/Parts2Whole"
DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Parts2WholeLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_Parts2WholeLoader",
            display_name="Parts2Whole Loader (HumanRef)",
            category=CATEGORY,
            description="Loads the official Parts2Whole release (diffusers folders and decoupled_attn.pth) from "
                        "models/parts2whole/<name>/ into ComfyUI models; no diffusers at run time.",
            inputs=[
                io.Combo.Input("release", options=list_files(PARTS2WHOLE),
                               tooltip="The Parts2Whole release to load: a folder under models/parts2whole/ (the "
                                       "Hugging Face repository huanngzh/Parts2Whole) holding unet/, "
                                       "reference_unet/, pose_guider/, image_encoder/, feature_extractor/ and "
                                       "decoupled_attn.pth."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Precision of the UNets in memory. default lets ComfyUI choose (fp16 on "
                                       "most GPUs); fp32 is the most exact and uses twice the memory; bf16 for GPUs "
                                       "that prefer it. Pictures differ only slightly."),
            ],
            outputs=[
                io.Model.Output("model", tooltip="The denoising UNet (release noise schedule)."),
                io.Model.Output("reference_unet", tooltip="The reference UNet: only usable as the writer of "
                                                          "Parts2Whole."),
                io.ClipVision.Output("image_encoder"),
                Parts2WholeType.Output("parts2whole", tooltip="Pose guider and decoupled cross-attention weights."),
            ],
        )

    @classmethod
    @shows_warnings
    def execute(cls, release, weight_dtype) -> io.NodeOutput:
        if weight_dtype not in DTYPES:
            raise ValueError(f"weight_dtype must be one of {list(DTYPES)}, got {weight_dtype!r}")
        loaded = load_release(full_path(PARTS2WHOLE, release, "release"), DTYPES[weight_dtype])
        return io.NodeOutput(loaded.model, loaded.reference_unet, loaded.image_encoder, loaded.release)


class Parts2WholeApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("model", tooltip="The Parts2Whole Loader's model: the one you sample with."),
            io.Model.Input("reference_unet", tooltip="The Parts2Whole Loader's reference_unet: it reads the part "
                                                     "images."),
            Parts2WholeType.Input("parts2whole", tooltip="The Parts2Whole Loader's parts2whole output: the release's "
                                                         "pose and image-prompt weights."),
            io.ClipVision.Input("image_encoder", tooltip="The Parts2Whole Loader's image_encoder: turns each part "
                                                         "into an image prompt."),
            io.Vae.Input("vae", tooltip="Encodes the parts: any SD1.5 VAE (the official code uses sd-vae-ft-mse, "
                                        "the closest match)."),
            io.Clip.Input("clip", tooltip="An SD1.5 text encoder: encodes each part's label."),
            io.Conditioning.Input("positive", tooltip="Your prompt for the person and the scene (used in 'as "
                                                      "trained' mode; 'as released' ignores it)."),
            io.Int.Input("width", default=DEFAULT_WIDTH, min=64, max=4096, step=8,
                         tooltip="Width of the generated image in pixels (the release: 512). The parts and the pose "
                                 "are resized to the output size."),
            io.Int.Input("height", default=DEFAULT_HEIGHT, min=64, max=4096, step=8,
                         tooltip="Height of the generated image in pixels (the release: 768)."),
            io.Int.Input("batch_size", default=1, min=1, max=64,
                         tooltip="How many images to generate at once (the same parts, different noise)."),
            io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                           tooltip="as trained (default): each part gets its own label and your prompt is used, as "
                                   "the model was trained; pick it for real use. as released: reproduces two bugs "
                                   "of the official pipeline (every part gets the first part's label, your prompt "
                                   "is ignored); pick it only to compare with the official results."),
            io.Combo.Input("mask_source", options=list(MASK_SOURCES), default=MASK_SOURCES[0],
                           tooltip="How mask_N is read. 'mask: 1 = part' (default): white = the part to use, for "
                                   "masks from any mask node. 'LoadImage alpha: 1 = transparent': for RGBA cut-outs "
                                   "loaded with Load Image, whose MASK output marks the transparent area; the part "
                                   "is then put on white, as the official code does with the alpha channel."),
            io.Image.Input("pose", optional=True,
                           tooltip="Optional: a DensePose image of the pose the person should take (the only pose "
                                   "format released), resized to the output. Unconnected: no pose guidance."),
        ]
        for i in range(1, MAX_PARTS + 1):
            inputs += [
                io.Image.Input(f"image_{i}", optional=True,
                               tooltip="A part for the person (a face, a garment, shoes, ...), resized to the "
                                       "output size. A batch counts as several parts; at most six in all."),
                io.Mask.Input(f"mask_{i}", optional=True,
                              tooltip=f"Optional: the pixels of image_{i} to use (see mask_source). Unconnected: "
                                      "the whole image."),
                io.Combo.Input(f"label_{i}", options=list(LABELS), default=LABELS[i - 1],
                               tooltip=f"What image_{i} shows, one of the six labels the model was trained with; "
                                       "a wrong label weakens or misplaces the part."),
            ]
        return io.Schema(
            node_id="HumanRef_Parts2Whole",
            display_name="Parts2Whole (HumanRef)",
            category=CATEGORY,
            description="Runs the reference UNet once per part, then patches the model with the parts (shared "
                        "self-attention), their CLIP image tokens (decoupled cross-attention) and the pose. Sample "
                        "the MODEL with the positive and LATENT given here; the release uses DDIM "
                        "(sampler ddim, scheduler ddim_uniform), 50 steps, CFG 3.5.",
            inputs=inputs,
            outputs=[io.Model.Output("model"), io.Conditioning.Output("positive"), io.Latent.Output("latent")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, reference_unet, parts2whole, image_encoder, vae, clip, positive, width, height,
                batch_size, mode, mask_source, pose=None, **slots) -> io.NodeOutput:
        parts = [PartInput(*group) for group in collect_slots(slots, MAX_PARTS, ("image", "mask", "label"),
                                                              {"label": LABELS})]
        result = apply_parts2whole(model, reference_unet, parts2whole, image_encoder, vae, clip, positive, parts,
                                   width, height, pose, Parts2WholeMode.from_label(mode, "mode"),
                                   MaskSource.from_label(mask_source, "mask_source"))
        return io.NodeOutput(result.model, result.positive, empty_latent(width, height, batch_size))
