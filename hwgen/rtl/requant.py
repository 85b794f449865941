"""Requantization of a layer's int32 accumulators to int8/uint8 (TFLite single rounding)."""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Const, Module, Mux, Signal, signed

from ..ir import DenseLayer
from .arith import MemoryShape, read_rom, register_copies, rom_shapes
from .dense import channel_words
from .lanes import ChannelLanes

__all__ = ["Requantizer"]

#: Registered stages after an element is taken: accumulator and ROM read, both registered again,
#: partial products, their sum in two stages, shift (the rounding and clamp go into the queue).
PIPELINE_STAGES = 6
#: Bits of each operand piece of a partial product, so that each fits one 18x18 multiplier.
_PIECE_BITS = 16
_SHIFT_BITS = 6
_CONSTANT_BITS = 31 + _SHIFT_BITS


class Requantizer(ChannelLanes):
    """``clamp(round(acc * M0 / 2**(31 - s)) + z_out, lo, hi)`` per channel, ``lanes`` elements per cycle.

    Takes the PE accumulators a :class:`~hwgen.rtl.dense.FoldedDense` emits per beat and returns
    them as 8-bit elements, ``lanes`` per beat, channels in order. The rounding uses the identity
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
    lanes : int
        Elements requantized per cycle, each lane with its own multiplier; must divide ``pe``.

    Attributes
    ----------
    i : ``In(stream.Signature(pe * acc_bits))``
    o : ``Out(stream.Signature(8 * lanes))``
        The requantized elements, two's complement for int8 outputs, element ``l`` in bits ``[8l, 8l + 8)``.
    """

    OUTPUT_KIND = "requant"
    LANE_NAME = "requantizer"
    PIPELINE_STAGES = PIPELINE_STAGES

    def __init__(self, layer: DenseLayer, pe: int, vectors: int = 1, lanes: int = 1):
        super().__init__(layer, pe, vectors, lanes, element_bits=8)

    @property
    def memories(self) -> list[MemoryShape]:
        """The per-channel multiplier-and-shift ROM, ``lanes`` channels per word, and the output queue."""
        groups = self._layer.out_features // self._lanes
        return [*rom_shapes("constants", groups, self._lanes * _CONSTANT_BITS), self.queue_memory]

    def elaborate(self, platform):
        m = Module()
        layer, lanes, width = self._layer, self._lanes, self._acc_bits
        q = layer.requant
        constants = (q.multiplier.astype(np.int64) << _SHIFT_BITS) | (30 - q.shift.astype(np.int64))

        s1_valid, s1_accs, group = self._take_lanes(m)
        # Stage 1 also holds M0 and r - 1 from the ROM.
        constant_words = read_rom(m, "constants", channel_words(constants, lanes, _CONSTANT_BITS),
                                  lanes * _CONSTANT_BITS, group, Const(1))
        results = []
        for lane in range(lanes):
            constant = constant_words.word_select(lane, _CONSTANT_BITS)
            results.append(self._lane(m, lane, s1_accs.word_select(lane, width).as_signed(), constant))
        self._emit(m, s1_valid, results)
        return m

    def _lane(self, m: Module, lane: int, acc, constant):
        """One lane's product, shift and rounding stages; the clamped result (8 bits, not registered)."""
        q, width = self._layer.requant, self._acc_bits

        def stage(value, name: str) -> Signal:
            """``value`` registered (datapath: no reset, no enable)."""
            register = Signal(value.shape(), name=f"{name}{lane}", reset_less=True)
            m.d.sync += register.eq(value)
            return register

        # Stage 2: the accumulator's and the constant's pieces registered again, a copy for each
        # multiplier, so that no ROM or block RAM output feeds a multiplier directly and each
        # copy is placed beside its multiplier: one register shared by two multipliers was the
        # int8 MLP's ECP5 critical path (routed 54 columns to the MULT18X18D).
        multiplier = constant[_SHIFT_BITS:]
        shift = stage(constant[:_SHIFT_BITS], "shift_stage2_")

        # Stage 3: partial products of operand pieces (acc < 2**31, M0 < 2**31), each within one
        # 18x18 multiplier and registered; the low piece of each operand is unsigned.
        def pieces(value, signed_top: bool) -> list[tuple[object, int]]:
            if len(value) <= _PIECE_BITS + 2:
                return [(value, 0)]
            top = value[_PIECE_BITS:]
            return [(value[:_PIECE_BITS], 0), (top.as_signed() if signed_top else top, _PIECE_BITS)]

        partials = []
        for index, ((a, a_offset), (b, b_offset)) in enumerate(
                (x, y) for x in pieces(acc, True) for y in pieces(multiplier, False)):
            a_copy, b_copy = (register_copies(m, value, 1, f"{name}{lane}_{index}")[0]
                              for value, name in ((a, "acc_piece"), (b, "multiplier_piece")))
            partials.append((stage(a_copy * b_copy, f"partial{index}_"), a_offset + b_offset))
        shift = stage(shift, "shift_stage3_")

        # Stages 4 and 5: the product, the partial products' sum, two at a time and then the two
        # sums: three chained 48-bit adders in one cycle, after the route from the multipliers,
        # were the int8 MLP's ECP5 critical path (14.6 ns).
        pair_sums = [stage(sum(partial << offset for partial, offset in partials[start:start + 2]), f"pair_sum{start}_")
                     for start in range(0, len(partials), 2)]
        shift = stage(shift, "shift_stage4_")
        product = Signal(signed(width + 32), name=f"product{lane}", reset_less=True)
        m.d.sync += product.eq(sum(pair_sums))
        shift = stage(shift, "shift")

        # Stage 6: P >> (r - 1), arithmetic.
        halved_reg = Signal(signed(width + 32), name=f"halved{lane}", reset_less=True)
        # Whether the bits below P's half bit are all zero.
        below_half_clear = Signal(name=f"below_half_clear{lane}", reset_less=True)
        halved = Signal(signed(width + 32), name=f"shifted{lane}")
        m.d.comb += halved.eq(product >> shift)
        m.d.sync += halved_reg.eq(halved)
        if q.rounding == "half_even":
            m.d.sync += below_half_clear.eq((halved << shift) == product)

        # Into the output queue: finish the rounding, add the zero point, clamp. A halved product
        # outside ``narrow_bits`` saturates whatever the rounding and zero point, so only its low
        # bits go through the adder and the comparisons; the rest is a test that its top bits are
        # all sign. Over the whole product that was the int8 MLP's ECP5 critical path (a 64-bit
        # carry chain into the queue).
        narrow_bits = self.narrow_bits
        top = halved_reg[narrow_bits - 1:]
        fits = top.all() | ~top.any()
        narrow = halved_reg[:narrow_bits].as_signed()
        rounded = Signal(signed(narrow_bits + 1), name=f"rounded{lane}")
        if q.rounding == "half_even":
            floor = narrow >> 1
            up = narrow[0] & ~(below_half_clear & ~floor[0])
            m.d.comb += rounded.eq(floor + up + q.zero_point)
        else:
            m.d.comb += rounded.eq(((narrow + 1) >> 1) + q.zero_point)
        clamped = Mux(rounded < q.lo, q.lo, Mux(rounded > q.hi, q.hi, rounded))
        return Mux(fits, clamped, Mux(halved_reg[-1], q.lo, q.hi))[:8]

    @property
    def narrow_bits(self) -> int:
        """Bits of the halved product ``P >> (r - 1)`` that rounding, zero point and clamp see.

        With ``2**(n - 2) > max(hi - z, z - lo)``, a halved product ``h >= 2**(n - 1)`` rounds to
        at least ``2**(n - 2) + z > hi`` and one ``h < -2**(n - 1)`` to at most ``-2**(n - 2) + z < lo``,
        so both saturate exactly as the full-width computation would.
        """
        q = self._layer.requant
        return 2 + max(q.hi - q.zero_point, q.zero_point - q.lo, 0).bit_length()
