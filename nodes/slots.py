"""The numbered input groups of the nodes that take up to six references (image_1, mask_1, label_1, ...)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def collect_slots(inputs: Mapping[str, Any], count: int, names: Sequence[str],
                  defaults: Mapping[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
    """``(number, *values)`` in ``names`` order for every group whose first input is connected.

    A widget (a name in ``defaults``) not given takes its default for that number. Any other input connected
    without the group's first input is an error, rather than silently ignored.
    """
    main, *rest = names
    groups = []
    for number in range(1, count + 1):
        values = [inputs.get(f"{name}_{number}", defaults[name][number - 1] if name in defaults else None)
                  for name in names]
        if values[0] is None:
            for name, value in zip(rest, values[1:]):
                if name not in defaults and value is not None:
                    raise ValueError(f"{name}_{number} is connected but {main}_{number} is not")
            continue
        groups.append((number, *values))
    return groups
