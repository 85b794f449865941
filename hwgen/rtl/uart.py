"""8N1 UART receiver and transmitter with byte streams, for board tops."""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .arith import check_positive_int

__all__ = ["UARTReceiver", "UARTTransmitter", "uart_divisor", "FRAME_BITS"]

#: Bits on the line per byte: start, eight data bits (LSB first), stop.
FRAME_BITS = 10

#: Fewest clock cycles per bit: the receiver samples the middle of a bit, half a bit after the edge.
MIN_DIVISOR = 4


def uart_divisor(clock_hz: float, baud: int) -> int:
    """Clock cycles per UART bit for ``baud`` at ``clock_hz``; refuses rates off by more than 2 %.

    A receiver sampling at mid-bit tolerates a total rate mismatch of about 5 % over a frame;
    keeping our own rounding error under 2 % leaves the rest to the other end's clock.
    """
    check_positive_int("baud", baud)
    divisor = round(clock_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"baud rate {baud} is too fast for a {clock_hz / 1e6:g} MHz clock "
                         f"(at most {int(clock_hz // MIN_DIVISOR)})")
    error = abs(clock_hz / divisor - baud) / baud
    if error > 0.02:
        raise ValueError(f"baud rate {baud} is {error:.1%} off at {clock_hz / 1e6:g} MHz "
                         f"(nearest exact: {clock_hz / divisor:.0f}); choose a rate within 2 %")
    return divisor


class _UARTEnd(wiring.Component):
    """What both ends of a UART share: the bit time, checked, and the frame time."""

    def __init__(self, divisor: int, signature: dict):
        check_positive_int("divisor", divisor)
        if divisor < MIN_DIVISOR:
            raise ValueError(f"divisor must be at least {MIN_DIVISOR} clock cycles per bit, not {divisor}")
        self._divisor = divisor
        super().__init__(signature)

    @property
    def divisor(self) -> int:
        return self._divisor

    @property
    def cycles_per_byte(self) -> int:
        """Line time of one frame, and the interval between bytes at full rate: ``10 * divisor`` cycles."""
        return FRAME_BITS * self._divisor


class UARTReceiver(_UARTEnd):
    """Receive 8N1 frames from ``rx`` and emit each byte as a stream beat.

    The line is synchronized by two flip-flops, a start bit is confirmed half a bit after its
    falling edge, and each data bit is sampled in its middle. A frame whose stop bit reads 0 is
    dropped and sets ``framing_error``; a byte that completes while the previous one has not been
    taken replaces nothing, is dropped and sets ``overrun``. Both flags are sticky.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (``clock / baud``), at least 4.

    Attributes
    ----------
    rx : ``In(1)``
        The serial line, idle high.
    o : ``Out(stream.Signature(8))``
        Received bytes.
    overrun, framing_error : ``Out(1)``
    """

    def __init__(self, divisor: int):
        super().__init__(divisor, {
            "rx": In(1, init=1),
            "o": Out(stream.Signature(unsigned(8))),
            "overrun": Out(1),
            "framing_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        divisor = self._divisor
        line = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, line, init=1)

        timer = Signal(range(divisor))
        bit = Signal(range(FRAME_BITS))
        shift = Signal(8)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("idle"):
                with m.If(~line):
                    m.d.sync += timer.eq(divisor // 2 - 1)
                    m.next = "start"
            with m.State("start"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(line):
                    m.next = "idle"          # a glitch, not a start bit
                with m.Else():
                    m.d.sync += [timer.eq(divisor - 1), bit.eq(0)]
                    m.next = "data"
            with m.State("data"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    m.d.sync += [timer.eq(divisor - 1), shift.eq(Cat(shift[1:], line)), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "stop"
            with m.State("stop"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    with m.If(~line):
                        m.d.sync += self.framing_error.eq(1)
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.sync += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shift), self.o.valid.eq(1)]
                    # Wait for the line to return high, so a broken frame cannot start another.
                    m.next = "wait_idle"
            with m.State("wait_idle"):
                with m.If(line):
                    m.next = "idle"
        return m


class UARTTransmitter(_UARTEnd):
    """Send each byte of the input stream as an 8N1 frame on ``tx``.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (``clock / baud``), at least 4.

    Attributes
    ----------
    i : ``In(stream.Signature(8))``
        Bytes to send; one is taken whenever the line is idle.
    tx : ``Out(1)``
        The serial line, idle high.
    """

    def __init__(self, divisor: int):
        super().__init__(divisor, {
            "i": In(stream.Signature(unsigned(8))),
            "tx": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        divisor = self._divisor
        timer = Signal(range(divisor))
        bits_left = Signal(range(FRAME_BITS + 1))
        frame = Signal(FRAME_BITS, init=(1 << FRAME_BITS) - 1)

        # The next byte may load in the stop bit's last cycle, so frames follow without a gap.
        m.d.comb += [self.i.ready.eq((bits_left == 0) | ((bits_left == 1) & (timer == 0))), self.tx.eq(frame[0])]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [frame.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))),
                         bits_left.eq(FRAME_BITS), timer.eq(divisor - 1)]
        with m.Elif(bits_left != 0):
            with m.If(timer != 0):
                m.d.sync += timer.eq(timer - 1)
            with m.Else():
                m.d.sync += [frame.eq(Cat(frame[1:], Const(1, 1))), bits_left.eq(bits_left - 1),
                             timer.eq(divisor - 1)]
        return m
