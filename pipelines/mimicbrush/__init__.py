"""MimicBrush (Chen et al. 2024): mimicbrush.bin loaded natively, depth guider, image preparation, the pipeline."""
