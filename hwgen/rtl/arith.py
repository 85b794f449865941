"""Small arithmetic builders shared by the hardware blocks."""
from __future__ import annotations

from typing import NamedTuple

from amaranth.hdl import Value


class MemoryShape(NamedTuple):
    """One ``lib.memory.Memory`` of a block: what a resource estimate needs to know about it."""

    name: str
    depth: int
    width: int
    rom: bool

    @property
    def bits(self) -> int:
        return self.depth * self.width


def tree_sum(terms: list[Value]) -> Value:
    """Sum ``terms`` as a balanced adder tree (depth ``ceil(log2(len(terms)))``).

    Amaranth widens each addition by one bit, so the result never overflows.
    """
    if not terms:
        raise ValueError("tree_sum needs at least one term")
    level = list(terms)
    while len(level) > 1:
        paired = [a + b for a, b in zip(level[0::2], level[1::2])]
        level = paired + level[len(paired) * 2:]
    return level[0]


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending: the valid PE/SIMD choices for a size ``n``."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_positive_int(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a positive ``int`` (``bool`` excluded)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TypeError(f"{name} must be a positive integer, not {value!r}")
