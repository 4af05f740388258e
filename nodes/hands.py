"""The "Giving a Hand to Diffusion Models" nodes: hands first (loader, generator), then the body around them
(canvas, sequential mask expansion outpainting)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..pipelines.hands.canvas import assemble_canvas, body_skeleton
from ..pipelines.hands.generator import SamplingOptions, generate_trained, generate_training_free, plan, skeletons
from ..pipelines.hands.keypoints import COORDINATES, parse_pose, select_person
from ..pipelines.hands.mask_expand import BLENDINGS, SCHEDULES, Blending
from ..pipelines.hands.outpaint import OutpaintOptions, outpaint
from ..pipelines.hands.weights import load_hand_generator
from .model_files import HAND_GENERATOR, full_path, list_files
from .notices import shows_warnings
from .types import HandCropsType, HandGeneratorType, PoseKeypointType

CATEGORY = "HumanRef/Hands"


def sampling_inputs(what: str) -> list[io.Input]:
    """KSampler's seed, steps, cfg, sampler and scheduler, for the two nodes that sample."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip=f"Random seed: another seed gives other {what} for the same inputs."),
        io.Int.Input("steps", default=20, min=1, max=200,
                     tooltip="Sampling steps, as in KSampler: more is slower and usually cleaner (20 to 30 is "
                             "typical)."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1,
                       tooltip="How closely the picture follows the prompt, as in KSampler (5 to 8 is typical; high "
                               "values oversaturate)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                       tooltip="The sampling algorithm, as in KSampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                       tooltip="How the noise is spread over the steps, as in KSampler."),
    ]


class HandGeneratorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandGeneratorLoader",
            display_name="Hand Generator Loader (HumanRef)",
            category=CATEGORY,
            description="Loads a trained hand generator (15-channel SD1.5 UNet + mask head, HumanRef's safetensors "
                        "layout) from models/hand_generator/.",
            inputs=[io.Combo.Input("hand_generator_name", options=list_files(HAND_GENERATOR),
                                   tooltip="A trained hand generator in models/hand_generator/ (HumanRef's layout: "
                                           "train one with 'python -m humanref train hand-generator', or convert a "
                                           "diffusers fine-tune with 'python -m humanref convert-hand-generator').")],
            outputs=[HandGeneratorType.Output("hand_generator")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, hand_generator_name) -> io.NodeOutput:
        path = full_path(HAND_GENERATOR, hand_generator_name, "hand_generator_name")
        return io.NodeOutput(load_hand_generator(path, hand_generator_name))


class HandGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandGenerator",
            display_name="Hand Generator (HumanRef)",
            category=CATEGORY,
            description="Generates the person's hands first, as square crops exactly in the pose's hand keypoints, "
                        "with a hand mask per crop. Training-free (SD1.5 + OpenPose ControlNet on a hands-only "
                        "skeleton) unless a trained hand_generator is connected.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model that draws the hands without training (ignored "
                                                "when a trained hand_generator is connected)."),
                io.Conditioning.Input("positive", tooltip="Prompt for the hands, e.g. 'a photo of two hands, "
                                                          "detailed skin'."),
                io.Conditioning.Input("negative", tooltip="What the hands should not look like, e.g. 'extra "
                                                          "fingers, blurry'."),
                io.Vae.Input("vae", tooltip="An SD1.5 VAE: decodes the hand images (and feeds a trained "
                                            "generator's mask head)."),
                PoseKeypointType.Input("pose_keypoint", optional=True,
                                       tooltip="The pose with hand keypoints from a DWPose / OpenPose estimator "
                                               "(comfyui_controlnet_aux, hands enabled)."),
                io.String.Input("pose_json", multiline=True, default="",
                                tooltip="Or an OpenPose JSON / POSE_KEYPOINT JSON text (used when pose_keypoint is "
                                        "not connected)."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="An SD1.5 OpenPose ControlNet: makes the hands follow the pose. Needed "
                                            "unless a trained hand_generator is connected."),
                HandGeneratorType.Input("hand_generator", optional=True,
                                        tooltip="Optional: a trained hand generator (Hand Generator Loader), used "
                                                "instead of model and control_net."),
                io.Mask.Input("hand_mask", optional=True,
                              tooltip="Trained generator only: an optional hand mask of the pose's size as extra "
                                      "guidance (unconnected: none)."),
                io.Int.Input("person", default=0, min=0, max=64,
                             tooltip="Which person of the pose gets hands (0 = the first)."),
                *sampling_inputs("hands"),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the square hand images in pixels (the paper: 512). Larger gives more "
                                     "detail and takes longer."),
                io.Float.Input("crop_scale", default=1.5, min=1.0, max=4.0, step=0.05,
                               tooltip="Room around each hand: the crop's side over the hand's size (1.5 = half "
                                       "again as big; larger shows more wrist and arm, each hand smaller)."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Without a trained generator: how strictly the hands follow the pose (1 = "
                                       "normal, 0 = ignore it; 0.5 to 1.5 is typical)."),
                io.Float.Input("mask_dilation", default=8.0, min=0.0, max=128.0, step=1.0,
                               tooltip="Without a trained generator: how far the hand mask reaches beyond the "
                                       "keypoints, in pixels at 512 (scaled with resolution). Larger keeps more of "
                                       "the generated hand and some background."),
                io.Float.Input("heatmap_sigma", default=0.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Trained generator only: size of the finger spots that guide it, in crop "
                                       "pixels (0 = automatic: resolution / 64, 8 px at 512). The Gaussian sigma."),
                io.Float.Input("min_confidence", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Keypoints less certain than this are treated as missing (raise it to drop "
                                       "shaky fingers, lower it to keep faint ones)."),
                io.Combo.Input("coordinates", options=list(COORDINATES), default="auto",
                               tooltip="How the pose's numbers are read. auto (default): as fractions of the image "
                                       "(0..1, comfyui_controlnet_aux) when all fit in 0..1, as pixels otherwise "
                                       "(OpenPose files). normalized or pixels: force one reading."),
                io.Int.Input("width", default=0, min=0, max=16384,
                             tooltip="Canvas width in pixels for poses without one (OpenPose files); 0 = from the "
                                     "pose."),
                io.Int.Input("height", default=0, min=0, max=16384,
                             tooltip="Canvas height in pixels for poses without one (OpenPose files); 0 = from the "
                                     "pose."),
            ],
            outputs=[
                io.Image.Output("hand_images"),
                io.Mask.Output("hand_masks"),
                HandCropsType.Output("hand_crops"),
                io.Image.Output("hand_pose"),
            ],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, positive, negative, vae, person, seed, steps, cfg, sampler_name, scheduler, resolution,
                crop_scale, control_strength, mask_dilation, heatmap_sigma, min_confidence, coordinates, width,
                height, pose_json="", pose_keypoint=None, control_net=None, hand_generator=None,
                hand_mask=None) -> io.NodeOutput:
        source = pose_keypoint if pose_keypoint is not None else pose_json
        if pose_keypoint is None and not (pose_json or "").strip():
            raise ValueError("no pose: connect pose_keypoint (DWPose / OpenPose estimator) or paste a pose JSON "
                             "into pose_json")
        frames = parse_pose(source, coordinates, min_confidence, width, height)
        frame, who = select_person(frames, 0, person)
        hands = plan(frame, who, resolution, crop_scale)
        options = SamplingOptions(seed, steps, cfg, sampler_name, scheduler)
        if hand_generator is not None:
            images, masks = generate_trained(hand_generator, positive, negative, vae, hands, options,
                                             heatmap_sigma or None, hand_mask)
        else:
            images, masks = generate_training_free(model, positive, negative, vae, control_net, hands, options,
                                                   control_strength, mask_dilation)
        return io.NodeOutput(images, masks, hands, skeletons(hands))


