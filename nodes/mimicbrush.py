"""MimicBrush nodes: load mimicbrush.bin, set up an edit (model patch + conditioning), paste the result back."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..pipelines.mimicbrush.pipeline import WRITER_MODES, paste_result, setup_mimicbrush
from ..pipelines.mimicbrush.weights import load_mimicbrush

MimicBrushType = io.Custom("MIMICBRUSH")
MimicBrushEditType = io.Custom("MIMICBRUSH_EDIT")
FOLDER = "mimicbrush"


def _files() -> list[str]:
    if FOLDER not in folder_paths.folder_names_and_paths:  # outside ComfyUI's start-up (e.g. scripts, tests)
        from .. import register_model_folders

        register_model_folders()
    return folder_paths.get_filename_list(FOLDER)


class MimicBrushLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushLoader",
            display_name="MimicBrush Loader (HumanRef)",
            category="HumanRef/MimicBrush",
            description="Loads the official mimicbrush.bin (models/mimicbrush/) natively: the 13-channel imitative "
                        "UNet as a MODEL, and the reference UNet, fine-tuned CLIP ViT-H, image projection and depth "
                        "guider as MIMICBRUSH.",
            inputs=[io.Combo.Input("ckpt_name", options=_files(),
                                   tooltip="mimicbrush.bin (a plain tensor pickle, read with weights_only) or a "
                                           "safetensors file with the same <part>.<key> tensors.")],
            outputs=[io.Model.Output("model", display_name="model"),
                     MimicBrushType.Output("mimicbrush", display_name="mimicbrush")],
        )

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, ckpt_name)
        if path is None:
            raise ValueError(f"ckpt_name {ckpt_name!r} is not in the models/{FOLDER} folder")
        loaded = load_mimicbrush(path)
        return io.NodeOutput(loaded.model, loaded.parts)


class MimicBrushConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushConditioning",
            display_name="MimicBrush Conditioning (HumanRef)",
            category="HumanRef/MimicBrush",
            description="Prepares an edit as the official MimicBrush does: square padding, black-filled masked "
                        "region, image prompt from the reference, depth feature, reference UNet patched into the "
                        "model. Sample the outputs with DDIM (ddim_uniform), 50 steps, CFG 5, then decode and paste.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of MimicBrush Loader."),
                MimicBrushType.Input("mimicbrush"),
                io.Vae.Input("vae", tooltip="An SD1.5 VAE (the official code uses sd-vae-ft-mse)."),
                io.Image.Input("image", tooltip="The image to edit (one image)."),
                io.Mask.Input("mask", tooltip="The region to redraw (1 = redraw), the same size as image."),
                io.Image.Input("reference", tooltip="The image to imitate. Alpha is composited over white."),
                io.Boolean.Input("keep_shape", default=False,
                                 tooltip="On: the depth map keeps the original shape (texture transfer). Off "
                                         "(official default): the model redraws the shape from the reference."),
                io.Combo.Input("writer", options=list(WRITER_MODES), default=WRITER_MODES[0],
                               tooltip="every step (exact): the reference UNet runs at every step on the clean "
                                       "reference at the current timestep, as the official code. once at t=0 "
                                       "(fast): one pass before sampling."),
                io.Int.Input("resolution", default=512, min=256, max=2048, step=64,
                             tooltip="Working size of the square edit (the model was trained at 512)."),
                io.Boolean.Input("crop_to_mask", default=False,
                                 tooltip="Off (official): the whole image is padded to a square and edited at "
                                         "'resolution'. On: only a square around the mask, so a large image keeps "
                                         "its resolution outside the edit."),
                io.Int.Input("crop_margin", default=64, min=0, max=4096, step=8,
                             tooltip="Pixels of context around the mask's box when crop_to_mask is on."),
                io.Float.Input("depth_scale", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Multiplies the 0..1 depth image before the depth guider."),
                io.Image.Input("depth", optional=True,
                               tooltip="Depth map of image (any depth estimator node, near = bright); needed for "
                                       "keep_shape. Resized to image if the aspect ratio matches."),
                io.Image.Input("depth_of_black", optional=True,
                               tooltip="keep_shape off: the same depth estimator's output for an all-black image, "
                                       "which is what the official code feeds the guider. Absent: a zero map."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model"),
                io.Conditioning.Output("positive", display_name="positive"),
                io.Conditioning.Output("negative", display_name="negative"),
                io.Latent.Output("latent", display_name="latent"),
                MimicBrushEditType.Output("edit", display_name="edit"),
            ],
        )

    @classmethod
    def execute(cls, model, mimicbrush, vae, image, mask, reference, keep_shape, writer, resolution, crop_to_mask,
                crop_margin, depth_scale, depth=None, depth_of_black=None) -> io.NodeOutput:
        s = setup_mimicbrush(model, mimicbrush, vae, image, mask, reference, depth=depth, keep_shape=keep_shape,
                             depth_of_black=depth_of_black, writer_mode=writer, resolution=resolution,
                             crop_to_mask=crop_to_mask, crop_margin=crop_margin, depth_scale=depth_scale)
        return io.NodeOutput(s.model, s.positive, s.negative, s.latent, s.edit)


class MimicBrushPaste(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_MimicBrushPaste",
            display_name="MimicBrush Paste (HumanRef)",
            category="HumanRef/MimicBrush",
            description="Puts the decoded square result back into the original image as the official code does: "
                        "un-pad, resize, blend through the mask blurred ten times (3x3 Gaussian).",
            inputs=[io.Image.Input("images", tooltip="VAE Decode of the sampled latent."),
                    MimicBrushEditType.Input("edit")],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def execute(cls, images, edit) -> io.NodeOutput:
        return io.NodeOutput(paste_result(images, edit))


NODES = [MimicBrushLoader, MimicBrushConditioning, MimicBrushPaste]
