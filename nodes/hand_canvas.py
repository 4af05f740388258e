"""HandCanvas: the generated hands placed back onto a plain full-size canvas, with the keep mask and pose."""
from __future__ import annotations

from comfy_api.latest import io

from ..pipelines.hands.canvas import assemble_canvas, body_skeleton
from .hand_generator import HandCropsType


class HandCanvas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandCanvas",
            display_name="Hand Canvas (HumanRef)",
            category="HumanRef/hands",
            description="Removes the generated hands' background with their masks and places them back at the "
                        "pose's hand positions on a plain canvas of the pose's size; outputs the keep mask and "
                        "the full OpenPose skeleton for the outpainting ControlNet.",
            inputs=[
                io.Image.Input("hand_images"),
                io.Mask.Input("hand_masks"),
                HandCropsType.Input("hand_crops"),
                io.Float.Input("background", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Grey level of the plain canvas."),
                io.Float.Input("mask_threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask values at or below this are background."),
            ],
            outputs=[
                io.Image.Output("canvas", display_name="canvas"),
                io.Mask.Output("keep_mask", display_name="keep_mask"),
                io.Image.Output("pose_image", display_name="pose_image"),
            ],
        )

    @classmethod
    def execute(cls, hand_images, hand_masks, hand_crops, background, mask_threshold) -> io.NodeOutput:
        canvas, keep = assemble_canvas(hand_images, hand_masks, hand_crops, (background,) * 3, mask_threshold)
        return io.NodeOutput(canvas, keep, body_skeleton(hand_crops))


NODES = [HandCanvas]
