"""Small arithmetic builders shared by the hardware blocks."""
from __future__ import annotations

from typing import NamedTuple

from amaranth.hdl import Const, Module, Signal, Value, unsigned
from amaranth.lib import memory


class MemoryShape(NamedTuple):
    """One ``lib.memory.Memory`` of a block: what a resource estimate needs to know about it."""

    name: str
    depth: int
    width: int
    rom: bool
    #: Held in iCE40UP SPRAM blocks (:class:`~hwgen.rtl.spram.SPRAMWeights`), written at power-up.
    spram: bool = False

    @property
    def bits(self) -> int:
        return self.depth * self.width

    @property
    def in_luts(self) -> bool:
        """A ROM :func:`read_rom` builds from LUTs itself: logic in every netlist, never a memory."""
        return self.rom and not self.spram and rom_in_luts(self.depth)


def rom_shapes(name: str, depth: int, width: int) -> list[MemoryShape]:
    """The ROM a block lists for :func:`read_rom`'s contents: none for a single word, which is a constant."""
    return [] if depth == 1 else [MemoryShape(name, depth, width, rom=True)]


#: The yosys command that keeps :func:`register_copies` apart: it marks each flip-flop driving a
#: wire with the ``keep`` attribute as kept, which stops ``opt_merge`` from merging identical
#: copies back into one. Every yosys run of hwgen's designs runs it after reading them.
KEEP_REGISTER_COPIES = "proc; setattr -set keep 1 w:* a:keep %i %ci1:+$dff[Q] t:$dff %i"


def register_copies(m: Module, value: Value, count: int, name: str, enable: Value | None = None) -> list[Signal]:
    """``count`` registers that each load ``value`` (when ``enable``), so that each copy drives a
    share of a net with a large fan-out, placed near its loads.

    The copies carry the ``keep`` attribute: Vivado keeps such registers apart, and yosys does
    with :data:`KEEP_REGISTER_COPIES`. Without it the copies would be merged into one register.
    """
    copies = [Signal(value.shape(), name=f"{name}_copy{k}", reset_less=True, attrs={"keep": 1})
              for k in range(count)]
    update = [copy.eq(value) for copy in copies]
    if enable is None:
        m.d.sync += update
    else:
        with m.If(enable):
            m.d.sync += update
    return copies


#: ROMs this deep or shallower are built from LUTs (a LUT4 per 16 words per bit, and multiplexers).
#: yosys's ``memory_libmap`` puts them in logic anyway, whatever their width: it costs logic at
#: depth x width / 16 and a block RAM at 128 (ECP5, 36 bits wide) or 64 (iCE40, 16 bits wide) per
#: block, more for depths up to 48. Built by yosys, a 36 x 512-bit ROM hung from one address
#: register was the critical path of a CNN on ECP5.
LUT_ROM_DEPTH = 48

#: Bits of a LUT ROM that share one copy of its registered address.
LUT_ROM_GROUP_BITS = 32


def rom_in_luts(depth: int) -> bool:
    """Whether :func:`read_rom` builds a ROM of ``depth`` words from LUTs itself."""
    return 1 < depth <= LUT_ROM_DEPTH


def read_rom(m: Module, name: str, words: list[int], width: int, addr: Value, enable: Value) -> Value:
    """The word of ``words`` at ``addr``, one cycle after ``enable``; a single word is a constant.

    A one-word ``Memory`` would be removed by yosys once its output register is merged, so a report
    listing it would not match the netlist; a constant is what the hardware holds either way.

    A ROM of at most :data:`LUT_ROM_DEPTH` words is built here from LUTs, with the register on the
    address: every :data:`LUT_ROM_GROUP_BITS` bits read their own copy of it, so that no address
    net reaches hundreds of LUTs across the chip and no LUT is shared between distant bits. As a
    ``Memory``, a 640-bit wide ROM of 10 words became an address register fanned out to chains of
    shared LUTs, the critical path of its layer on ECP5.
    """
    if len(words) == 1:
        return Const(words[0], unsigned(width))
    if rom_in_luts(len(words)):
        data = Signal(width, name=f"{name}_data")
        groups = range(0, width, LUT_ROM_GROUP_BITS)
        copies = register_copies(m, addr[:(len(words) - 1).bit_length()], len(groups), f"{name}_addr", enable)
        for low, copy in zip(groups, copies):
            high = min(width, low + LUT_ROM_GROUP_BITS)
            with m.Switch(copy):
                for index, word in enumerate(words):
                    with m.Case(index):
                        m.d.comb += data[low:high].eq((word >> low) & ((1 << (high - low)) - 1))
        return data
    m.submodules[name] = rom = memory.Memory(shape=unsigned(width), depth=len(words), init=words)
    port = rom.read_port()
    m.d.comb += [port.addr.eq(addr), port.en.eq(enable)]
    return port.data


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


def tree_depth(count: int) -> int:
    """Adder levels of a balanced tree over ``count`` terms, ``ceil(log2(count))``."""
    return max(0, (count - 1).bit_length())


def tree_stages(count: int, levels_per_stage: int) -> int:
    """Registers :func:`pipelined_tree_sum` puts between its terms and its registered sum."""
    return max(1, -(-tree_depth(count) // levels_per_stage))


def pipelined_tree_sum(m: Module, terms: list[Value], *, levels_per_stage: int, name: str,
                       keep: bool = True) -> Signal:
    """A balanced adder tree with a register after every ``levels_per_stage`` levels and at its end.

    The registers load every cycle (the caller's pipeline has no clock enable) and have no reset:
    what they hold before the first valid value is never used. With ``keep``, each level's
    sums are kept as signals so that yosys maps every two-input addition onto a carry chain
    instead of merging the whole tree into one multi-operand adder, which it builds from LUT full
    adders at about twice the LUTs. The result is registered; :func:`tree_stages` gives how many
    registers lie on the way.
    """
    if not terms:
        raise ValueError("pipelined_tree_sum needs at least one term")
    level, depth = list(terms), 0

    def register(values: list[Value], tag: str) -> list[Signal]:
        regs = [Signal(v.shape(), name=f"{name}_{tag}_{i}", reset_less=True) for i, v in enumerate(values)]
        m.d.sync += [reg.eq(v) for reg, v in zip(regs, values)]
        return regs

    while len(level) > 1:
        paired = [a + b for a, b in zip(level[0::2], level[1::2])]
        if keep:
            kept = [Signal(v.shape(), name=f"{name}_sum{depth}_{i}", attrs={"keep": 1}) for i, v in enumerate(paired)]
            m.d.comb += [k.eq(v) for k, v in zip(kept, paired)]
            paired = kept
        level = paired + level[len(paired) * 2:]
        depth += 1
        if depth % levels_per_stage == 0 and len(level) > 1:
            level = register(level, f"level{depth}")
    return register(level, "total")[0]


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending: the valid PE/SIMD choices for a size ``n``."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_positive_int(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a positive ``int`` (``bool`` excluded)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TypeError(f"{name} must be a positive integer, not {value!r}")
