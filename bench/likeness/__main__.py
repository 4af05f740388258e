"""``python bench/likeness`` or ``python -m bench.likeness``: the likeness benchmark (runner.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/: the package's parent

from likeness.runner import main  # noqa: E402

main()
