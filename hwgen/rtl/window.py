"""Sliding-window generator for convolutions: a ring of line buffers over a streamed feature map."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import conv_output_size
from .arith import MemoryShape, check_positive_int

__all__ = ["SlidingWindow"]

#: Width of the global row counters; producer and consumer compare them modulo 2**16.
_ROW_BITS = 16


class SlidingWindow(wiring.Component):
    """Stream the K×K windows of an (H, W, C) map, one input pixel (C elements) per beat.

    Pixels arrive in raster order. For every output position ``(oy, ox)`` in raster order the
    component emits the ``K * K`` pixels of its window in ``(ky, kx)`` order; a pixel outside the
    map (padding) is all zeros, which is bit 0 = -1 for binary maps and 0 for byte maps.

    The buffer is a ring of ``2K + S - 1`` rows (``S`` the stride), not a frame: the producer may write
    a row once the consumer no longer needs the row it replaces, and the consumer reads a pixel
    once it has been written. Both count rows globally across images, so the next image's first
    rows load while the current image's last windows are read out.

    Parameters
    ----------
    in_shape : tuple
        ``(H, W, C)``.
    kernel, stride, padding : int
        ``padding`` must be smaller than ``kernel``.
    element_bits : int
        Bits per channel element.

    Attributes
    ----------
    i : ``In(stream.Signature(C * element_bits))``
    o : ``Out(stream.Signature(C * element_bits))``
    """

    def __init__(self, in_shape: tuple[int, int, int], kernel: int, stride: int, padding: int, element_bits: int):
        height, width, channels = in_shape
        for name, value in (("height", height), ("width", width), ("channels", channels), ("kernel", kernel),
                            ("stride", stride), ("element_bits", element_bits)):
            check_positive_int(name, value)
        if not isinstance(padding, int) or padding < 0 or padding >= kernel:
            raise ValueError(f"padding must be an integer in [0, kernel - 1] = [0, {kernel - 1}], not {padding!r}")
        if kernel > min(height, width) + 2 * padding:
            raise ValueError(f"a {kernel}x{kernel} kernel does not fit a {height}x{width} map with padding {padding}")
        self._in_shape = (height, width, channels)
        self._kernel, self._stride, self._padding = kernel, stride, padding
        self._element_bits = element_bits
        super().__init__({
            "i": In(stream.Signature(unsigned(channels * element_bits))),
            "o": Out(stream.Signature(unsigned(channels * element_bits))),
        })

    @property
    def out_shape(self) -> tuple[int, int]:
        height, width, _ = self._in_shape
        return (conv_output_size(height, self._kernel, self._stride, self._padding),
                conv_output_size(width, self._kernel, self._stride, self._padding))

    @property
    def rows(self) -> int:
        """Rows held in the ring: ``2K + S - 1``.

        ``K + S`` rows keep one image streaming; the extra ``K - 1`` let the producer load the next
        image's first ``K`` rows while the last output row of this image is read, so that image
        boundaries cost no cycles: the last output row's top is ``(Ho - 1) S - P >= H - K - S + 1 + P``,
        and rows up to ``top + rows - 1 - H >= K - 1`` of the next image may then be written.
        """
        return 2 * self._kernel + self._stride - 1

    @property
    def output_beats(self) -> int:
        """Window pixels per image: ``Ho * Wo * K * K``."""
        out_h, out_w = self.out_shape
        return out_h * out_w * self._kernel * self._kernel

    @property
    def memories(self) -> list[MemoryShape]:
        """The ring of line buffers: ``rows * W`` pixels of ``C`` elements."""
        _, width, channels = self._in_shape
        return [MemoryShape("lines", self.rows * width, channels * self._element_bits, rom=False)]

    @property
    def cycles_per_image(self) -> int:
        """One pixel moves per cycle on the busier side: ``max(H * W, Ho * Wo * K * K)``."""
        height, width, _ = self._in_shape
        return max(height * width, self.output_beats)

    def elaborate(self, platform):
        m = Module()
        height, width, channels = self._in_shape
        kernel, stride, padding, rows = self._kernel, self._stride, self._padding, self.rows
        out_h, out_w = self.out_shape

        m.submodules.lines = lines = memory.Memory(
            shape=unsigned(channels * self._element_bits), depth=rows * width, init=[])
        write, read = lines.write_port(), lines.read_port()

        advance = Signal()
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)

        def wrap_add(value, amount: int | Signal):
            """``(value + amount) mod rows`` for operands below ``rows``."""
            total = value + amount
            return Mux(total >= rows, total - rows, total)

        # Consumer state: the current image's first global row and its ring slot, the output
        # position (as the top-left input coordinate of its window) and the window offset.
        image_row = Signal(_ROW_BITS)
        image_slot = Signal(range(rows))
        top = Signal(signed(_ROW_BITS), init=-padding)       # oy * S - P
        left = Signal(signed(_ROW_BITS), init=-padding)      # ox * S - P
        top_slot = Signal(range(rows), init=(rows - padding) % rows)   # ring slot of row `top`, mod rows
        ky, kx = Signal(range(kernel)), Signal(range(kernel))
        oy, ox = Signal(range(out_h)), Signal(range(out_w))

        # Producer: writes row `write_row` (global) into slot `write_slot`, column `write_col`.
        write_row = Signal(_ROW_BITS)
        write_slot = Signal(range(rows))
        write_col = Signal(range(width))
        lowest_needed = Signal(_ROW_BITS)
        m.d.comb += lowest_needed.eq(image_row + Mux(top < 0, 0, top))
        ahead = Signal(signed(_ROW_BITS))
        m.d.comb += [
            ahead.eq(write_row - lowest_needed),
            self.i.ready.eq(ahead < rows),
            write.addr.eq(write_slot * width + write_col),
            write.data.eq(self.i.payload),
            write.en.eq(self.i.valid & self.i.ready),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += write_col.eq(write_col + 1)
            with m.If(write_col == width - 1):
                m.d.sync += [write_col.eq(0), write_row.eq(write_row + 1), write_slot.eq(wrap_add(write_slot, 1))]

        # Consumer: the pixel (iy, ix) = (top + ky, left + kx) of the current window.
        iy, ix = Signal(signed(_ROW_BITS)), Signal(signed(_ROW_BITS))
        inside = Signal()
        needed = Signal(_ROW_BITS)
        behind = Signal(signed(_ROW_BITS))
        written = Signal()
        m.d.comb += [
            iy.eq(top + ky), ix.eq(left + kx),
            inside.eq((iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)),
            needed.eq(image_row + iy),
            behind.eq(write_row - needed),
            written.eq((behind > 0) | ((behind == 0) & (write_col > ix))),
        ]
        fire = Signal()
        m.d.comb += [
            fire.eq(advance & (~inside | written)),
            read.addr.eq(wrap_add(top_slot, ky) * width + ix[:max(1, (width - 1).bit_length())]),
            read.en.eq(advance),
        ]
        with m.If(fire):
            m.d.sync += kx.eq(kx + 1)
            with m.If(kx == kernel - 1):
                m.d.sync += [kx.eq(0), ky.eq(ky + 1)]
                with m.If(ky == kernel - 1):
                    m.d.sync += [ky.eq(0), ox.eq(ox + 1), left.eq(left + stride)]
                    with m.If(ox == out_w - 1):
                        m.d.sync += [ox.eq(0), left.eq(-padding), oy.eq(oy + 1), top.eq(top + stride),
                                     top_slot.eq(wrap_add(top_slot, stride % rows))]
                        with m.If(oy == out_h - 1):
                            next_slot = wrap_add(image_slot, height % rows)
                            m.d.sync += [oy.eq(0), top.eq(-padding), image_row.eq(image_row + height),
                                         image_slot.eq(next_slot),
                                         top_slot.eq(wrap_add(next_slot, (rows - padding) % rows))]

        s1_valid, s1_inside = Signal(), Signal()
        with m.If(advance):
            m.d.sync += [s1_valid.eq(fire), s1_inside.eq(inside)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(advance & s1_valid):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(Mux(s1_inside, read.data, 0))]
        return m
