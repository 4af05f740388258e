"""``python -m humanref convert-hand-generator UNET MASK_HEAD OUT``: a diffusers hand generator into our layout."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from ..pipelines.comfy_env import import_comfy
from ..pipelines.hands.weights import ACTIVATIONS


def main(argv: Optional[list[str]] = None, prog: str = "python -m humanref convert-hand-generator") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Convert a diffusers fine-tuned hand-generator UNet (15-channel "
                                                 "conv_in) and its mask-head weights into HumanRef's layout.")
    parser.add_argument("unet", help="diffusion_pytorch_model.safetensors of the fine-tuned UNet (diffusers)")
    parser.add_argument("mask_head", help="mask-head weights (safetensors, or .pt/.bin read with weights_only)")
    parser.add_argument("out", help="output .safetensors (put it into ComfyUI/models/hand_generator/)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default $COMFYUI_PATH or /opt/ComfyUI)")
    parser.add_argument("--mask-activation", choices=ACTIVATIONS, default="clamp")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"{args.out} exists; not overwriting")
    import_comfy(args.comfyui)
    from safetensors.torch import save_file

    from ..pipelines.hands.weights import convert_diffusers
    from ..pipelines.loading.files import read_state_dict

    sd, meta = convert_diffusers(read_state_dict(args.unet)[0], read_state_dict(args.mask_head)[0],
                                 {"mask_activation": args.mask_activation})
    save_file(sd, args.out, metadata=meta)
    print(f"wrote {args.out} ({len(sd)} tensors)")
    return 0
