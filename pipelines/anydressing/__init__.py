"""AnyDressing (Li et al. 2024): any set of garments through a garment bank and dressing attention."""
