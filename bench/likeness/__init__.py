"""The likeness benchmark: does a reference mode make the picture look like the reference on a trained model?

``python bench/likeness`` (or ``python -m bench.likeness`` from the repository root); see ``runner.py``.
"""
