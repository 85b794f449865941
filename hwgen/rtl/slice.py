"""A register slice: a stream stage whose handshakes come from its own registers."""
from __future__ import annotations

from amaranth.hdl import Module, unsigned
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int

__all__ = ["RegisterSlice"]


class RegisterSlice(wiring.Component):
    """A two-entry buffer whose ``i.ready`` and ``o.valid`` depend only on its fill level.

    Between two stages that pass ``ready`` back combinationally (resizers, pools, a layer's
    output reservation) the ready chain of a whole network becomes one timing path; a slice ends
    it. Two entries keep one beat per cycle: with one entry held, a beat can enter while the held
    one leaves.

    Parameters
    ----------
    width : int
        Payload bits.
    beats : int
        Beats per image (for :attr:`cycles_per_image`).

    Attributes
    ----------
    i : ``In(stream.Signature(width))``
    o : ``Out(stream.Signature(width))``
    """

    #: Cycles from an input transfer to the earliest output transfer of that beat.
    latency = 1
    #: Cycles between accepted beats at full rate.
    accept_interval = 1

    def __init__(self, width: int, beats: int):
        check_positive_int("width", width)
        check_positive_int("beats", beats)
        self._width = width
        self._beats = beats
        super().__init__({"i": In(stream.Signature(unsigned(width))), "o": Out(stream.Signature(unsigned(width)))})

    @property
    def cycles_per_image(self) -> int:
        """One beat per cycle."""
        return self._beats

    def elaborate(self, platform):
        m = Module()
        m.submodules.entries = entries = fifo.SyncFIFO(width=self._width, depth=2)
        wiring.connect(m, wiring.flipped(self.i), entries.w_stream)
        wiring.connect(m, entries.r_stream, wiring.flipped(self.o))
        return m
