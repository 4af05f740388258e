"""HandGeneratorLoader and HandGenerator: stage 1 of "Giving a Hand to Diffusion Models" (hands first)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..pipelines.hands.generator import SamplingOptions, generate_trained, generate_training_free, plan, skeletons
from ..pipelines.hands.keypoints import COORDINATES, parse_pose, select_person

PoseKeypointType = io.Custom("POSE_KEYPOINT")  # comfyui_controlnet_aux's type name
HandCropsType = io.Custom("HUMANREF_HAND_CROPS")
HandGeneratorType = io.Custom("HUMANREF_HAND_GENERATOR")
FOLDER = "hand_generator"


def _hand_generator_files() -> list[str]:
    try:
        import folder_paths

        return folder_paths.get_filename_list(FOLDER)
    except Exception:  # folder not registered (the pack's entry point has not run): nothing to list
        return []


class HandGeneratorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandGeneratorLoader",
            display_name="Hand Generator Loader (HumanRef)",
            category="HumanRef/hands",
            description="Loads a trained hand generator (15-channel SD1.5 UNet + mask head, HumanRef's safetensors "
                        "layout) from models/hand_generator/.",
            inputs=[io.Combo.Input("hand_generator_name", options=_hand_generator_files())],
            outputs=[HandGeneratorType.Output("hand_generator", display_name="hand_generator")],
        )

    @classmethod
    def execute(cls, hand_generator_name) -> io.NodeOutput:
        import folder_paths

        from ..pipelines.hands.weights import load_hand_generator

        path = folder_paths.get_full_path_or_raise(FOLDER, hand_generator_name)
        return io.NodeOutput(load_hand_generator(path, hand_generator_name))


class HandGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HumanRef_HandGenerator",
            display_name="Hand Generator (HumanRef)",
            category="HumanRef/hands",
            description="Generates the person's hands first, as square crops exactly in the pose's hand keypoints, "
                        "with a hand mask per crop. Training-free (SD1.5 + OpenPose ControlNet on a hands-only "
                        "skeleton) unless a trained hand_generator is connected.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 model for the training-free backend (unused when a trained "
                                                "hand_generator is connected)."),
                io.Conditioning.Input("positive", tooltip="e.g. 'a photo of hands, detailed skin'"),
                io.Conditioning.Input("negative"),
                io.Vae.Input("vae"),
                PoseKeypointType.Input("pose_keypoint", optional=True,
                                       tooltip="DWPose / OpenPose estimator output (comfyui_controlnet_aux)."),
                io.String.Input("pose_json", multiline=True, default="",
                                tooltip="Or an OpenPose JSON / POSE_KEYPOINT JSON text (used when pose_keypoint is "
                                        "not connected)."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="OpenPose ControlNet for the training-free backend."),
                HandGeneratorType.Input("hand_generator", optional=True,
                                        tooltip="A trained hand generator (Hand Generator Loader)."),
                io.Mask.Input("hand_mask", optional=True,
                              tooltip="Trained backend: an optional hand mask of the pose's size for the "
                                      "condition's mask channel (zeros otherwise)."),
                io.Int.Input("person", default=0, min=0, max=64, tooltip="Which person of the pose (0 = first)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=200),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the square hand crops (the paper: 512)."),
                io.Float.Input("crop_scale", default=1.5, min=1.0, max=4.0, step=0.05,
                               tooltip="Crop side / longest side of the hand's keypoint box."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Training-free: ControlNet strength."),
                io.Float.Input("mask_dilation", default=8.0, min=0.0, max=128.0, step=1.0,
                               tooltip="Training-free: keypoint-mask dilation in pixels at 512 (scaled with the "
                                       "resolution)."),
                io.Float.Input("heatmap_sigma", default=0.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Trained: Gaussian sigma of the finger heatmaps in crop pixels "
                                       "(0 = resolution / 64, 8 px at 512)."),
                io.Float.Input("min_confidence", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Keypoints below this confidence are treated as missing."),
                io.Combo.Input("coordinates", options=list(COORDINATES), default="auto",
                               tooltip="auto: normalised (0..1, comfyui_controlnet_aux) when all coordinates fit "
                                       "in 0..1, pixels otherwise (OpenPose files)."),
                io.Int.Input("width", default=0, min=0, max=16384, tooltip="Canvas width for poses without one "
                                                                           "(OpenPose files); 0 = from the pose."),
                io.Int.Input("height", default=0, min=0, max=16384),
            ],
            outputs=[
                io.Image.Output("hand_images", display_name="hand_images"),
                io.Mask.Output("hand_masks", display_name="hand_masks"),
                HandCropsType.Output("hand_crops", display_name="hand_crops"),
                io.Image.Output("hand_pose", display_name="hand_pose"),
            ],
        )

    @classmethod
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


NODES = [HandGeneratorLoader, HandGenerator]
