"""SequentialMaskExpandOutpaint: the body outpainted around kept hands (stage 2, paper III-C/III-D)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..pipelines.hands.mask_expand import BLENDINGS, SCHEDULES
from ..pipelines.hands.outpaint import OutpaintOptions, outpaint


class SequentialMaskExpandOutpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_SequentialMaskExpandOutpaint",
            display_name="Sequential Mask Expand Outpaint (HumanRef)",
            category="HumanRef/hands",
            description="Samples the canvas with the keep region blended in at every step (canvas latent noised to "
                        "the current sigma); the keep region starts dilated and shrinks to the mask, the final "
                        "steps run unmasked, and the kept pixels are blended back after decoding.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="Apply the OpenPose ControlNet (full skeleton) here."),
                io.Conditioning.Input("negative"),
                io.Vae.Input("vae"),
                io.Image.Input("canvas"),
                io.Mask.Input("keep_mask", tooltip="1 = keep the canvas (the hands). Resized to the canvas if needed."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=200),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Int.Input("max_expansion", default=64, min=0, max=1024, step=8,
                             tooltip="Dilation of the keep mask at the first step, in pixels."),
                io.Combo.Input("blending", options=list(BLENDINGS), default="sequential expansion",
                               tooltip="sequential expansion (the paper), or its baselines: naive (the mask at "
                                       "every step), bounding box (the box of each hand region)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="linear",
                               tooltip="How the dilation shrinks from max_expansion to 0 over the masked steps."),
                io.Int.Input("unmasked_last_steps", default=2, min=0, max=200,
                             tooltip="Final steps run on the whole latent (the paper: 2)."),
            ],
            outputs=[io.Image.Output("image", display_name="image"), io.Latent.Output("latent", display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, canvas, keep_mask, seed, steps, cfg, sampler_name, scheduler,
                denoise, max_expansion, blending, schedule, unmasked_last_steps) -> io.NodeOutput:
        options = OutpaintOptions(seed, steps, cfg, sampler_name, scheduler, denoise, max_expansion, blending,
                                  schedule, unmasked_last_steps)
        image, latent, _ = outpaint(model, positive, negative, vae, canvas, keep_mask, options)
        return io.NodeOutput(image, latent)


NODES = [SequentialMaskExpandOutpaint]
