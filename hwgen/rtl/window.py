"""Sliding-window generator for convolutions: a ring of line buffers over a streamed feature map."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import conv_output_size
from .arith import MemoryShape, check_positive_int

__all__ = ["SlidingWindow"]


class SlidingWindow(wiring.Component):
    """Stream the K×K windows of an (H, W, C) map, one input pixel (C elements) per beat.

    Pixels arrive in raster order. For every output position ``(oy, ox)`` in raster order the
    component emits the ``K * K`` pixels of its window in ``(ky, kx)`` order; a pixel outside the
    map (padding) is all zeros, which is bit 0 = -1 for binary maps and 0 for byte maps.

    The buffer is a ring of ``2K + S - 1`` rows (``S`` the stride), not a frame: the producer may write
    a row once the consumer no longer needs the row it replaces, and the consumer reads a pixel
    once it has been written. Positions are counted across images, so the next image's first
    rows load while the current image's last windows are read out. The two conditions are kept
    as counters (``slack`` and ``backlog``) stepped by constants, so the handshakes come straight
    from registers.

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
        ring_words = rows * width

        m.submodules.lines = lines = memory.Memory(
            shape=unsigned(channels * self._element_bits), depth=ring_words, init=[])
        write, read = lines.write_port(), lines.read_port()

        advance = Signal()
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)

        def wrap_words(value, amount: int):
            """``(value + amount) mod ring_words`` for a row's first word and whole rows ``amount``."""
            total = value + amount % ring_words
            return Mux(total >= ring_words, total - ring_words, total)

        # Each quantity the handshakes compare is a register of its own, updated by a constant
        # step per kind of move, so that no adder lies between the state and `fire` or `i.ready`
        # (computing them from the positions each cycle made this block a design's critical path).
        #
        # `slack` is (pixels written) - (stream position of the window pixel) - 1, positions
        # counted as row * W + column across images: the pixel has been written when slack >= 0.
        # `backlog` is (rows written) - (the lowest row the consumer still needs): the producer may
        # write while backlog < rows.
        last_top, last_left = (out_h - 1) * stride - padding, (out_w - 1) * stride - padding
        moves = {   # the window pixel's position step for each move of the consumer
            "column": 1,
            "row": width - (kernel - 1),
            "window": stride - (kernel - 1) - (kernel - 1) * width,
            "output_row": -(out_w - 1) * stride - (kernel - 1) + (stride - kernel + 1) * width,
            "image": (height - last_top - padding - (kernel - 1)) * width - last_left - padding - (kernel - 1),
        }
        span = (rows + 2 * kernel + 2 * padding + 4) * width
        slack = Signal(signed(span.bit_length() + 2), init=padding * width + padding - 1)
        backlog = Signal(signed((rows + height + 2).bit_length() + 2))

        coord = signed(max(height, width, out_h * stride, out_w * stride).bit_length() + kernel.bit_length() + 2)
        word = range(ring_words)
        ky, kx = Signal(range(kernel)), Signal(range(kernel))
        oy, ox = Signal(range(out_h)), Signal(range(out_w))
        top = Signal(coord, init=-padding)        # oy * S - P
        left = Signal(coord, init=-padding)       # ox * S - P
        iy = Signal(coord, init=-padding)         # top + ky: the input row of the window pixel
        ix = Signal(coord, init=-padding)         # left + kx: its input column
        first_top_base = (rows - padding) % rows * width
        next_image_first_top_base = ((rows - padding) * width + height * width) % ring_words
        top_base = Signal(word, init=first_top_base)    # ring word of row `top`
        # ...of the next output row's `top`, its own register: computed from `top_base` when the row
        # ended, its adder was the critical path of a CNN on the iCE40 (the register placed by the
        # memory address it feeds, 14 ns of routing out to the adder and back).
        top_base_after = Signal(word, init=(first_top_base + stride * width) % ring_words)
        # ring word of the next image's first `top` row, and of the row after it
        next_image_top_base = Signal(word, init=next_image_first_top_base)
        next_image_top_base_after = Signal(word, init=(next_image_first_top_base + stride * width) % ring_words)
        row_base = Signal(word, init=(rows - padding) % rows * width)    # ring word of row `iy`
        # The read address `row_base + ix` as a register of its own, stepped with them (modulo
        # 2^bits, so that it is exact whenever (iy, ix) lies inside the map; outside, the word read
        # is replaced by zeros): the adder between those registers and the line buffer was the
        # critical path of the reference CNN on the ECP5 (10.4 ns with the LUT RAM's read).
        address_bits = max(1, (ring_words - 1).bit_length())
        read_addr = Signal(address_bits, init=(row_base.init - padding) % 2 ** address_bits)

        # Producer: writes ring word `write_addr`, column `write_col` of its row.
        write_addr = Signal(word)
        write_col = Signal(range(width))
        wrote = Signal()
        m.d.comb += [
            self.i.ready.eq(backlog < rows),
            wrote.eq(self.i.valid & self.i.ready),
            write.addr.eq(write_addr),
            write.data.eq(self.i.payload),
            write.en.eq(wrote),
        ]
        with m.If(wrote):
            m.d.sync += [write_col.eq(Mux(write_col == width - 1, 0, write_col + 1)),
                         write_addr.eq(Mux(write_addr == ring_words - 1, 0, write_addr + 1))]

        # Consumer: the pixel (iy, ix) of the current window, read once it has been written.
        # Whether it lies inside the map is kept in two flags, set from the compares of the values
        # that are about to be loaded into iy and ix (on the current registers, offsets folded in).
        inside_y, inside_x = Signal(init=padding == 0), Signal(init=padding == 0)
        inside = Signal()
        fire = Signal()

        def within(value, offset: int, size: int):
            """Whether ``value + offset`` lies in ``[0, size)``."""
            return (value >= -offset) & (value < size - offset)

        m.d.comb += [
            inside.eq(inside_y & inside_x),
            fire.eq(advance & (~inside | (slack >= 0))),
            read.addr.eq(read_addr),
            read.en.eq(advance),
        ]
        move = Signal(signed(max(abs(step) for step in moves.values()).bit_length() + 1))
        lowest_step = Signal(coord)     # how far the lowest needed row moves on this move
        top_next = top + stride
        m.d.comb += [
            move.eq(moves["column"]),
            lowest_step.eq(0),
        ]
        with m.If(kx == kernel - 1):
            m.d.comb += move.eq(moves["row"])
            with m.If(ky == kernel - 1):
                m.d.comb += move.eq(moves["window"])
                with m.If(ox == out_w - 1):
                    m.d.comb += [move.eq(moves["output_row"]),
                                 lowest_step.eq(Mux(top_next < 0, 0, top_next) - Mux(top < 0, 0, top))]
                    with m.If(oy == out_h - 1):
                        m.d.comb += [move.eq(moves["image"]), lowest_step.eq(height - max(last_top, 0))]
        m.d.sync += [
            slack.eq(slack + wrote - Mux(fire, move, 0)),
            backlog.eq(backlog + (wrote & (write_col == width - 1)) - Mux(fire, lowest_step, 0)),
        ]
        # The next row's address, from the current one: back K - 1 columns, on by a row, and back
        # round the ring when `row_base` wraps (row_base + ix steps exactly as its terms do).
        row_step = width - (kernel - 1)
        next_row_addr = Mux(row_base >= ring_words - width, read_addr + (row_step - ring_words), read_addr + row_step)
        with m.If(fire):
            m.d.sync += [kx.eq(kx + 1), ix.eq(ix + 1), inside_x.eq(within(ix, 1, width)), read_addr.eq(read_addr + 1)]
            with m.If(kx == kernel - 1):
                m.d.sync += [kx.eq(0), ix.eq(left), inside_x.eq(within(left, 0, width)),
                             ky.eq(ky + 1), iy.eq(iy + 1), inside_y.eq(within(iy, 1, height)),
                             row_base.eq(wrap_words(row_base, width)), read_addr.eq(next_row_addr)]
                with m.If(ky == kernel - 1):
                    m.d.sync += [ky.eq(0), ox.eq(ox + 1), left.eq(left + stride),
                                 ix.eq(left + stride), inside_x.eq(within(left, stride, width)),
                                 iy.eq(top), inside_y.eq(within(top, 0, height)), row_base.eq(top_base),
                                 read_addr.eq(top_base + left + stride)]
                    with m.If(ox == out_w - 1):
                        m.d.sync += [ox.eq(0), left.eq(-padding), ix.eq(-padding), inside_x.eq(padding == 0),
                                     oy.eq(oy + 1), top.eq(top_next),
                                     iy.eq(top_next), inside_y.eq(within(top, stride, height)),
                                     top_base.eq(top_base_after), row_base.eq(top_base_after),
                                     read_addr.eq(top_base_after - padding),
                                     top_base_after.eq(wrap_words(top_base_after, stride * width))]
                        with m.If(oy == out_h - 1):
                            m.d.sync += [oy.eq(0), top.eq(-padding), iy.eq(-padding), inside_y.eq(padding == 0),
                                         top_base.eq(next_image_top_base), row_base.eq(next_image_top_base),
                                         read_addr.eq(next_image_top_base - padding),
                                         top_base_after.eq(next_image_top_base_after),
                                         next_image_top_base.eq(wrap_words(next_image_top_base, height * width)),
                                         next_image_top_base_after.eq(
                                             wrap_words(next_image_top_base_after, height * width))]

        s1_valid, s1_inside = Signal(), Signal()
        with m.If(advance):
            m.d.sync += [s1_valid.eq(fire), s1_inside.eq(inside)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(advance & s1_valid):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(Mux(s1_inside, read.data, 0))]
        return m
