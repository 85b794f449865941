"""Streaming K×K max-pooling (stride K) over a raster-order feature map."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int

__all__ = ["MaxPool"]


class MaxPool(wiring.Component):
    """Max over K×K blocks of an (H, W, C) map, one pixel (C elements) per beat in and out.

    A row of ``W // K`` running maxima (registers) is updated as pixels pass; the last pixel of
    a block emits it. Rows and columns past the last full block are consumed and dropped, as in
    torch. On bits the max is an OR; on bytes an unsigned (uint8) or signed (int8) max.

    Parameters
    ----------
    in_shape : tuple
        ``(H, W, C)``.
    kernel : int
        Block size and stride.
    element_kind : str
        ``"bits"``, ``"uint8"`` or ``"int8"``.
    """

    def __init__(self, in_shape: tuple[int, int, int], kernel: int, element_kind: str):
        height, width, channels = in_shape
        for name, value in (("height", height), ("width", width), ("channels", channels), ("kernel", kernel)):
            check_positive_int(name, value)
        if element_kind not in ("bits", "uint8", "int8"):
            raise ValueError(f"element_kind must be 'bits', 'uint8' or 'int8', not {element_kind!r}")
        if kernel > min(height, width):
            raise ValueError(f"a {kernel}x{kernel} pool does not fit a {height}x{width} map")
        self._in_shape = (height, width, channels)
        self._kernel = kernel
        self._kind = element_kind
        self._bits = 1 if element_kind == "bits" else 8
        super().__init__({
            "i": In(stream.Signature(unsigned(channels * self._bits))),
            "o": Out(stream.Signature(unsigned(channels * self._bits))),
        })

    @property
    def cycles_per_image(self) -> int:
        """One input pixel per cycle: ``H * W``."""
        height, width, _ = self._in_shape
        return height * width

    def _max(self, a, b):
        """Element-wise max of two pixels."""
        if self._kind == "bits":
            return a | b
        channels = self._in_shape[2]
        pick = []
        for c in range(channels):
            x, y = a.word_select(c, 8), b.word_select(c, 8)
            if self._kind == "int8":
                x, y = x.as_signed(), y.as_signed()
            pick.append(Mux(x > y, x, y)[:8])
        return Cat(pick)

    def elaborate(self, platform):
        m = Module()
        height, width, channels = self._in_shape
        k = self._kernel
        out_w = width // k
        pixel_width = channels * self._bits
        running = Array(Signal(pixel_width, name=f"running{x}") for x in range(out_w))

        y, x = Signal(range(height)), Signal(range(width))
        block_x = Signal(range(out_w + 1))       # x // k, tracked incrementally
        in_block_x = Signal(range(k))            # x % k
        in_block_y = Signal(range(k))            # y % k
        kept = Signal()
        m.d.comb += kept.eq((y < (height // k) * k) & (x < out_w * k))

        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            first = (in_block_x == 0) & (in_block_y == 0)
            merged = Mux(first, self.i.payload, self._max(running[block_x], self.i.payload))
            with m.If(kept):
                m.d.sync += running[block_x].eq(merged)
                with m.If((in_block_x == k - 1) & (in_block_y == k - 1)):
                    m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(merged)]
            # Advance the raster position and the block coordinates.
            m.d.sync += [x.eq(x + 1), in_block_x.eq(Mux(in_block_x == k - 1, 0, in_block_x + 1)),
                         block_x.eq(block_x + (in_block_x == k - 1))]
            with m.If(x == width - 1):
                m.d.sync += [x.eq(0), in_block_x.eq(0), block_x.eq(0), y.eq(y + 1),
                             in_block_y.eq(Mux(in_block_y == k - 1, 0, in_block_y + 1))]
                with m.If(y == height - 1):
                    m.d.sync += [y.eq(0), in_block_y.eq(0)]
        return m
