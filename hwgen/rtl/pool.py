"""Streaming K×K max-pooling (stride K) over a raster-order feature map."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import LOW_BIT_ACTIVATIONS, element_bits
from .arith import MemoryShape, check_positive_int

__all__ = ["MaxPool"]


class MaxPool(wiring.Component):
    """Max over K×K blocks of an (H, W, C) map, one pixel (C elements) per beat in and out.

    Each block's max is taken in two steps: a register holds the max of the block's pixels in
    the current row, and when the row's last pixel of the block arrives that max is merged with
    the block's max over the rows above, kept in a memory of ``W // K`` pixels (block RAM or LUT
    RAM, not a row of registers). The memory word is read when the block's first pixel of the row
    arrives, so with ``K >= 2`` it is ready before it is needed; with ``K == 1`` every pixel is its
    own block and passes through. The last pixel of a block emits it. Rows and columns past the
    last full block are consumed and dropped, as in torch. On bits the max is an OR; on bytes an
    unsigned (uint8) or signed (int8) max.

    Parameters
    ----------
    in_shape : tuple
        ``(H, W, C)``.
    kernel : int
        Block size and stride.
    element_kind : str
        ``"bits"``, ``"uint8"``, ``"int8"`` or ``"uint2"`` to ``"uint4"``.

    Attributes
    ----------
    i : ``In(stream.Signature(C * bits))``
    o : ``Out(stream.Signature(C * bits))``
    """

    def __init__(self, in_shape: tuple[int, int, int], kernel: int, element_kind: str):
        height, width, channels = in_shape
        for name, value in (("height", height), ("width", width), ("channels", channels), ("kernel", kernel)):
            check_positive_int(name, value)
        if element_kind not in ("bits", "uint8", "int8", *LOW_BIT_ACTIVATIONS):
            raise ValueError(f"element_kind must be 'bits', 'uint8', 'int8' or one of "
                             f"{', '.join(map(repr, LOW_BIT_ACTIVATIONS))}, not {element_kind!r}")
        if kernel > min(height, width):
            raise ValueError(f"a {kernel}x{kernel} pool does not fit a {height}x{width} map")
        self._in_shape = (height, width, channels)
        self._kernel = kernel
        self._kind = element_kind
        self._bits = element_bits(element_kind)
        super().__init__({
            "i": In(stream.Signature(unsigned(channels * self._bits))),
            "o": Out(stream.Signature(unsigned(channels * self._bits))),
        })

    @property
    def pixel_width(self) -> int:
        """Bits per pixel: ``C`` elements."""
        return self._in_shape[2] * self._bits

    @property
    def cycles_per_image(self) -> int:
        """One input pixel per cycle: ``H * W``."""
        height, width, _ = self._in_shape
        return height * width

    @property
    def latency(self) -> int:
        """Cycles from a block's last pixel accepted on ``i`` to its max valid on ``o``: 1."""
        return 1

    @property
    def memories(self) -> list[MemoryShape]:
        """The maxima over the rows above of one row of blocks: ``W // K`` pixels (none if ``K == 1``)."""
        if self._kernel == 1:
            return []
        return [MemoryShape("partial", self._in_shape[1] // self._kernel, self.pixel_width, rom=False)]

    def _max(self, a, b):
        """Element-wise max of two pixels."""
        if self._kind == "bits":
            return a | b
        channels = self._in_shape[2]
        pick = []
        for c in range(channels):
            x, y = a.word_select(c, self._bits), b.word_select(c, self._bits)
            if self._kind == "int8":
                x, y = x.as_signed(), y.as_signed()
            pick.append(Mux(x > y, x, y)[:self._bits])
        return Cat(pick)

    def elaborate(self, platform):
        m = Module()
        height, width, _ = self._in_shape
        k = self._kernel
        out_w = width // k

        y, x = Signal(range(height)), Signal(range(width))
        block_x = Signal(range(out_w + 1))       # x // k, tracked incrementally
        in_block_x = Signal(range(k))            # x % k
        in_block_y = Signal(range(k))            # y % k
        kept = Signal()
        m.d.comb += kept.eq((y < (height // k) * k) & (x < out_w * k))

        accept = Signal()
        m.d.comb += [self.i.ready.eq(~self.o.valid | self.o.ready), accept.eq(self.i.valid & self.i.ready)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        pixel = self.i.payload
        if k == 1:
            block_max = pixel
        else:
            m.submodules.partial = partial = memory.Memory(shape=unsigned(self.pixel_width), depth=out_w, init=[])
            write, read = partial.write_port(), partial.read_port()
            row_max = Signal(self.pixel_width, reset_less=True)
            row_block_max = self._max(row_max, pixel)
            block_max = Mux(in_block_y == 0, row_block_max, self._max(read.data, row_block_max))
            # The read is issued at the block's first pixel of the row and its data held until the
            # next read, which comes after this block's last pixel (k >= 2 pixels later).
            m.d.comb += [
                read.addr.eq(block_x), read.en.eq(accept & (in_block_x == 0)),
                write.addr.eq(block_x), write.data.eq(block_max),
                write.en.eq(accept & kept & (in_block_x == k - 1) & (in_block_y != k - 1)),
            ]
            with m.If(accept):
                m.d.sync += row_max.eq(Mux(in_block_x == 0, pixel, row_block_max))

        with m.If(accept):
            with m.If(kept & (in_block_x == k - 1) & (in_block_y == k - 1)):
                m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(block_max)]
            # Advance the raster position and the block coordinates.
            m.d.sync += [x.eq(x + 1), in_block_x.eq(Mux(in_block_x == k - 1, 0, in_block_x + 1)),
                         block_x.eq(block_x + (in_block_x == k - 1))]
            with m.If(x == width - 1):
                m.d.sync += [x.eq(0), in_block_x.eq(0), block_x.eq(0), y.eq(y + 1),
                             in_block_y.eq(Mux(in_block_y == k - 1, 0, in_block_y + 1))]
                with m.If(y == height - 1):
                    m.d.sync += [y.eq(0), in_block_y.eq(0)]
        return m
