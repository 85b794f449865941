"""Power-up loader: reads a weight image from the board's SPI flash and checks it."""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..protocol import WEIGHTS_CORRUPT, WEIGHTS_LOADING, WEIGHTS_MISSING, WEIGHTS_OTHER_MODEL, WEIGHTS_READY
from .arith import check_positive_int

__all__ = ["SPIFlashLoader", "RELEASE_POWER_DOWN", "READ_DATA", "CRC_POLYNOMIAL"]

#: SPI NOR flash commands the loader sends (JEDEC, every 25-series flash): wake from deep power-down
#: (0xAB, no dummy bytes), then a plain read (0x03) from a 24-bit address.
RELEASE_POWER_DOWN = 0xAB
READ_DATA = 0x03
#: CRC-32/BZIP2 (see :mod:`hwgen.flash`), computed one bit at a time as the bits arrive.
CRC_POLYNOMIAL = 0x04C11DB7

#: Cycles after reset before the first command (the flash has long been powered: a margin only).
STARTUP_CYCLES = 16


class SPIFlashLoader(wiring.Component):
    """Reads a weight image (header, then payload) from an SPI flash, mode 0, SCK at half the clock.

    After reset: the release-from-deep-power-down command, a wait of ``wake_cycles`` with the
    flash deselected (its tRES1, 3 us on 25-series flashes), then a read command from ``offset``.
    The header's bytes must equal ``header`` (4 magic bytes, then 4 digest bytes); then every two
    payload bytes leave on ``o_data`` (first byte low) with ``o_valid`` for one cycle, while a
    CRC-32/BZIP2 of the payload is computed. :attr:`status` ends as ``WEIGHTS_READY`` only if the
    whole header matched and the CRC equals ``expected_crc``; a wrong magic stops the read after
    the header as ``WEIGHTS_MISSING`` (an erased flash reads all ones), a wrong digest as
    ``WEIGHTS_OTHER_MODEL``, a wrong CRC ends as ``WEIGHTS_CORRUPT``.

    Parameters
    ----------
    header : bytes
        The 8 header bytes the image must start with.
    payload_bytes : int
        Bytes after the header (even: 16-bit words).
    expected_crc : int
        CRC-32/BZIP2 of the right payload.
    offset : int
        Flash address of the image (24 bits).
    wake_cycles : int
        Cycles the flash stays deselected after the wake command.

    Attributes
    ----------
    spi_cs : ``Out(1)``
        Chip select, active high (the board top inverts it onto the pin).
    spi_clk, spi_copi : ``Out(1)``
    spi_cipo : ``In(1)``
    o_valid : ``Out(1)``
    o_data : ``Out(16)``
    status : ``Out(3)``
        ``WEIGHTS_LOADING`` until the read is over, then its outcome (:mod:`hwgen.protocol`).
    done : ``Out(1)``
        High once :attr:`status` holds the outcome (set the cycle after it).
    """

    def __init__(self, *, header: bytes, payload_bytes: int, expected_crc: int, offset: int, wake_cycles: int):
        if not isinstance(header, bytes) or len(header) != 8:
            raise ValueError(f"header must be 8 bytes (magic and digest), not {header!r}")
        check_positive_int("payload_bytes", payload_bytes)
        if payload_bytes % 2:
            raise ValueError(f"payload_bytes must be even (16-bit words), not {payload_bytes}")
        if not isinstance(expected_crc, int) or not 0 <= expected_crc < 1 << 32:
            raise ValueError(f"expected_crc must be a 32-bit unsigned integer, not {expected_crc!r}")
        if not isinstance(offset, int) or not 0 <= offset < 1 << 24:
            raise ValueError(f"offset must be a 24-bit flash address, not {offset!r}")
        check_positive_int("wake_cycles", wake_cycles)
        self._header = header
        self._payload_bytes = payload_bytes
        self._expected_crc = expected_crc
        self._offset = offset
        self._wake_cycles = wake_cycles
        super().__init__({
            "spi_cs": Out(1), "spi_clk": Out(1), "spi_copi": Out(1), "spi_cipo": In(1),
            "o_valid": Out(1), "o_data": Out(16),
            "status": Out(3, init=WEIGHTS_LOADING), "done": Out(1),
        })

    @property
    def load_cycles(self) -> int:
        """Cycles from reset to ``done`` for an image whose header matches: the startup wait, the
        wake command (2 cycles per bit), the wait, the read command and address, header and payload,
        then one cycle to set :attr:`status` and one to set ``done``."""
        return (STARTUP_CYCLES + 2 * 8 + self._wake_cycles + 2 * 32
                + 2 * 8 * (len(self._header) + self._payload_bytes) + 2)

    def elaborate(self, platform):
        m = Module()
        header_bytes = len(self._header)
        total_bytes = header_bytes + self._payload_bytes

        # The bit engine: `shifting` sends the top bit of `out_bits` and takes one on spi_cipo every
        # two cycles (SCK low, then high; the bit is sampled as SCK falls, a half period after
        # the edge the flash launched it on), `bits_left` times.
        out_bits = Signal(32)
        bits_left = Signal(range(33))
        sck_high = Signal()
        in_byte = Signal(8)
        bit_in_byte = Signal(3)
        byte_index = Signal(range(total_bytes + 1))
        low_byte = Signal(8)
        crc = Signal(32, init=0xFFFF_FFFF)
        magic_ok = Signal(init=1)
        digest_ok = Signal(init=1)
        receiving = Signal()
        wait = Signal(range(max(STARTUP_CYCLES, self._wake_cycles) + 1), init=STARTUP_CYCLES)
        expected = Array(Const(byte, 8) for byte in self._header)

        m.d.comb += [self.spi_clk.eq(sck_high), self.spi_copi.eq(out_bits[31])]
        sampled = Signal(8)
        m.d.comb += sampled.eq(Cat(self.spi_cipo, in_byte[:7]))
        bit_done = Signal()
        m.d.comb += bit_done.eq(sck_high)          # this cycle ends a bit (SCK falls)

        def select_and_send(value: int, count: int, then: str) -> None:
            """After a wait: select the flash and load ``count`` bits of ``value`` to send."""
            m.d.sync += wait.eq(wait - 1)
            with m.If(wait == 1):
                m.d.sync += [self.spi_cs.eq(1), out_bits.eq(value << (32 - count)), bits_left.eq(count)]
                m.next = then

        def send(then: str, deselect: bool) -> None:
            """Shift the loaded bits out; then, if ``deselect``, deselect and wait ``wake_cycles``."""
            m.d.sync += sck_high.eq(~sck_high)
            with m.If(bit_done):
                m.d.sync += [out_bits.eq(out_bits << 1), bits_left.eq(bits_left - 1)]
                with m.If(bits_left == 1):
                    if deselect:
                        m.d.sync += [self.spi_cs.eq(0), wait.eq(self._wake_cycles)]
                    m.next = then

        with m.FSM():
            with m.State("startup"):
                select_and_send(RELEASE_POWER_DOWN, 8, "wake")
            with m.State("wake"):
                send("wait", deselect=True)
            with m.State("wait"):
                select_and_send((READ_DATA << 24) | self._offset, 32, "command")
            with m.State("command"):
                send("read", deselect=False)
            with m.State("read"):
                m.d.comb += receiving.eq(1)
                m.d.sync += sck_high.eq(~sck_high)
                with m.If(bit_done):
                    m.d.sync += [in_byte.eq(sampled), bit_in_byte.eq(bit_in_byte + 1)]
                    with m.If(byte_index >= header_bytes):
                        m.d.sync += crc.eq(Mux(crc[31] ^ self.spi_cipo, (crc << 1) ^ CRC_POLYNOMIAL, crc << 1))
                    with m.If(bit_in_byte == 7):
                        m.d.sync += byte_index.eq(byte_index + 1)
                        with m.If(byte_index < 4):
                            with m.If(sampled != expected[byte_index[:3]]):
                                m.d.sync += magic_ok.eq(0)
                        with m.Elif(byte_index < header_bytes):
                            with m.If(sampled != expected[byte_index[:3]]):
                                m.d.sync += digest_ok.eq(0)
                        with m.Elif(byte_index[0] == header_bytes % 2):
                            m.d.sync += low_byte.eq(sampled)
                        with m.Else():
                            m.d.comb += [self.o_valid.eq(magic_ok & digest_ok), self.o_data.eq(Cat(low_byte, sampled))]
                        with m.If(byte_index == total_bytes - 1):
                            m.d.sync += self.spi_cs.eq(0)
                            m.next = "check"
                        # A header that did not match stops the read once its flags are final.
                        with m.If((byte_index == header_bytes) & ~(magic_ok & digest_ok)):
                            m.d.sync += self.spi_cs.eq(0)
                            m.next = "check"
            with m.State("check"):
                with m.If(~magic_ok):
                    m.d.sync += self.status.eq(WEIGHTS_MISSING)
                with m.Elif(~digest_ok):
                    m.d.sync += self.status.eq(WEIGHTS_OTHER_MODEL)
                with m.Elif(crc != (self._expected_crc ^ 0xFFFF_FFFF)):
                    m.d.sync += self.status.eq(WEIGHTS_CORRUPT)
                with m.Else():
                    m.d.sync += self.status.eq(WEIGHTS_READY)
                m.next = "finish"
            with m.State("finish"):
                m.d.sync += self.done.eq(1)
        return m
