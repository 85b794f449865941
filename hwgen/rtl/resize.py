"""Stream width conversion between a layer's PE and the next layer's SIMD, and the board top's pixel packer."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int, register_copies

__all__ = ["StreamResizer", "PixelPacker"]


class StreamResizer(wiring.Component):
    """Regroup a stream of ``in_count`` elements per beat into beats of ``out_count`` elements.

    Element order is kept: element 0 of the stream sits in the lowest bits of the first beat.
    One count must divide the other (gathering ``k`` beats into one, or splitting one into ``k``).
    Either direction moves one output beat per cycle when neither end stalls.

    When gathering, ``elements`` need not be a multiple of ``out_count``: an image's last output
    beat is then sent with the input beats it has, its other elements zero (:attr:`padding`), the
    SIMD padding of a layer whose SIMD does not divide its inputs (see
    :class:`~hwgen.rtl.dense.FoldedDense`).

    Parameters
    ----------
    element_width : int
        Bits per element.
    in_count, out_count : int
        Elements per input and per output beat.
    elements : int
        Elements per image; a multiple of ``in_count`` (and of ``out_count`` when splitting).

    Attributes
    ----------
    i : ``In(stream.Signature(in_count * element_width))``
    o : ``Out(stream.Signature(out_count * element_width))``
    """

    def __init__(self, element_width: int, in_count: int, out_count: int, elements: int):
        for name, value in (("element_width", element_width), ("in_count", in_count),
                            ("out_count", out_count), ("elements", elements)):
            check_positive_int(name, value)
        if in_count % out_count and out_count % in_count:
            raise ValueError(f"cannot regroup {in_count} elements per beat into {out_count}: "
                             "one count must divide the other")
        if elements % in_count:
            raise ValueError(f"elements ({elements}) must be a multiple of in_count ({in_count})")
        self._element_width = element_width
        self._in_count = in_count
        self._out_count = out_count
        self._elements = elements
        super().__init__({
            "i": In(stream.Signature(unsigned(in_count * element_width))),
            "o": Out(stream.Signature(unsigned(out_count * element_width))),
        })

    @property
    def padding(self) -> int:
        """Zero elements that end an image's last output beat: ``-elements mod out_count``."""
        return -self._elements % self._out_count

    @property
    def out_beats(self) -> int:
        """Output beats per image, ``ceil(elements / out_count)``."""
        return -(-self._elements // self._out_count)

    @property
    def cycles_per_image(self) -> int:
        """One beat moves per cycle on the busier side."""
        return max(self._elements // self._in_count, self.out_beats)

    @property
    def accept_interval(self) -> int:
        """Cycles between accepted input beats at full rate: a split beat leaves in ``k`` pieces."""
        return max(1, self._in_count // self._out_count)

    @property
    def latency(self) -> int:
        """Cycles from the last input transfer to the last output transfer, unstalled."""
        if self._in_count == self._out_count:
            return 0
        if self._in_count < self._out_count:
            return 1
        return self._in_count // self._out_count

    def elaborate(self, platform):
        m = Module()
        in_count, out_count, width = self._in_count, self._out_count, self._element_width
        if in_count == out_count:
            m.d.comb += [self.o.payload.eq(self.i.payload), self.o.valid.eq(self.i.valid),
                         self.i.ready.eq(self.o.ready)]
        elif in_count < out_count:
            self._gather(m, out_count // in_count, in_count * width)
        else:
            self._split(m, in_count // out_count, out_count * width)
        return m

    def _gather(self, m: Module, ratio: int, beat_width: int) -> None:
        # Each beat is written straight into its slot, picked by a one-hot register, so that each
        # slot's enable drives one beat's flip-flops (a shift register would put every held bit on
        # one enable net); the output word is the slots themselves.
        slots = [Signal(beat_width, name=f"slot{k}", reset_less=True) for k in range(ratio)]
        slot = Signal(ratio, init=1)
        m.d.comb += [self.i.ready.eq(~self.o.valid | self.o.ready), self.o.payload.eq(Cat(slots))]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += slot.eq(slot.rotate_left(1))
            for k, held in enumerate(slots):
                with m.If(slot[k]):
                    m.d.sync += held.eq(self.i.payload)
            with m.If(slot[ratio - 1]):
                m.d.sync += self.o.valid.eq(1)
            if self.padding:
                # An image's last input beat fills slot ``filled - 1`` and ends the word: the slots
                # after it are cleared as it is written, and the next image starts at slot 0.
                in_beats = self._elements // self._in_count
                filled = (in_beats - 1) % ratio + 1
                beat = Signal(range(in_beats), name="beat")
                m.d.sync += beat.eq(beat + 1)
                with m.If(beat == in_beats - 1):
                    m.d.sync += [beat.eq(0), slot.eq(1), self.o.valid.eq(1)]
                    m.d.sync += [held.eq(0) for held in slots[filled:]]

    def _split(self, m: Module, ratio: int, beat_width: int) -> None:
        held = Signal(ratio * beat_width)
        have = Signal()
        piece = Signal(range(ratio))
        closing = piece == ratio - 1
        m.d.comb += [
            self.o.valid.eq(have),
            self.o.payload.eq(held.word_select(piece, beat_width)),
            self.i.ready.eq(~have | (self.o.ready & closing)),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += piece.eq(piece + 1)
            with m.If(closing):
                m.d.sync += [piece.eq(0), have.eq(0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(self.i.payload), have.eq(1)]


class PixelPacker(wiring.Component):
    """Gather single elements that arrive at a low rate (a UART's pixels) into beats of ``count``,
    each slot's enable and data coming straight from registers.

    A taken element is registered beside the control, then copied, with its take flag, into a
    register per :data:`SLOTS_PER_COPY` slots; a slot loads the copy where the copied flag and its
    bit of the one-hot slot pointer are set, and each group's share of the pointer moves on with its
    own copy of the flag. So no net of the handshake crosses the device: the slots are placed by
    the network's first layer, which can be far from the packer's control and from the UART.
    With enables from the handshake (``StreamResizer``) that route was the W1A2 MLP's ECP5 critical
    path (a 98-byte packer, 7.2 ns of routing to the slot enables); with write flags cleared by the
    handshake (a synchronous reset of every flag when nothing was taken), the int8 and W1A1 MLPs'
    (8.6 and 9.9 ns of routing from the take to the flags' resets). Nothing is taken from a word's
    last element until the word has left on ``o``, so a word takes :attr:`cycles_per_word` cycles
    at least: far below a UART's rate.

    Parameters
    ----------
    element_width : int
        Bits per element.
    count : int
        Elements per output beat.

    Attributes
    ----------
    i : ``In(stream.Signature(element_width))``
    o : ``Out(stream.Signature(count * element_width))``
        Element ``k`` of a beat in bits ``[k * element_width, (k + 1) * element_width)``.
    """

    #: Slots that share one registered copy of the taken element.
    SLOTS_PER_COPY = 16

    def __init__(self, element_width: int, count: int):
        check_positive_int("element_width", element_width)
        check_positive_int("count", count)
        self._element_width = element_width
        self._count = count
        super().__init__({
            "i": In(stream.Signature(unsigned(element_width))),
            "o": Out(stream.Signature(unsigned(count * element_width))),
        })

    @property
    def cycles_per_word(self) -> int:
        """Cycles per output beat with ``i.valid`` and ``o.ready`` held high: ``count`` elements
        taken, the last one's two register stages and its slot's write, the beat's transfer."""
        return self._count + 3

    @property
    def latency(self) -> int:
        """Cycles from a word's last input transfer to its output transfer, ``o.ready`` high."""
        return 3

    def elaborate(self, platform):
        m = Module()
        count, width = self._count, self._element_width
        groups = -(-count // self.SLOTS_PER_COPY)
        slots = [Signal(width, name=f"slot{k}", reset_less=True) for k in range(count)]
        # One-hot: the slot the next copied element goes to.
        slot = Signal(count, init=1)
        # The word's last element is taken: nothing more until the word has left. The control counts
        # the taken elements itself rather than reading the slot pointer, which sits by the slots.
        full = Signal()
        taken_count = Signal(range(count))
        take = Signal()
        m.d.comb += [
            self.i.ready.eq(~full),
            take.eq(self.i.valid & self.i.ready),
            self.o.payload.eq(Cat(slots)),
        ]
        with m.If(take):
            m.d.sync += taken_count.eq(Mux(taken_count == count - 1, 0, taken_count + 1))
        with m.If(take & (taken_count == count - 1)):
            m.d.sync += full.eq(1)
        with m.Elif(self.o.valid & self.o.ready):
            m.d.sync += full.eq(0)

        element = Signal(width, name="element", reset_less=True)
        taken = Signal(name="taken")
        m.d.sync += taken.eq(take)
        with m.If(take):
            m.d.sync += element.eq(self.i.payload)
        # The element changes only when taken, so its copies need no enable.
        element_copies = register_copies(m, element, groups, "element")
        taken_copies = register_copies(m, taken, groups, "taken", reset_less=False)

        for k, held in enumerate(slots):
            with m.If(taken_copies[k // self.SLOTS_PER_COPY] & slot[k]):
                m.d.sync += held.eq(element_copies[k // self.SLOTS_PER_COPY])
        moved = slot.rotate_left(1)
        for group, copy in enumerate(taken_copies):
            share = slice(group * self.SLOTS_PER_COPY, min(count, (group + 1) * self.SLOTS_PER_COPY))
            with m.If(copy):
                m.d.sync += slot[share].eq(moved[share])
        with m.If(taken_copies[-1] & slot[count - 1]):
            m.d.sync += self.o.valid.eq(1)
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m
