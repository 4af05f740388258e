"""Every custom ComfyUI type of the pack, in one place: objects passed by reference between nodes, never mutated.

The type names are in saved workflows and in other packs' nodes (POSE_KEYPOINT): they never change.
"""
from comfy_api.latest import io

ReferenceBankType = io.Custom("REFERENCE_BANK")
Parts2WholeType = io.Custom("PARTS2WHOLE")
MimicBrushType = io.Custom("MIMICBRUSH")
MimicBrushEditType = io.Custom("MIMICBRUSH_EDIT")
PoseKeypointType = io.Custom("POSE_KEYPOINT")  # comfyui_controlnet_aux's type name
HandCropsType = io.Custom("HUMANREF_HAND_CROPS")
HandGeneratorType = io.Custom("HUMANREF_HAND_GENERATOR")
AttentionRecordType = io.Custom("HUMANREF_ATTENTION_RECORD")
