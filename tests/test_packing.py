"""Packing instructions one by one and joining them gives the bytes of packing the list."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tidesync.core.changeset import Instruction, Op
from tidesync.core.hlc import HLC
from tidesync.core.packing import join_packed, pack_instruction, pack_instructions

INSTRUCTION = st.builds(
    Instruction,
    st.just(Op.SET),
    st.sampled_from(["Task", "Person"]),
    st.integers(0, 10**6),
    st.builds(HLC, st.integers(0, 2**40), st.integers(0, 1000), st.just("o")),
    st.sampled_from(["a", "b"]),
    st.one_of(
        st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5), st.binary(max_size=5)
    ),
    st.none(),
)


@given(st.lists(INSTRUCTION, max_size=40))
def test_joined_equals_packed_list(items: list[Instruction]) -> None:
    assert join_packed([pack_instruction(i) for i in items]) == pack_instructions(items)


def test_large_array_headers() -> None:
    ins = Instruction(Op.ERASE, "T", 1, HLC(1, 0, "o"))
    for n in (0, 15, 16, 65535, 65536):
        assert join_packed([pack_instruction(ins)] * n) == pack_instructions([ins] * n)
