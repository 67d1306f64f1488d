"""Changesets: the instructions one write transaction made (DESIGN.md §2).

Every instruction names an object by ``(model, pk)`` and carries its own HLC. A changeset
groups the instructions of one transaction of one replica (``origin``) under that replica's
dense, increasing ``version``; ``(origin, version)`` identifies it everywhere, which is what
makes applying it twice a no-op.

``value`` and ``key`` mean, by op:

=============  ==============================  ===================================
op             value                           key
=============  ==============================  ===================================
CREATE         dict of every field's value     (unused)
SET            the new value (whole field;     (unused)
               for a collection: its new
               contents, replacing the old)
ADD            the amount added to a counter   (unused)
ERASE          (unused)                        (unused)
LIST_INSERT    the element                     HLC of the element it goes after,
                                               or None for the head; the new
                                               element's id is the instruction's HLC
LIST_SET       the element's new value         the element's id (an HLC)
LIST_ERASE     (unused)                        the element's id (an HLC)
SET_ADD        the element                     (unused)
SET_REMOVE     the element                     (unused)
DICT_SET       the value                       the key (str)
DICT_ERASE     (unused)                        the key (str)
=============  ==============================  ===================================

A list "move" is an erase plus an insert of the same value (a new element id).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from .hlc import HLC

Value = Any


class Op(IntEnum):
    """Instruction kinds."""

    CREATE = 1
    SET = 2
    ADD = 3
    ERASE = 4
    LIST_INSERT = 5
    LIST_SET = 6
    LIST_ERASE = 7
    SET_ADD = 8
    SET_REMOVE = 9
    DICT_SET = 10
    DICT_ERASE = 11


#: Ops that name a field.
FIELD_OPS = frozenset(Op) - {Op.CREATE, Op.ERASE}


class Instruction(NamedTuple):
    """One change to one object (see the module docstring for ``value`` and ``key``).

    A named tuple rather than a dataclass: local writes make one per change, and tuples are
    the cheapest immutable records Python has."""

    op: Op
    model: str
    pk: Value
    hlc: HLC
    field: str | None = None
    value: Value = None
    key: Value = None


@dataclass(frozen=True, slots=True)
class Changeset:
    """The instructions of one transaction of one replica."""

    origin: str
    version: int
    instructions: tuple[Instruction, ...]

    @property
    def id(self) -> tuple[str, int]:
        """``(origin, version)``: unique across all replicas."""
        return (self.origin, self.version)
