"""Parts2Whole (Huang et al. 2024): the official release loaded natively, its pose guider, the pipeline."""