class HandCanvas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandCanvas",
            display_name="Hand Canvas (HumanRef)",
            category=CATEGORY,
            description="Removes the generated hands' background with their masks and places them back at the "
                        "pose's hand positions on a plain canvas of the pose's size; outputs the keep mask and "
                        "the full OpenPose skeleton for the outpainting ControlNet.",
            inputs=[
                io.Image.Input("hand_images", tooltip="The Hand Generator's hand_images."),
                io.Mask.Input("hand_masks", tooltip="The Hand Generator's hand_masks: which pixels of each hand "
                                                    "image are hand."),
                HandCropsType.Input("hand_crops", tooltip="The Hand Generator's hand_crops: where each hand goes on "
                                                          "the canvas."),
                io.Float.Input("background", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Grey level of the plain canvas around the hands (0 = black, 0.5 = mid "
                                       "grey, 1 = white)."),
                io.Float.Input("mask_threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask values at or below this are dropped as background: 0 keeps every "
                                       "masked pixel, higher keeps only the surest hand pixels (1 keeps nothing)."),
            ],
            outputs=[io.Image.Output("canvas"), io.Mask.Output("keep_mask"), io.Image.Output("pose_image")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, hand_images, hand_masks, hand_crops, background, mask_threshold) -> io.NodeOutput:
        canvas, keep = assemble_canvas(hand_images, hand_masks, hand_crops, (background,) * 3, mask_threshold)
        return io.NodeOutput(canvas, keep, body_skeleton(hand_crops))


class SequentialMaskExpandOutpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_SequentialMaskExpandOutpaint",
            display_name="Sequential Mask Expand Outpaint (HumanRef)",
            category=CATEGORY,
            description="Samples the canvas with the keep region blended in at every step (canvas latent noised to "
                        "the current sigma); the keep region starts dilated and shrinks to the mask, the final "
                        "steps run unmasked, and the kept pixels are blended back after decoding.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model that draws the body (an inpainting model works "
                                                "too)."),
                io.Conditioning.Input("positive", tooltip="Prompt for the person; apply the OpenPose ControlNet with "
                                                          "Hand Canvas's pose_image to it."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (apply the same ControlNet to it)."),
                io.Vae.Input("vae", tooltip="An SD1.5 VAE: encodes the canvas and decodes the result."),
                io.Image.Input("canvas", tooltip="The Hand Canvas's canvas: the hands on a plain background."),
                io.Mask.Input("keep_mask", tooltip="What to keep of the canvas (white = keep: the hands). Resized to "
                                                   "the canvas if needed."),
                *sampling_inputs("bodies"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much is redrawn around the kept hands, as in KSampler: 1 (default) "
                                       "draws the body from scratch; lower values keep more of the plain canvas."),
                io.Int.Input("max_expansion", default=64, min=0, max=1024, step=8,
                             tooltip="How far beyond the hands the kept area reaches at the first step, in pixels; "
                                     "it then shrinks to the hands. Larger joins hands and body more smoothly (32 to "
                                     "128 is typical); 0 keeps the exact hand mask at every step."),
                io.Combo.Input("blending", options=list(BLENDINGS), default="sequential expansion",
                               tooltip="sequential expansion (default, the paper): the kept area starts wide and "
                                       "shrinks to the hands, for seamless wrists. naive: the exact hand mask at "
                                       "every step, which can leave seams. bounding box: each hand's box. The last "
                                       "two are the paper's baselines, for comparison."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="linear",
                               tooltip="How the kept area shrinks from max_expansion to the hands over the steps: "
                                       "linear (default, evenly), cosine (slowly at first and at the end), quadratic "
                                       "(quickly at first)."),
                io.Int.Input("unmasked_last_steps", default=2, min=0, max=200,
                             tooltip="Final steps that run on the whole picture with nothing held, so body and "
                                     "hands blend (the paper: 2); the hands are put back exactly after decoding. Keep "
                                     "it below steps."),
            ],
            outputs=[io.Image.Output("image"), io.Latent.Output("latent")],
        )

    @classmethod
    @shows_warnings
    def execute(cls, model, positive, negative, vae, canvas, keep_mask, seed, steps, cfg, sampler_name, scheduler,
                denoise, max_expansion, blending, schedule, unmasked_last_steps) -> io.NodeOutput:
        options = OutpaintOptions(seed, steps, cfg, sampler_name, scheduler, denoise, max_expansion,
                                  Blending.from_label(blending, "blending"), schedule, unmasked_last_steps)
        image, latent, _ = outpaint(model, positive, negative, vae, canvas, keep_mask, options)
        return io.NodeOutput(image, latent)
