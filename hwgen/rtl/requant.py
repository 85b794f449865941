"""Requantization of a layer's int32 accumulators to int8/uint8 (TFLite single rounding)."""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import DenseLayer, signed_width
from .arith import MemoryShape, check_positive_int, divisors, read_rom, rom_shapes
from .dense import channel_words

__all__ = ["Requantizer"]

#: Registered stages after an element is taken: accumulator and ROM read, product, shift, output.
PIPELINE_STAGES = 4
_SHIFT_BITS = 6


class Requantizer(wiring.Component):
    """``clamp(round(acc * M0 / 2**(31 - s)) + z_out, lo, hi)`` per channel, one element per cycle.

    Takes the PE accumulators a :class:`~hwgen.rtl.dense.FoldedDense` emits per beat and returns one
    8-bit element per beat, channels in order. The rounding uses the identity
    ``floor((P + 2**(r-1)) / 2**r) == ((P >> (r - 1)) + 1) >> 1`` (arithmetic shifts), so no wide
    rounding constant is needed; ``M0`` and ``r - 1`` come from a per-channel ROM. With the layer's
    ``rounding == "half_even"`` an exact tie (bit ``r - 1`` of ``P`` set, the bits below it clear)
    rounds to the even neighbour instead of up; the same stages hold the extra test.

    Parameters
    ----------
    layer : :class:`hwgen.ir.DenseLayer`
        A layer with ``output_kind == "requant"``.
    pe : int
        Accumulators per input beat; must divide ``layer.out_features``.
    vectors : int
        Vectors per image (``Ho * Wo`` for a convolution); only the cycle formula uses it.

    Attributes
    ----------
    i : ``In(stream.Signature(pe * acc_bits))``
    o : ``Out(stream.Signature(8))``
        The requantized element, two's complement for int8 outputs.
    """

    def __init__(self, layer: DenseLayer, pe: int, vectors: int = 1):
        check_positive_int("pe", pe)
        check_positive_int("vectors", vectors)
        self._vectors = vectors
        if layer.output_kind != "requant":
            raise ValueError(f"layer {layer.name!r} has output {layer.output_kind!r}; a Requantizer needs 'requant'")
        if layer.out_features % pe:
            raise ValueError(f"layer {layer.name!r}: PE={pe} does not divide out_features={layer.out_features}; "
                             f"valid PE values: {divisors(layer.out_features)}")
        self._layer = layer
        self._pe = pe
        self._acc_bits = signed_width(layer.acc_min, layer.acc_max)
        super().__init__({
            "i": In(stream.Signature(unsigned(pe * self._acc_bits))),
            "o": Out(stream.Signature(unsigned(8))),
        })

    @property
    def cycles_per_image(self) -> int:
        """One element per cycle: ``N_out`` per vector."""
        return self._layer.out_features * self._vectors

    @property
    def accept_interval(self) -> int:
        """A beat of PE accumulators is taken apart in PE cycles."""
        return self._pe

    @property
    def memories(self) -> list[MemoryShape]:
        """The per-channel multiplier-and-shift ROM."""
        return rom_shapes("constants", self._layer.out_features, 31 + _SHIFT_BITS)

    @property
    def latency(self) -> int:
        """Cycles from the last input transfer to the last output transfer, unstalled."""
        return self._pe + PIPELINE_STAGES

    def elaborate(self, platform):
        m = Module()
        layer, pe, width = self._layer, self._pe, self._acc_bits
        q = layer.requant
        constants = (q.multiplier.astype(np.int64) << _SHIFT_BITS) | (30 - q.shift.astype(np.int64))

        advance = Signal()
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)

        # Stage 0: take the held beat apart, one accumulator per cycle, and look up its channel.
        held = Signal(pe * width)
        have = Signal()
        piece = Signal(range(pe))
        channel = Signal(range(layer.out_features))
        take = Signal()
        last_piece = piece == pe - 1
        m.d.comb += [
            take.eq(have & advance),
            self.i.ready.eq(~have | (take & last_piece)),
        ]
        with m.If(take):
            m.d.sync += [piece.eq(piece + 1),
                         channel.eq(Mux(channel == layer.out_features - 1, 0, channel + 1))]
            with m.If(last_piece):
                m.d.sync += [piece.eq(0), have.eq(0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(self.i.payload), have.eq(1)]

        # Stage 1: the accumulator, with M0 and r - 1 from the ROM.
        s1_valid = Signal()
        s1_acc = Signal(signed(width))
        with m.If(advance):
            m.d.sync += [s1_valid.eq(take), s1_acc.eq(held.word_select(piece, width))]
        constant = read_rom(m, "constants", channel_words(constants, 1, 31 + _SHIFT_BITS), 31 + _SHIFT_BITS,
                            channel, advance)
        multiplier = constant[_SHIFT_BITS:]
        shift_less_one = constant[:_SHIFT_BITS]

        # Stage 2: the product (acc < 2**31, M0 < 2**31).
        s2_valid = Signal()
        s2_product = Signal(signed(width + 32))
        s2_shift = Signal(_SHIFT_BITS)
        with m.If(advance):
            m.d.sync += [s2_valid.eq(s1_valid), s2_product.eq(s1_acc * multiplier), s2_shift.eq(shift_less_one)]

        # Stage 3: P >> (r - 1), arithmetic.
        s3_valid = Signal()
        s3_halved = Signal(signed(width + 32))
        s3_below_half_clear = Signal()   # the bits below P's half bit are all zero
        halved = Signal(signed(width + 32))
        m.d.comb += halved.eq(s2_product >> s2_shift)
        with m.If(advance):
            m.d.sync += [s3_valid.eq(s2_valid), s3_halved.eq(halved)]
            if q.rounding == "half_even":
                m.d.sync += s3_below_half_clear.eq((halved << s2_shift) == s2_product)

        # Stage 4: finish the rounding, add the zero point, clamp.
        rounded = Signal(signed(width + 33))
        if q.rounding == "half_even":
            floor = s3_halved >> 1
            half_bit = s3_halved[0]
            up = half_bit & ~(s3_below_half_clear & ~floor[0])
            m.d.comb += rounded.eq(floor + up + q.zero_point)
        else:
            m.d.comb += rounded.eq(((s3_halved + 1) >> 1) + q.zero_point)
        clamped = Mux(rounded < q.lo, q.lo, Mux(rounded > q.hi, q.hi, rounded))
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(advance & s3_valid):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(clamped[:8])]
        return m
