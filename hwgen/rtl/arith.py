"""Small arithmetic builders shared by the hardware blocks."""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

from amaranth.hdl import Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import memory


class MemoryShape(NamedTuple):
    """One ``lib.memory.Memory`` of a block: what a resource estimate needs to know about it."""

    name: str
    depth: int
    width: int
    rom: bool
    #: Held in iCE40UP SPRAM blocks (:class:`~hwgen.rtl.spram.SPRAMWeights`), written at power-up.
    spram: bool = False
    #: A ROM in LUTs read as registered tables of :data:`LUT_ROM_TABLE` words, then OR-ed
    #: (:func:`read_rom` with ``banked``).
    tables_registered: bool = False

    @property
    def bits(self) -> int:
        return self.depth * self.width

    @property
    def in_luts(self) -> bool:
        """A ROM :func:`read_rom` builds from LUTs itself: logic in every netlist, never a memory."""
        return self.rom and not self.spram and rom_in_luts(self.depth)


def rom_shapes(name: str, depth: int, width: int, *, banked: bool = False) -> list[MemoryShape]:
    """The ROMs a block lists for :func:`read_rom`'s contents (with the same ``banked``): none for a
    single word, which is a constant; one per bank of a banked ROM, named ``<name><bank>``, each
    :func:`rom_bank_depth` words deep (the last one padded)."""
    if depth == 1:
        return []
    banks = rom_banks(depth, width) if banked else 1
    if banks == 1 or rom_in_luts(depth):
        return [MemoryShape(name, depth, width, rom=True, tables_registered=banks > 1)]
    return [MemoryShape(f"{name}{bank}", rom_bank_depth(depth, width), width, rom=True) for bank in range(banks)]


#: The yosys command that keeps :func:`register_copies` apart: it marks each flip-flop driving a
#: wire with the ``keep`` attribute as kept, which stops ``opt_merge`` from merging identical
#: copies back into one. Every yosys run of hwgen's designs runs it after reading them.
KEEP_REGISTER_COPIES = "proc; setattr -set keep 1 w:* a:keep %i %ci1:+$dff[Q] t:$dff %i"


def register_copies(m: Module, value: Value, count: int, name: str, enable: Value | None = None, *,
                    reset_less: bool = True) -> list[Signal]:
    """``count`` registers that each load ``value`` (when ``enable``), so that each copy drives a
    share of a net with a large fan-out, placed near its loads; with ``reset_less=False`` they
    reset to zero with their domain.

    The copies carry the ``keep`` attribute: Vivado keeps such registers apart, and yosys does
    with :data:`KEEP_REGISTER_COPIES`. Without it the copies would be merged into one register.
    """
    copies = [Signal(value.shape(), name=f"{name}_copy{k}", reset_less=reset_less, attrs={"keep": 1})
              for k in range(count)]
    update = [copy.eq(value) for copy in copies]
    if enable is None:
        m.d.sync += update
    else:
        with m.If(enable):
            m.d.sync += update
    return copies


#: ROMs this deep or shallower are built from LUTs (a LUT4 per 16 words per bit, and multiplexers).
#: yosys's ``memory_libmap`` puts them in logic anyway at most widths: it costs logic at
#: depth x width / 16 and a block RAM at 128 (ECP5, 36 bits wide) or 64 (iCE40, 16 bits wide) per
#: block. Built by yosys, a 36 x 512-bit weight ROM and a 64 x 52-bit constant ROM, each hung from
#: one address register, were in turn the critical path of a CNN on ECP5.
LUT_ROM_DEPTH = 64

#: Words of a banked LUT ROM's bank: what one LUT4 holds per bit.
LUT_ROM_TABLE = 16

#: Bits of a LUT ROM that share one copy of its registered address.
LUT_ROM_GROUP_BITS = 32


def rom_in_luts(depth: int) -> bool:
    """Whether :func:`read_rom` builds a ROM of ``depth`` words from LUTs itself."""
    return 1 < depth <= LUT_ROM_DEPTH


#: ``(width, words)`` of ECP5's DP16KD block-RAM configurations, which size the banks of a banked
#: ROM (:func:`rom_bank_depth`). An iCE40 block holds 4 kbit in every configuration, so banks of
#: these depths take as many of its blocks as the unbanked ROM would, give or take rounding.
ROM_BANK_SHAPES = ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))


def rom_bank_depth(depth: int, width: int) -> int:
    """Words per bank of a banked ROM of ``depth`` words ``width`` bits wide: those of the
    block-RAM configuration (:data:`ROM_BANK_SHAPES`) holding it in fewest blocks, the deepest of
    equals: fewer banks, so fewer of their registers and no OR of banks spread over the device. The
    int8 MLP's 2048 x 784-bit first layer as four banks of 512 x 36 placed at 76.2 MHz on the
    ULX3S, the block RAM's output to its bank register 51 columns away (7.3 ns of routing); as
    one bank of 2048 x 9 (the same 88 blocks, each feeding the multipliers of its bytes) at
    97.9 MHz, with 868 fewer LUT4 and 5,000 fewer flip-flops (yosys)."""
    return min(ROM_BANK_SHAPES, key=lambda shape: (math.ceil(width / shape[0]) * math.ceil(depth / shape[1]),
                                                   -shape[1]))[1]


