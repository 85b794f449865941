"""Multi-threshold units: a layer's accumulators to k-bit unsigned activations (FINN's MultiThreshold)."""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Signal

from ..ir import DenseLayer, signed_width
from .arith import MemoryShape, read_rom, rom_shapes, tree_sum
from .dense import channel_words
from .lanes import ChannelLanes

__all__ = ["MultiThreshold"]

#: Registered stages after an element is taken: accumulator and ROM read, both registered again,
#: the comparisons (their count goes into the output queue).
PIPELINE_STAGES = 3


class MultiThreshold(ChannelLanes):
    """``sum_j [acc >= T_cj]`` over each channel's ``2**k - 1`` ascending thresholds, ``lanes``
    elements per cycle.

    Takes the PE accumulators a :class:`~hwgen.rtl.dense.FoldedDense` emits per beat and returns
    them as k-bit unsigned elements, ``lanes`` per beat, channels in order. The thresholds of
    ``lanes`` channels make one word of a ROM read one cycle ahead; each lane compares its
    accumulator with all of its channel's thresholds at once, and the output register takes the
    number of comparisons that hold (the thresholds are ascending, so this is the level).

    Parameters
    ----------
    layer : :class:`hwgen.ir.DenseLayer`
        A layer with ``output_kind == "multithreshold"``.
    pe : int
        Accumulators per input beat; must divide ``layer.out_features``.
    vectors : int
        Vectors per image (``Ho * Wo`` for a convolution); only the cycle formula uses it.
    lanes : int
        Elements per cycle, each lane with its own comparators; must divide ``pe``.

    Attributes
    ----------
    i : ``In(stream.Signature(pe * acc_bits))``
    o : ``Out(stream.Signature(k * lanes))``
        The levels, element ``l`` in bits ``[k l, k (l + 1))``.
    """

    OUTPUT_KIND = "multithreshold"
    LANE_NAME = "multi-threshold"
    PIPELINE_STAGES = PIPELINE_STAGES

    def __init__(self, layer: DenseLayer, pe: int, vectors: int = 1, lanes: int = 1):
        super().__init__(layer, pe, vectors, lanes, element_bits=layer.output_bits)
        # A threshold may be acc_max + 1 (never reached): one bit more than the accumulator.
        self._threshold_bits = signed_width(min(layer.acc_min, int(layer.thresholds.min())),
                                            max(layer.acc_max, int(layer.thresholds.max())))

    @property
    def threshold_bits(self) -> int:
        """Bits of one stored threshold: the accumulator's range and ``acc_max + 1``."""
        return self._threshold_bits

    @property
    def output_bits(self) -> int:
        """Bits of one level: k."""
        return self._layer.output_bits

    @property
    def levels(self) -> int:
        """Thresholds per channel: ``2**k - 1``."""
        return int(self._layer.thresholds.shape[1])

    @property
    def comparators(self) -> int:
        """Comparators in the unit: ``levels`` per lane."""
        return self.levels * self._lanes

    @property
    def memories(self) -> list[MemoryShape]:
        """The threshold ROM, ``lanes`` channels of ``levels`` thresholds per word, and the output queue."""
        return [*rom_shapes("thresholds", self._layer.out_features // self._lanes, self._word_bits), self.queue_memory]

    @property
    def _word_bits(self) -> int:
        return self._lanes * self.levels * self._threshold_bits

    def _threshold_words(self) -> list[int]:
        # Channel c's thresholds side by side (threshold j in the j-th slot), lanes channels per word.
        rows = np.asarray(self._layer.thresholds, dtype=np.int64)
        mask = (1 << self._threshold_bits) - 1
        per_channel = [sum((int(t) & mask) << (j * self._threshold_bits) for j, t in enumerate(row)) for row in rows]
        return channel_words(per_channel, self._lanes, self.levels * self._threshold_bits)

    def elaborate(self, platform):
        m = Module()
        lanes, width, levels, t_bits = self._lanes, self._acc_bits, self.levels, self._threshold_bits

        s1_valid, s1_accs, group = self._take_lanes(m)
        # Stage 1 also holds the lanes' thresholds from the ROM.
        words = read_rom(m, "thresholds", self._threshold_words(), self._word_bits, group, Const(1))

        results = []
        for lane in range(lanes):
            # Stage 2: accumulator and thresholds registered again, so that no ROM output feeds a comparator.
            acc = Signal(width, name=f"acc{lane}", reset_less=True)
            thresholds = Signal(levels * t_bits, name=f"thresholds{lane}", reset_less=True)
            # Stage 3: the comparisons.
            reached = Signal(levels, name=f"reached{lane}", reset_less=True)
            m.d.sync += [acc.eq(s1_accs.word_select(lane, width)),
                         thresholds.eq(words.word_select(lane, levels * t_bits)),
                         reached.eq(Cat(acc.as_signed() >= thresholds.word_select(j, t_bits).as_signed()
                                        for j in range(levels)))]
            results.append(tree_sum([reached[j] for j in range(levels)])[:self._layer.output_bits])
        self._emit(m, s1_valid, results)
        return m
