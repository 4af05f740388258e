"""Parts2Whole nodes: load the official release natively, and patch a model with up to six part references."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipelines.parts2whole.pipeline import (DEFAULT_HEIGHT, DEFAULT_WIDTH, LABELS, MASK_SOURCES, MAX_PARTS, MODES, PartInput,
                                     apply_parts2whole, empty_latent)
from ..pipelines.parts2whole.release import list_releases, load_release, release_path

Parts2WholeType = io.Custom("PARTS2WHOLE")
DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Parts2WholeLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_Parts2WholeLoader",
            display_name="Parts2Whole Loader (HumanRef)",
            category="HumanRef/Parts2Whole",
            description="Loads the official Parts2Whole release (diffusers folders and decoupled_attn.pth) from "
                        "models/parts2whole/<name>/ into ComfyUI models; no diffusers at run time.",
            inputs=[
                io.Combo.Input("release", options=list_releases(),
                               tooltip="A folder under models/parts2whole/ holding unet/, reference_unet/, "
                                       "pose_guider/, image_encoder/, feature_extractor/ and decoupled_attn.pth."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="UNet weight precision; default lets ComfyUI choose (fp16 on most GPUs)."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip="The denoising UNet (release noise schedule)."),
                io.Model.Output("reference_unet", display_name="reference_unet",
                                tooltip="The reference UNet: only usable as the writer of Parts2Whole."),
                io.ClipVision.Output("image_encoder", display_name="image_encoder"),
                Parts2WholeType.Output("parts2whole", display_name="parts2whole",
                                       tooltip="Pose guider and decoupled cross-attention weights."),
            ],
        )

    @classmethod
    def execute(cls, release, weight_dtype) -> io.NodeOutput:
        if weight_dtype not in DTYPES:
            raise ValueError(f"weight_dtype must be one of {list(DTYPES)}, got {weight_dtype!r}")
        loaded = load_release(release_path(release), DTYPES[weight_dtype])
        return io.NodeOutput(loaded.model, loaded.reference_unet, loaded.image_encoder, loaded.release)


class Parts2WholeApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = [
            io.Model.Input("model", tooltip="The Parts2Whole denoising UNet from the loader."),
            io.Model.Input("reference_unet", tooltip="The reference UNet from the loader (the writer)."),
            Parts2WholeType.Input("parts2whole"),
            io.ClipVision.Input("image_encoder", tooltip="The release's CLIP image encoder."),
            io.Vae.Input("vae", tooltip="Encodes the parts (the official code uses sd-vae-ft-mse)."),
            io.Clip.Input("clip", tooltip="SD1.5 text encoder: encodes each part's label for the reference UNet."),
            io.Conditioning.Input("positive"),
            io.Int.Input("width", default=DEFAULT_WIDTH, min=64, max=4096, step=8),
            io.Int.Input("height", default=DEFAULT_HEIGHT, min=64, max=4096, step=8),
            io.Int.Input("batch_size", default=1, min=1, max=64),
            io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                           tooltip="as trained: each part gets its own label and the prompt is used. as released: "
                                   "the official pipeline's bugs (every part and the prompt get the first part's "
                                   "label)."),
            io.Combo.Input("mask_source", options=list(MASK_SOURCES), default=MASK_SOURCES[0],
                           tooltip="How mask_N is read: a part mask (1 = use), or LoadImage's MASK output of an "
                                   "RGBA cut-out (1 = transparent), which is then composited over white like the "
                                   "official code does with the alpha channel."),
            io.Image.Input("pose", optional=True,
                           tooltip="DensePose image (the only structure model released); resized to the output."),
        ]
        for i in range(1, MAX_PARTS + 1):
            inputs += [
                io.Image.Input(f"image_{i}", optional=True, tooltip="A part image (resized to the output size)."),
                io.Mask.Input(f"mask_{i}", optional=True, tooltip="The part's mask; none = the whole image."),
                io.Combo.Input(f"label_{i}", options=list(LABELS), default=LABELS[i - 1]),
            ]
        return io.Schema(
            node_id="HumanRef_Parts2Whole",
            display_name="Parts2Whole (HumanRef)",
            category="HumanRef/Parts2Whole",
            description="Runs the reference UNet once per part, then patches the model with the parts (shared "
                        "self-attention), their CLIP image tokens (decoupled cross-attention) and the pose. Sample "
                        "the MODEL with the positive and LATENT given here; the release uses DDIM "
                        "(sampler ddim, scheduler ddim_uniform), 50 steps, CFG 3.5.",
            inputs=inputs,
            outputs=[io.Model.Output("model", display_name="model"),
                     io.Conditioning.Output("positive", display_name="positive"),
                     io.Latent.Output("latent", display_name="latent")],
        )

    @classmethod
    def execute(cls, model, reference_unet, parts2whole, image_encoder, vae, clip, positive, width, height,
                batch_size, mode, mask_source, pose=None, **slots) -> io.NodeOutput:
        parts = []
        for i in range(1, MAX_PARTS + 1):
            image = slots.get(f"image_{i}")
            if image is None:
                if slots.get(f"mask_{i}") is not None:
                    raise ValueError(f"mask_{i} is connected but image_{i} is not")
                continue
            parts.append(PartInput(i, image, slots.get(f"mask_{i}"), slots.get(f"label_{i}", LABELS[i - 1])))
        result = apply_parts2whole(model, reference_unet, parts2whole, image_encoder, vae, clip, positive, parts,
                                   width, height, pose, mode, mask_source)
        return io.NodeOutput(result.model, result.positive, empty_latent(width, height, batch_size))


NODES = [Parts2WholeLoader, Parts2WholeApply]
