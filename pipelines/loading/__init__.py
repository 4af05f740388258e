"""Weight files and the diffusers <-> ComfyUI UNet layouts, shared by every loader.

    files.py           read_state_dict: the one safe reader (safetensors first, pickles only weights_only)
    comfy_unet.py      ComfyUI's UNet: exact keys/shapes (unet_shapes), UNET_PREFIX, model_family
    unet_configs.py    UNet configs: ldm <- diffusers config.json, ldm <- diffusers state dict, diffusers <- ldm
    diffusers_unet.py  UNet weights: diffusers -> ldm keys (checked, stripped reference UNets) and back

Nothing here imports ComfyUI at module level, nor any method folder, nor ``synthetic/``.
"""
