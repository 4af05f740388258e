"""``python -m humanref``: see :mod:`humanref.cli` (``run`` a workflow, write ``tiny-models``)."""
from .cli import main

raise SystemExit(main())
