"""The part every per-channel output unit shares: PE accumulators in, ``lanes`` elements per cycle out."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value, unsigned
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import DenseLayer, signed_width
from .arith import MemoryShape, check_positive_int, divisors

__all__ = ["ChannelLanes"]


class ChannelLanes(wiring.Component):
    """Base of the units that turn each accumulator of a :class:`~hwgen.rtl.dense.FoldedDense` beat
    into an output element: :class:`~hwgen.rtl.requant.Requantizer` and
    :class:`~hwgen.rtl.multithreshold.MultiThreshold`.

    A beat of PE accumulators is held and taken apart ``lanes`` accumulators per cycle, channels in
    order; a subclass gives each lane its registered stages and names its :attr:`PIPELINE_STAGES`.

    The lanes' pipeline never stalls, like :class:`~hwgen.rtl.dense.FoldedDense`'s: its results go
    into an output queue of :attr:`output_queue_depth` elements, and an element is taken only with
    a credit for its place there. With the pipeline advancing on ``o.ready`` instead, the
    downstream ready reached every pipeline register's enable: an int8 MLP's ECP5 critical path
    (12 ns of routing, from the next stage's buffer across the chip and back).

    Parameters
    ----------
    layer : :class:`hwgen.ir.DenseLayer`
        A layer whose ``output_kind`` is the subclass's :attr:`OUTPUT_KIND`.
    pe : int
        Accumulators per input beat; must divide ``layer.out_features``.
    vectors : int
        Vectors per image (``Ho * Wo`` for a convolution); only the cycle formula uses it.
    lanes : int
        Elements per cycle, each lane with its own datapath; must divide ``pe``.
    element_bits : int
        Bits of one output element.

    Attributes
    ----------
    i : ``In(stream.Signature(pe * acc_bits))``
    o : ``Out(stream.Signature(element_bits * lanes))``
        Element ``l`` in bits ``[element_bits l, element_bits (l + 1))``.
    """

    #: The layer output kind the unit implements.
    OUTPUT_KIND = ""
    #: What its lanes are called in error messages.
    LANE_NAME = ""
    #: Registered stages after an element is taken, up to the output queue's write.
    PIPELINE_STAGES = 0
    #: Cycles from the output queue's write to an element on ``o`` (``SyncFIFOBuffered``'s memory
    #: and output register).
    QUEUE_STAGES = 2

    def __init__(self, layer: DenseLayer, pe: int, vectors: int, lanes: int, element_bits: int):
        check_positive_int("pe", pe)
        check_positive_int("vectors", vectors)
        check_positive_int("lanes", lanes)
        if layer.output_kind != self.OUTPUT_KIND:
            raise ValueError(f"layer {layer.name!r} has output {layer.output_kind!r}; a {type(self).__name__} "
                             f"needs {self.OUTPUT_KIND!r}")
        if layer.out_features % pe:
            raise ValueError(f"layer {layer.name!r}: PE={pe} does not divide out_features={layer.out_features}; "
                             f"valid PE values: {divisors(layer.out_features)}")
        if pe % lanes:
            raise ValueError(f"layer {layer.name!r}: {lanes} {self.LANE_NAME} lanes do not divide PE={pe}; "
                             f"valid lane counts: {divisors(pe)}")
        self._layer = layer
        self._pe = pe
        self._vectors = vectors
        self._lanes = lanes
        self._acc_bits = signed_width(layer.acc_min, layer.acc_max)
        super().__init__({
            "i": In(stream.Signature(unsigned(pe * self._acc_bits))),
            "o": Out(stream.Signature(unsigned(element_bits * lanes))),
        })

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def pe(self) -> int:
        return self._pe

    @property
    def acc_bits(self) -> int:
        """Bits of one incoming accumulator (two's complement)."""
        return self._acc_bits

    @property
    def cycles_per_image(self) -> int:
        """``lanes`` elements per cycle: ``N_out / lanes`` per vector."""
        return self._layer.out_features // self._lanes * self._vectors

    @property
    def accept_interval(self) -> int:
        """A beat of PE accumulators is taken apart in ``PE / lanes`` cycles."""
        return self._pe // self._lanes

    @property
    def latency(self) -> int:
        """Cycles from the last input transfer to the last output transfer, unstalled."""
        return self.accept_interval + self.PIPELINE_STAGES + self.QUEUE_STAGES

    @property
    def output_queue_depth(self) -> int:
        """Elements the output queue holds: a credit taken with an element comes back when it leaves
        on ``o``, :attr:`PIPELINE_STAGES` + :attr:`QUEUE_STAGES` cycles later at the earliest, and
        a full-rate unit takes one every cycle."""
        return self.PIPELINE_STAGES + self.QUEUE_STAGES + 1

    @property
    def queue_memory(self) -> MemoryShape:
        """The output queue's storage (``SyncFIFOBuffered`` keeps one element in its output register)."""
        return MemoryShape("outputs", self.output_queue_depth - 1, len(self.o.payload), rom=False)

    def _take_lanes(self, m: Module) -> tuple[Signal, Signal, Signal]:
        self._credits(m)
        """Stages 0 and 1: the held beat taken apart ``lanes`` accumulators per cycle.

        Returns the stage-1 valid flag, the stage-1 accumulators (``lanes * acc_bits`` bits) and
        the channel group being taken (a ROM read with it lines up with stage 1)."""
        lanes, width = self._lanes, self._acc_bits
        pieces, groups = self._pe // lanes, self._layer.out_features // lanes
        held = Signal(self._pe * width)
        have = Signal()
        piece = Signal(range(pieces))
        group = Signal(range(groups))
        take = Signal()
        last_piece = piece == pieces - 1
        m.d.comb += [take.eq(have & self._has_credit), self.i.ready.eq(~have | (take & last_piece))]
        with m.If(take):
            m.d.sync += [piece.eq(piece + 1), group.eq(Mux(group == groups - 1, 0, group + 1))]
            with m.If(last_piece):
                m.d.sync += [piece.eq(0), have.eq(0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(self.i.payload), have.eq(1)]

        s1_valid = Signal()
        s1_accs = Signal(lanes * width, reset_less=True)
        m.d.sync += [s1_valid.eq(take), s1_accs.eq(held.word_select(piece, lanes * width))]
        self._take = take
        return s1_valid, s1_accs, group

    def _credits(self, m: Module) -> None:
        """The output queue's credits: elements taken and not yet sent on ``o``."""
        depth = self.output_queue_depth
        self._reserved = Signal(range(depth + 1))
        self._has_credit = Signal()
        m.d.comb += self._has_credit.eq(self._reserved != depth)

    def _emit(self, m: Module, s1_valid: Signal, results: list[Value]) -> None:
        """The valid flags of stages 2 to :attr:`PIPELINE_STAGES`, and the output queue, which takes
        ``results`` (one element per lane, from the last stage's registers) with the last flag."""
        valid = [s1_valid] + [Signal(name=f"s{stage}_valid") for stage in range(2, self.PIPELINE_STAGES + 1)]
        m.d.sync += [later.eq(earlier) for earlier, later in zip(valid, valid[1:])]
        m.submodules.outputs = outputs = fifo.SyncFIFOBuffered(width=len(self.o.payload),
                                                               depth=self.output_queue_depth)
        m.d.comb += [outputs.w_en.eq(valid[-1]), outputs.w_data.eq(Cat(results)),
                     self.o.valid.eq(outputs.r_rdy), self.o.payload.eq(outputs.r_data),
                     outputs.r_en.eq(self.o.ready)]
        sent = self.o.valid & self.o.ready
        with m.If(self._take & ~sent):
            m.d.sync += self._reserved.eq(self._reserved + 1)
        with m.Elif(~self._take & sent):
            m.d.sync += self._reserved.eq(self._reserved - 1)
