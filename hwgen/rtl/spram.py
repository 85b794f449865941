"""Weight memory in iCE40UP single-port RAM (SB_SPRAM256KA), written once at power-up."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int

__all__ = ["SPRAM_WIDTH", "SPRAM_DEPTH", "SPRAM_PRIMITIVE", "spram_columns", "spram_banks", "spram_blocks",
           "SPRAMWeights"]

#: Data bits of one SB_SPRAM256KA: its port width, and so the bits per cycle one block reads.
SPRAM_WIDTH = 16
#: Words of one SB_SPRAM256KA (256 kbit).
SPRAM_DEPTH = 16384
#: The primitive's name (yosys cannot infer it from a memory with initial contents, and every
#: ``lib.memory.Memory`` has some, so it is instantiated).
SPRAM_PRIMITIVE = "SB_SPRAM256KA"


def spram_columns(width: int) -> int:
    """Blocks side by side for a word of ``width`` bits."""
    return -(-width // SPRAM_WIDTH)


def spram_banks(depth: int) -> int:
    """Blocks one above the other for ``depth`` words."""
    return -(-depth // SPRAM_DEPTH)


def spram_blocks(width: int, depth: int) -> int:
    """SB_SPRAM256KA blocks a memory of ``depth`` words of ``width`` bits takes."""
    return spram_columns(width) * spram_banks(depth)


class SPRAMWeights(wiring.Component):
    """A weight memory of ``depth`` words of ``width`` bits in SB_SPRAM256KA blocks.

    The blocks have no initial contents: a loader writes the words 16 bits at a time (one column of
    one row per ``load_valid`` cycle) before the layer reads them. Reads and writes share the
    blocks' single address port; a cycle with ``load_valid`` writes, any other reads
    ``read_addr``, whose word is on ``read_data`` one cycle later (as a ``lib.memory`` read port).

    Parameters
    ----------
    width : int
        Bits per word; ``ceil(width / 16)`` columns of blocks.
    depth : int
        Words; ``ceil(depth / 16384)`` banks of blocks.

    Attributes
    ----------
    read_addr : ``In(range(depth))``
    read_data : ``Out(width)``
    load_valid : ``In(1)``
        Write ``load_data`` into column ``load_column`` of row ``load_row`` this cycle.
    load_row : ``In(range(depth))``
    load_column : ``In(range(columns))``
        Bits ``[16 * column, 16 * column + 16)`` of the row.
    load_data : ``In(16)``
    """

    def __init__(self, width: int, depth: int):
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        self._width = width
        self._depth = depth
        super().__init__({
            "read_addr": In(range(depth)),
            "read_data": Out(width),
            "load_valid": In(1),
            "load_row": In(range(depth)),
            "load_column": In(range(self.columns)),
            "load_data": In(SPRAM_WIDTH),
        })

    @property
    def width(self) -> int:
        return self._width

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def columns(self) -> int:
        """Blocks side by side: ``ceil(width / 16)``."""
        return spram_columns(self._width)

    @property
    def banks(self) -> int:
        """Blocks one above the other: ``ceil(depth / 16384)``."""
        return spram_banks(self._depth)

    @property
    def blocks(self) -> int:
        """SB_SPRAM256KA blocks: :attr:`columns` times :attr:`banks`."""
        return self.columns * self.banks

    @property
    def read_latency(self) -> int:
        """Cycles from ``read_addr`` to ``read_data``."""
        return 1

    def elaborate(self, platform):
        m = Module()
        address = Signal(range(self._depth))
        m.d.comb += address.eq(Mux(self.load_valid, self.load_row, self.read_addr))
        # The bank a read came from, for the output multiplexer a cycle later.
        bank_bits = max(0, (self.banks - 1).bit_length())
        read_bank = Signal(bank_bits) if bank_bits else None
        if read_bank is not None:
            m.d.sync += read_bank.eq(address[14:14 + bank_bits])
        outputs = [[Signal(SPRAM_WIDTH, name=f"spram{bank}_{column}_data") for column in range(self.columns)]
                   for bank in range(self.banks)]
        for bank in range(self.banks):
            selected = Const(1) if read_bank is None else address[14:14 + bank_bits] == bank
            for column in range(self.columns):
                write = self.load_valid & (self.load_column == column)
                m.submodules[f"spram{bank}_{column}"] = Instance(
                    SPRAM_PRIMITIVE,
                    i_ADDRESS=address[:14], i_DATAIN=self.load_data, i_MASKWREN=Const(0b1111, 4),
                    i_WREN=write, i_CHIPSELECT=selected, i_CLOCK=ClockSignal("sync"), i_STANDBY=Const(0), i_SLEEP=Const(0),
                    i_POWEROFF=Const(1), o_DATAOUT=outputs[bank][column])
        words = [Cat(row) for row in outputs]
        word = words[0] if read_bank is None else Array(words)[read_bank]
        m.d.comb += self.read_data.eq(word[:self._width])
        return m

