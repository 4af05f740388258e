"""MimicBrush nodes: load mimicbrush.bin, set up an edit (model patch + conditioning), paste the result back."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipelines.mimicbrush.pipeline import WRITER_MODES, paste_result, setup_mimicbrush, writer_timing
from ..pipelines.mimicbrush.weights import load_mimicbrush
from .model_files import MIMICBRUSH, full_path, list_files
from .notices import shows_warnings
from .types import MimicBrushEditType, MimicBrushType

CATEGORY = "HumanRef/MimicBrush"


class MimicBrushLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushLoader",
            display_name="MimicBrush Loader (HumanRef)",
            category=CATEGORY,
            description="Loads the official mimicbrush.bin (models/mimicbrush/) natively: the 13-channel imitative "
                        "UNet as a MODEL, and the reference UNet, fine-tuned CLIP ViT-H, image projection and depth "
                        "guider as MIMICBRUSH.",
            inputs=[io.Combo.Input("ckpt_name", options=list_files(MIMICBRUSH),
                                   tooltip="The official mimicbrush.bin in models/mimicbrush/ (Hugging Face "
                                           "xichenhku/MimicBrush), or a safetensors file with the same tensors. "
                                           "The .bin is read safely (weights only).")],
            outputs=[io.Model.Output("model"), MimicBrushType.Output("mimicbrush")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, ckpt_name) -> io.NodeOutput:
        loaded = load_mimicbrush(full_path(MIMICBRUSH, ckpt_name, "ckpt_name"))
        return io.NodeOutput(loaded.model, loaded.parts)


class MimicBrushConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushConditioning",
            display_name="MimicBrush Conditioning (HumanRef)",
            category=CATEGORY,
            description="Prepares an edit as the official MimicBrush does: square padding, black-filled masked "
                        "region, image prompt from the reference, depth feature, reference UNet patched into the "
                        "model. Sample the outputs with DDIM (ddim_uniform), 50 steps, CFG 5, then decode and paste.",
            inputs=[
                io.Model.Input("model", tooltip="The MimicBrush Loader's model (the 13-channel UNet; any other "
                                                "model is refused)."),
                MimicBrushType.Input("mimicbrush", tooltip="The MimicBrush Loader's mimicbrush output."),
                io.Vae.Input("vae", tooltip="An SD1.5 VAE (the official code uses sd-vae-ft-mse)."),
                io.Image.Input("image", tooltip="The image to edit (one image)."),
                io.Mask.Input("mask", tooltip="The region to redraw (white = redraw), the same size as image."),
                io.Image.Input("reference", tooltip="The image to imitate: the masked region is redrawn to look "
                                                    "like the matching part of it. Transparent areas count as "
                                                    "white."),
                io.Boolean.Input("keep_shape", default=False,
                                 tooltip="On: the region keeps its original shape and takes only the texture from "
                                         "the reference (needs depth). Off (official default): the shape is redrawn "
                                         "from the reference too."),
                io.Combo.Input("writer", options=list(WRITER_MODES), default=WRITER_MODES[0],
                               tooltip="every step (exact), the default: the reference is read again at every "
                                       "sampling step, as the official code does. once at t=0 (fast): read once "
                                       "before sampling; faster, with a slightly different result."),
                io.Int.Input("resolution", default=512, min=256, max=2048, step=64,
                             tooltip="Side of the square the edit is made at (the model was trained at 512). Larger "
                                     "gives more detail but is slower and can drift from the training."),
                io.Boolean.Input("crop_to_mask", default=False,
                                 tooltip="Off (official): the whole image is padded to a square and edited at "
                                         "'resolution'. On: only a square around the mask, so a large image keeps "
                                         "its resolution outside the edit."),
                io.Int.Input("crop_margin", default=64, min=0, max=4096, step=8,
                             tooltip="Pixels of context around the mask's box when crop_to_mask is on. More context "
                                     "blends better but leaves fewer pixels for the edit itself."),
                io.Float.Input("depth_scale", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="How strongly the depth map shapes the region: multiplies the 0..1 depth "
                                       "image (1 = as trained, 0 = no depth). 0.5 to 2 is a sensible range."),
                io.Image.Input("depth", optional=True,
                               tooltip="Depth map of image (any depth estimator node, near = bright); needed for "
                                       "keep_shape. Resized to image if the aspect ratio matches."),
                io.Image.Input("depth_of_black", optional=True,
                               tooltip="keep_shape off: the same depth estimator's output for an all-black image, "
                                       "which is what the official code feeds the depth guider. Absent: a zero "
                                       "map."),
            ],
            outputs=[
                io.Model.Output("model"),
                io.Conditioning.Output("positive"),
                io.Conditioning.Output("negative"),
                io.Latent.Output("latent"),
                MimicBrushEditType.Output("edit"),
            ],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, mimicbrush, vae, image, mask, reference, keep_shape, writer, resolution, crop_to_mask,
                crop_margin, depth_scale, depth=None, depth_of_black=None) -> io.NodeOutput:
        s = setup_mimicbrush(model, mimicbrush, vae, image, mask, reference, depth=depth, keep_shape=keep_shape,
                             depth_of_black=depth_of_black, timing=writer_timing(writer), resolution=resolution,
                             crop_to_mask=crop_to_mask, crop_margin=crop_margin, depth_scale=depth_scale)
        return io.NodeOutput(s.model, s.positive, s.negative, s.latent, s.edit)


class MimicBrushPaste(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushPaste",
            display_name="MimicBrush Paste (HumanRef)",
            category=CATEGORY,
            description="Puts the decoded square result back into the original image as the official code does: "
                        "un-pad, resize, blend through the mask blurred ten times (3x3 Gaussian).",
            inputs=[io.Image.Input("images", tooltip="VAE Decode of the sampled latent (a batch gives one pasted "
                                                     "image per item)."),
                    MimicBrushEditType.Input("edit", tooltip="The MimicBrush Conditioning's edit output: where and "
                                                             "how to paste the result back.")],
            outputs=[io.Image.Output("image")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, images, edit) -> io.NodeOutput:
        return io.NodeOutput(paste_result(images, edit))
