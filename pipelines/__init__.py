"""The pack's ComfyUI-side code, one folder per method on a shared engine.

    references/   the engine on a ComfyUI model: reference inputs, the writer pass, the bank, the attn1 patch
    parts2whole/  Parts2Whole: the official release's loader, its pose guider, the pipeline on the engine
    mimicbrush/   MimicBrush: mimicbrush.bin loader, depth guider, image preparation and paste, the pipeline
    hands/        "Giving a Hand to Diffusion Models": keypoints, hand generator, canvas, mask-expanding outpaint
    anydressing/  AnyDressing: the garment bank (GarmentsNet writer) and the garment-weights format
    loading/      weight files and diffusers <-> ComfyUI UNet layouts, shared by the loaders
    synthetic/    random-weight models in the real key layouts (tests, ``python -m humanref tiny-models``)
    images.py     IMAGE/MASK input checks, resizing, layout flips and the RGBA rule, shared by every method folder
    notices.py    warnings the user sees (on the node, in a toast, in the runner's output), not only the log

A method's folder imports ``references/``, ``loading/`` and ``images.py`` but never another method's folder;
nothing here imports the pack's ``nodes/`` or ``cli/`` (ComfyUI's own ``nodes`` module is imported as
``comfy_nodes``).
"""