#: Blocks side by side in one memory of a banked block-RAM ROM of several banks, with one copy of
#: the address (:func:`rom_slice_blocks`).
ROM_SLICE_BLOCKS = 4
#: The same for a block-RAM ROM of one bank. The W1A1 MLP's 44-block first-layer bank as eleven
#: memories of four no longer routed on the ULX3S (router2 still overusing about 5,900 wires after
#: 18 iterations); as one memory, one address register reaching the 44 blocks (13.7 ns of routing)
#: held it at 69.5 MHz; as four memories of eleven it placed at 91.1 MHz.
ROM_SINGLE_BANK_SLICE_BLOCKS = 11


def rom_block_width(depth: int, width: int) -> int:
    """Bits of one block in the block-RAM configuration a banked ROM uses (:func:`rom_bank_depth`)."""
    return {words: bits for bits, words in ROM_BANK_SHAPES}[rom_bank_depth(depth, width)]


def rom_slice_blocks(depth: int, width: int) -> int:
    """Blocks of each memory side by side in a bank of a banked block-RAM ROM (:func:`read_rom`
    with ``banked``), at most :data:`ROM_SLICE_BLOCKS` (:data:`ROM_SINGLE_BANK_SLICE_BLOCKS` for a
    ROM of one bank) and spread evenly, the last memory taking what is left. Memories are whole
    blocks wide, so slicing takes no block more than one memory would."""
    blocks = _bank_blocks(depth, width)
    most = ROM_SINGLE_BANK_SLICE_BLOCKS if rom_banks(depth, width) == 1 else ROM_SLICE_BLOCKS
    return -(-blocks // -(-blocks // most))


def _bank_blocks(depth: int, width: int) -> int:
    """Blocks side by side in one bank of a banked block-RAM ROM."""
    return -(-width // rom_block_width(depth, width))


def rom_bank_slices(depth: int, width: int) -> int:
    """Memories side by side in each bank of a banked block-RAM ROM, each :func:`rom_slice_blocks`
    blocks wide and reading its own copy of the address; 1 for a constant or a ROM in LUTs."""
    if depth == 1 or rom_in_luts(depth):
        return 1
    return -(-_bank_blocks(depth, width) // rom_slice_blocks(depth, width))


def rom_banks(depth: int, width: int) -> int:
    """Banks :func:`read_rom` splits a ROM into when ``banked``: one per :data:`LUT_ROM_TABLE`
    words of a ROM in LUTs, one per :func:`rom_bank_depth` words of a block-RAM ROM; 1 for a constant."""
    if depth == 1:
        return 1
    if rom_in_luts(depth):
        return -(-depth // LUT_ROM_TABLE)
    return -(-depth // rom_bank_depth(depth, width))


def rom_bank_stages(depth: int, width: int) -> int:
    """Cycles a banked ROM (:func:`read_rom` with ``banked``) adds to the read: 0 for a constant or
    a single table in LUTs, 1 for several tables (their registers), 2 for block RAMs (two registers
    after each bank, one bank or more)."""
    if rom_in_luts(depth):
        return 0 if rom_banks(depth, width) == 1 else 1
    # A block-RAM ROM of one bank takes the two registers as well: hung straight on a 256-bit
    # register, 29 blocks spread over the device were the int8 MLP's ECP5 critical path (the
    # blocks' 5.6 ns clock-to-output and 9.2 ns of routing).
    return 0 if depth == 1 else 2


def read_rom(m: Module, name: str, words: list[int], width: int, addr: Value, enable: Value, *,
             banked: bool = False, bank_addrs: list[Value] | None = None) -> Value:
    """The word of ``words`` at ``addr``, one cycle after ``enable``; a single word is a constant.

    With ``banked``, a block-RAM ROM, or a LUT ROM of more than one table, is :func:`rom_banks`
    memories or tables, each followed by registers of its own, and the word comes
    :func:`rom_bank_stages` cycles later: yosys joins the blocks of a deep ROM with a multiplexer straight after their
    outputs, and that path, their clock-to-output delay and the routing to the multiplexer
    (12.8 ns), was the critical path of a CNN on ECP5. A block RAM's output takes two registers:
    with one, nextpnr placed it near its loads, and the block's 5.8 ns clock-to-output delay and
    5.1 ns of routing to it were the critical path in turn.

    ``bank_addrs``, with ``banked`` and a block-RAM ROM, gives each memory of each bank its own
    copy of ``addr`` (:func:`rom_banks` times :func:`rom_bank_slices` of them, bank by bank, as
    :func:`register_copies` makes): one address register reaching the 105 blocks of an int8
    layer's banks was its ECP5 critical path (13.8 ns of routing).

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
    banks = rom_banks(len(words), width) if banked else 1
    if rom_in_luts(len(words)):
        return _read_lut_rom(m, name, words, width, addr, enable, banks)
    if banked:
        copies = banks * rom_bank_slices(len(words), width)
        if bank_addrs is not None and len(bank_addrs) != copies:
            raise ValueError(f"{name}: {len(bank_addrs)} bank addresses for {copies} bank memories")
        return _read_banked_rom(m, name, words, width, bank_addrs or [addr] * copies, enable)
    m.submodules[name] = rom = memory.Memory(shape=unsigned(width), depth=len(words), init=words)
    port = rom.read_port()
    m.d.comb += [port.addr.eq(addr), port.en.eq(enable)]
    return port.data


def _read_lut_rom(m: Module, name: str, words: list[int], width: int, addr: Value, enable: Value,
                  banks: int) -> Value:
    data = Signal(width, name=f"{name}_data")
    groups = range(0, width, LUT_ROM_GROUP_BITS)
    copies = register_copies(m, addr[:(len(words) - 1).bit_length()], len(groups), f"{name}_addr", enable)
    if banks == 1:
        for low, copy in zip(groups, copies):
            high = min(width, low + LUT_ROM_GROUP_BITS)
            with m.Switch(copy):
                for index, word in enumerate(words):
                    with m.Case(index):
                        m.d.comb += data[low:high].eq((word >> low) & ((1 << (high - low)) - 1))
        return data
    # Banks of LUT_ROM_TABLE words, one LUT per bit each, registered (zero unless the bank holds
    # the word read); then an OR of the banks. Left to yosys, the 36 words of a 512-bit ROM
    # shared LUTs between bits and took five LUT levels.
    table_bits = (LUT_ROM_TABLE - 1).bit_length()
    tables = [Signal(width, name=f"{name}{bank}_data", reset_less=True) for bank in range(banks)]
    for low, copy in zip(groups, copies):
        high = min(width, low + LUT_ROM_GROUP_BITS)
        for bank, table in enumerate(tables):
            m.d.sync += table[low:high].eq(0)
            with m.If(copy[table_bits:] == bank):
                with m.Switch(copy[:table_bits]):
                    for index, word in enumerate(words[bank * LUT_ROM_TABLE:(bank + 1) * LUT_ROM_TABLE]):
                        with m.Case(index):
                            m.d.sync += table[low:high].eq((word >> low) & ((1 << (high - low)) - 1))
    m.d.comb += data.eq(tree_or(tables))
    return data


def _read_banked_rom(m: Module, name: str, words: list[int], width: int, addrs: list[Value],
                     enable: Value) -> Value:
    banks = rom_banks(len(words), width)
    slices = len(addrs) // banks
    bank_depth = rom_bank_depth(len(words), width) if banks > 1 else len(words)
    slice_bits = rom_slice_blocks(len(words), width) * rom_block_width(len(words), width)
    low_bits = (bank_depth - 1).bit_length()
    # Each bank's output register holds zero unless its bank holds the word read, so the word is
    # an OR of the registers: a multiplexer's select, one register to every bit, was the critical
    # path (its routing 4.9 ns, then four LUT levels for 13 banks).
    outputs = []
    for bank in range(banks):
        # Every bank as deep as the configuration, the last one padded: a short last bank would
        # be yosys's to put in logic or not, and the blocks hold the padding anyway.
        contents = words[bank * bank_depth:(bank + 1) * bank_depth]
        registered = Signal(width, name=f"{name}{bank}_data", reset_less=True)
        for index, low in enumerate(range(0, width, slice_bits)):
            high, addr = min(width, low + slice_bits), addrs[bank * slices + index]
            suffix = f"{bank}" if slices == 1 else f"{bank}_{index}"
            mask = (1 << (high - low)) - 1
            m.submodules[f"{name}{suffix}"] = rom = memory.Memory(
                shape=unsigned(high - low), depth=bank_depth, init=[(word >> low) & mask for word in contents])
            port = rom.read_port()
            m.d.comb += [port.addr.eq(addr[:low_bits]), port.en.eq(enable)]
            if banks == 1:
                m.d.sync += registered[low:high].eq(port.data)
            else:
                # Registered with the memory's address: whether this bank holds the word read.
                holds = Signal(name=f"{name}{suffix}_holds")
                with m.If(enable):
                    m.d.sync += holds.eq(addr[low_bits:] == bank)
                m.d.sync += registered[low:high].eq(Mux(holds, port.data, 0))
        carried = Signal(width, name=f"{name}{bank}_carried", reset_less=True)
        m.d.sync += carried.eq(registered)
        outputs.append(carried)
    data = Signal(width, name=f"{name}_data")
    m.d.comb += data.eq(tree_or(outputs))
    return data


def tree_sum(terms: list[Value]) -> Value:
    """Sum ``terms`` as a balanced adder tree (depth ``ceil(log2(len(terms)))``).

    Amaranth widens each addition by one bit, so the result never overflows.
    """
    if not terms:
        raise ValueError("tree_sum needs at least one term")
    return _balanced(terms, operator.add)


def tree_or(values: list[Value]) -> Value:
    """The bitwise OR of ``values`` as a balanced tree."""
    return _balanced(values, operator.or_)


def _balanced(values: list[Value], combine) -> Value:
    level = list(values)
    while len(level) > 1:
        paired = [combine(a, b) for a, b in zip(level[0::2], level[1::2])]
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
