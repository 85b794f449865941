"""Output serializer: class scores and the argmax as 32-bit AXI-Stream words."""
from __future__ import annotations

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int

__all__ = ["ScoreSerializer", "OUTPUT_WORD"]

#: One output beat: a 32-bit word and the end-of-image flag.
OUTPUT_WORD = data.StructLayout({"data": unsigned(32), "last": unsigned(1)})


class ScoreSerializer(wiring.Component):
    """Emit each image's class scores, then its class index, as 32-bit words.

    Per image: ``classes`` words holding the scores (two's complement, sign-extended), then one
    word holding the argmax with ``last`` set. Ties go to the lowest class index: a later score
    replaces the best only when strictly greater.

    Parameters
    ----------
    classes : int
        Scores per image.
    score_width : int
        Two's-complement width of one score (at most 32).
    pe : int
        Scores per input beat; must divide ``classes``.

    Attributes
    ----------
    i : ``In(stream.Signature(pe * score_width))``
    o : ``Out(stream.Signature(OUTPUT_WORD))``
    """

    def __init__(self, classes: int, score_width: int, pe: int):
        for name, value in (("classes", classes), ("score_width", score_width), ("pe", pe)):
            check_positive_int(name, value)
        if score_width > 32:
            raise ValueError(f"scores of {score_width} bits do not fit the 32-bit output word")
        if classes % pe:
            raise ValueError(f"pe ({pe}) must divide classes ({classes})")
        self._classes = classes
        self._score_width = score_width
        self._pe = pe
        super().__init__({
            "i": In(stream.Signature(unsigned(pe * score_width))),
            "o": Out(stream.Signature(OUTPUT_WORD)),
        })

    @property
    def cycles_per_image(self) -> int:
        """One word per class and one for the class index."""
        return self._classes + 1

    @property
    def accept_interval(self) -> int:
        """Cycles between accepted score beats at full rate: one per score in the beat."""
        return self._pe

    @property
    def latency(self) -> int:
        """Cycles from the last input transfer to the class word's transfer, unstalled."""
        return self._pe + 1

    def elaborate(self, platform):
        m = Module()
        classes, width, pe = self._classes, self._score_width, self._pe
        held = Signal(pe * width)
        have = Signal()
        piece = Signal(range(pe))
        element = Signal(range(classes))
        class_word = Signal()
        best = Signal(signed(width))
        best_index = Signal(range(classes))

        # The beat shifts down one score per word, so the score compared is always its lowest
        # bits: no multiplexer in front of the comparison (it was the iCE40 critical path).
        score = Signal(signed(width))
        m.d.comb += score.eq(held[:width])
        last_piece = piece == pe - 1
        m.d.comb += [
            self.o.valid.eq(have | class_word),
            self.i.ready.eq(~have | (self.o.ready & last_piece & ~class_word)),
        ]
        with m.If(class_word):
            m.d.comb += [self.o.payload.data.eq(best_index), self.o.payload.last.eq(1)]
        with m.Else():
            m.d.comb += self.o.payload.data.eq(score)

        with m.If(self.o.valid & self.o.ready):
            with m.If(class_word):
                m.d.sync += class_word.eq(0)
            with m.Else():
                with m.If((element == 0) | (score > best)):
                    m.d.sync += [best.eq(score), best_index.eq(element)]
                m.d.sync += element.eq(element + 1)
                with m.If(element == classes - 1):
                    m.d.sync += [element.eq(0), class_word.eq(1)]
                m.d.sync += [piece.eq(piece + 1), held.eq(held[width:])]
                with m.If(last_piece):
                    m.d.sync += [piece.eq(0), have.eq(0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [held.eq(self.i.payload), have.eq(1)]
        return m
