"""nodes/slots.py: the numbered input groups, checked against hand-written expectations."""
from __future__ import annotations

import pytest

from humanref.nodes.slots import collect_slots

DEFAULTS = {"label": ("a", "b", "c")}


def test_connected_groups_in_order_with_widget_defaults():
    inputs = {"image_3": "I3", "mask_3": "M3", "label_3": "x", "image_1": "I1"}
    assert collect_slots(inputs, 3, ("image", "mask", "label"), DEFAULTS) == [(1, "I1", None, "a"),
                                                                             (3, "I3", "M3", "x")]


def test_a_widget_without_its_image_is_not_an_error():
    assert collect_slots({"label_2": "y", "image_1": "I1"}, 3, ("image", "mask", "label"), DEFAULTS) == [
        (1, "I1", None, "a")]


def test_nothing_connected_gives_no_groups():
    assert collect_slots({}, 3, ("image", "mask", "label"), DEFAULTS) == []


@pytest.mark.parametrize("inputs, message", [
    ({"image_1": "I1", "mask_2": "M2"}, "mask_2 is connected but image_2 is not"),
    ({"region_3": "R3", "garment_1": "G1"}, "region_3 is connected but garment_3 is not"),
])
def test_a_socket_without_its_main_input_names_both(inputs, message):
    names = ("garment", "mask", "slot", "region") if "garment_1" in inputs else ("image", "mask", "label")
    defaults = {"slot": ("u", "l", "h")} if "garment_1" in inputs else DEFAULTS
    with pytest.raises(ValueError, match=message):
        collect_slots(inputs, 3, names, defaults)


def test_groups_beyond_count_are_not_read():
    assert collect_slots({"image_4": "I4", "mask_4": "M4"}, 3, ("image", "mask", "label"), DEFAULTS) == []
