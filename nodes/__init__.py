"""The pack's V3 nodes: thin schemas over pipelines/ and attention/, one module per method.

    extension.py    the node list in menu order, and the ComfyExtension that hands it to ComfyUI
    references.py   Reference Encoder, Masked Shared Attention Patch (the training-free engine)
    parts2whole.py  Parts2Whole Loader, Parts2Whole
    mimicbrush.py   MimicBrush Loader, Conditioning, Paste
    hands.py        Hand Generator Loader, Hand Generator, Hand Canvas, Sequential Mask Expand Outpaint
    anydressing.py  Garment Encoder (node id HumanRef_GarmentLoRAExtractor)
    types.py        every custom type (REFERENCE_BANK, PARTS2WHOLE, ...)
    model_files.py  the pack's model folders: names, registration, listing and resolving files
    slots.py        the numbered input groups (image_1, mask_1, label_1, ...)

Nothing here imports ComfyUI, so the runner can read ``model_files`` outside it; the node modules do.
"""
