"""The reference-attention engine: pure PyTorch, never imports comfy.

One engine serves every method of the pack: a reference bank captured from a writer UNet, mask projection
onto a block's token grid, the injection kernels (concat, strict, blend, dual) and CFG chunk gating.
"""
