"""Custom ComfyUI types of the pack: objects passed by reference between nodes, never mutated."""
from comfy_api.latest import io

ReferenceBankType = io.Custom("REFERENCE_BANK")
