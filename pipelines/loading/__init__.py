"""Weight files and the diffusers <-> ComfyUI UNet layouts, shared by every loader."""
