"""A node combo's options as an enum whose values are the labels saved in workflows.

A label becomes its member once, where it enters (the node, or a pipeline's public entry); code below compares
members and never spells a label.
"""
from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

L = TypeVar("L", bound="Labeled")


class Labeled(StrEnum):
    @classmethod
    def labels(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def from_label(cls: type[L], label: str, what: str) -> L:
        """The member of a saved label; ``what`` names the input in the error."""
        try:
            return cls(label)
        except ValueError:
            raise ValueError(f"{what} must be one of {cls.labels()}, got {label!r}") from None
