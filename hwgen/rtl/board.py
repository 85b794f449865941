"""Board top: the network behind a UART (images in, class bytes out) with the class on LEDs."""
from __future__ import annotations

from typing import Sequence

from amaranth.hdl import Array, Const, DomainRenamer, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.fifo import AsyncFIFO, AsyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..ir import IntegerModel
from ..protocol import IDENTIFY, IMAGE, WEIGHTS_LOADING, WEIGHTS_READY, identity
from .dense import DEFAULT_TREE_LEVELS
from .loader import SPIFlashLoader
from .network import Fold, NetworkTop
from .resize import PixelPacker
from .slice import RegisterSlice
from .uart import FRAME_BITS, UARTReceiver, UARTTransmitter

__all__ = ["UARTBoardTop"]


class UARTBoardTop(wiring.Component):
    """A :class:`NetworkTop` driven over a UART with the protocol of :mod:`hwgen.protocol`.

    Received image bytes are packed into the network's input beats; of each image's output only
    the class index is kept, sent back as one byte and latched onto the LEDs (binary, LSB on LED 0).
    The network's own back-pressure holds the UART side, so no byte is dropped while the host
    keeps at most one image waiting behind the one being computed.

    Parameters
    ----------
    model : :class:`hwgen.ir.IntegerModel`
    folds : sequence of :class:`Fold`
    divisor : int
        Clock cycles per UART bit.
    led_count : int
        LEDs available for the class index (0 for none).
    network_domain : str
        Clock domain of the network: ``"sync"`` (the UART's), or another (a PLL clock, see
        :class:`~hwgen.rtl.clocks.BoardPLL`) reached through two byte-wide ``AsyncFIFO`` queues: pixels in,
        class indices out.
    tree_levels : int
        Adder levels between pipeline registers in the network's lanes.
    banked_weights, carried_products, register_slices : bool
        Bank the layers' deep weight ROMs; register multiplying lanes' products twice; put register slices between a CNN's stream stages (see
        :class:`~hwgen.rtl.network.NetworkTop`).
    weight_memories : sequence of str, optional
        Per dense or convolution layer, ``"rom"`` or ``"spram"`` (see :class:`NetworkTop`).
        With SPRAM layers, an :class:`SPIFlashLoader` in the network's domain fills them from the
        board's SPI flash after reset, and images are taken only once the weights loaded and
        matched: until then an image's bytes are consumed and no class is sent, the identity
        reply gives the weights' state, and the LEDs are dark while loading and blink if loading
        failed.
    loader : dict, optional
        With SPRAM layers: the :class:`SPIFlashLoader` parameters besides ``payload_bytes``
        (``header``, ``expected_crc``, ``offset``, ``wake_cycles``).
    blink_bit : int
        Bit of a free-running counter of the board clock that blinks the LEDs when the weights
        failed to load (22: about 3 Hz at 12 MHz).

    Attributes
    ----------
    rx : ``In(1)``
    tx : ``Out(1)``
    leds : ``Out(max(led_count, 1))``
    overrun : ``Out(1)``
        Sticky: a received byte was lost because the network could not take it.
    weights : ``Out(3)``
        The weights' state (``WEIGHTS_*`` of :mod:`hwgen.protocol`) in the UART's domain.
    flash_cs, flash_clk, flash_copi : ``Out(1)``; flash_cipo : ``In(1)``
        With SPRAM layers only: the SPI flash (chip select active high).
    """

    #: Entries of each clock-crossing FIFO (a power of two, as AsyncFIFO needs). The pixel FIFO
    #: has one more, its output register: the network's first stage then sees a registered valid.
    CROSSING_DEPTH = 4

    def __init__(self, model: IntegerModel, folds: Sequence[Fold], *, divisor: int, led_count: int = 0,
                 network_domain: str = "sync", tree_levels: int = DEFAULT_TREE_LEVELS, banked_weights: bool = False,
                 carried_products: bool = False, register_slices: bool = False,
                 weight_memories: Sequence[str] | None = None, loader: dict | None = None, blink_bit: int = 22):
        if not isinstance(led_count, int) or led_count < 0:
            raise TypeError(f"led_count must be a non-negative integer, not {led_count!r}")
        if not isinstance(network_domain, str) or not network_domain:
            raise TypeError(f"network_domain must be a clock domain name, not {network_domain!r}")
        self._network_domain = network_domain
        self._identity = identity(model)
        self._model = model
        self._network = NetworkTop(model, folds, tree_levels=tree_levels, weight_memories=weight_memories,
                                   banked_weights=banked_weights, carried_products=carried_products,
                                   register_slices=register_slices)
        self._receiver = UARTReceiver(divisor)
        self._transmitter = UARTTransmitter(divisor)
        self._led_count = led_count
        if not isinstance(blink_bit, int) or blink_bit < 1:
            raise TypeError(f"blink_bit must be a positive integer, not {blink_bit!r}")
        self._blink_bit = blink_bit
        self._loader = None
        ports = {
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "leds": Out(max(led_count, 1)),
            "overrun": Out(1),
            "weights": Out(3),
        }
        if self._network.load_words:
            if loader is None:
                raise TypeError("a network with SPRAM layers needs the loader's parameters (header, expected_crc, "
                                "offset, wake_cycles)")
            self._loader = SPIFlashLoader(payload_bytes=2 * self._network.load_words, **loader)
            ports.update(flash_cs=Out(1), flash_clk=Out(1), flash_copi=Out(1), flash_cipo=In(1))
        super().__init__(ports)

    @property
    def network(self) -> NetworkTop:
        return self._network

    @property
    def divisor(self) -> int:
        return self._receiver.divisor

    @property
    def loader(self) -> SPIFlashLoader | None:
        """The flash loader of the SPRAM layers (None: every weight is in the bitstream)."""
        return self._loader

    @property
    def input_cycles_per_image(self) -> int:
        """Line time of one image command: ``(1 + in_features) * 10 * divisor`` cycles.

        Images arrive no faster than this; when the network's initiation interval is shorter,
        class bytes leave at exactly this interval for a host that sends commands back to back.
        """
        return (1 + self._model.in_features) * FRAME_BITS * self.divisor

    def elaborate(self, platform):
        m = Module()
        model, network = self._model, self._network
        m.submodules.receiver = receiver = self._receiver
        m.submodules.transmitter = transmitter = self._transmitter
        element_bits = model.layers[0].input_bits
        packer = PixelPacker(element_bits, network.input_elements_per_beat)
        m.d.comb += [
            receiver.rx.eq(self.rx),
            self.tx.eq(transmitter.tx),
            self.overrun.eq(receiver.overrun),
            network.s_axis_tdata.eq(packer.o.payload),
            network.s_axis_tvalid.eq(packer.o.valid),
            packer.o.ready.eq(network.s_axis_tready),
        ]

        # Pixels go into the packer and network, and the class index (the output word with tlast)
        # comes out: directly, or across the clock domains, one byte wide either way (the UART's
        # rate is low). In the UART's domain a pixel is offered as (pixel_valid, pixel_ready) and
        # a class index as (class_valid, class_data), taken with class_take.
        pixel_valid, pixel_ready = Signal(), Signal()
        class_valid, class_data, class_take = Signal(), Signal(8), Signal()
        # The packer takes a pixel only when its own registers say so (PixelPacker).
        packer_free = packer.i.ready
        if self._network_domain == "sync":
            m.submodules.packer = packer
            m.submodules.network = network
            m.d.comb += [
                packer.i.payload.eq(receiver.o.payload[:element_bits]),
                packer.i.valid.eq(pixel_valid & packer_free),
                pixel_ready.eq(packer_free),
                class_valid.eq(network.m_axis_tvalid & network.m_axis_tlast),
                class_data.eq(network.m_axis_tdata[:8]),
                network.m_axis_tready.eq(~network.m_axis_tlast | class_take),
            ]
        else:
            domain = self._network_domain
            m.submodules.packer = DomainRenamer({"sync": domain})(packer)
            m.submodules.network = DomainRenamer({"sync": domain})(network)
            m.submodules.pixels_in = pixels_in = AsyncFIFOBuffered(
                width=element_bits, depth=self.CROSSING_DEPTH + 1, w_domain="sync", r_domain=domain)
            # A register slice carries the pixel from the crossing, placed by the UART, to the
            # packer, placed by the network's first layer: the crossing's output fanned out to a
            # 112-byte packer across the device (13.9 ns of routing) was mlp-mixed's ECP5 critical path.
            m.submodules.pixel_slice = pixel_slice = DomainRenamer({"sync": domain})(
                RegisterSlice(element_bits, model.in_features))
            m.submodules.classes_out = classes_out = AsyncFIFO(
                width=8, depth=self.CROSSING_DEPTH, w_domain=domain, r_domain="sync")
            m.d.comb += [
                pixels_in.w_data.eq(receiver.o.payload[:element_bits]),
                pixels_in.w_en.eq(pixel_valid),
                pixel_ready.eq(pixels_in.w_rdy),
                pixel_slice.i.payload.eq(pixels_in.r_data),
                pixel_slice.i.valid.eq(pixels_in.r_rdy),
                pixels_in.r_en.eq(pixel_slice.i.ready),
                packer.i.payload.eq(pixel_slice.o.payload),
                packer.i.valid.eq(pixel_slice.o.valid & packer_free),
                pixel_slice.o.ready.eq(packer_free),
                classes_out.w_data.eq(network.m_axis_tdata[:8]),
                classes_out.w_en.eq(network.m_axis_tvalid & network.m_axis_tlast),
                network.m_axis_tready.eq(~network.m_axis_tlast | classes_out.w_rdy),
                class_valid.eq(classes_out.r_rdy),
                class_data.eq(classes_out.r_data),
                classes_out.r_en.eq(class_take),
            ]

        # The weights' state, in the UART's domain: the loader sets its status a cycle before
        # `done`, and `done` is synchronized one stage later than the status bits, so the state
        # read here never mixes bits of two values.
        if self._loader is None:
            m.d.comb += self.weights.eq(WEIGHTS_READY)
        else:
            loader = self._loader
            m.submodules.loader = (loader if self._network_domain == "sync"
                                   else DomainRenamer({"sync": self._network_domain})(loader))
            m.d.comb += [
                self.flash_cs.eq(loader.spi_cs), self.flash_clk.eq(loader.spi_clk),
                self.flash_copi.eq(loader.spi_copi), loader.spi_cipo.eq(self.flash_cipo),
                network.load_valid.eq(loader.o_valid), network.load_data.eq(loader.o_data),
            ]
            status, done = Signal(3), Signal()
            m.submodules.status_sync = FFSynchronizer(loader.status, status, o_domain="sync")
            m.submodules.done_sync = FFSynchronizer(loader.done, done, o_domain="sync", stages=3)
            m.d.comb += self.weights.eq(Mux(done, status, WEIGHTS_LOADING))
        weights_ready = Signal()
        m.d.comb += weights_ready.eq(self.weights == WEIGHTS_READY)

        # Command decoder: outside an image every byte is a command; inside, a pixel. An image
        # that arrives while the weights are not ready is consumed and dropped (`discarding`).
        remaining = Signal(range(model.in_features + 1))
        discarding = Signal()
        identify_pending = Signal()
        with m.If(remaining == 0):
            m.d.comb += receiver.o.ready.eq(1)
            with m.If(receiver.o.valid):
                with m.If(receiver.o.payload == IMAGE):
                    m.d.sync += [remaining.eq(model.in_features), discarding.eq(~weights_ready)]
                with m.Elif(receiver.o.payload == IDENTIFY):
                    m.d.sync += identify_pending.eq(1)
        with m.Elif(discarding):
            m.d.comb += receiver.o.ready.eq(1)
            with m.If(receiver.o.valid):
                m.d.sync += remaining.eq(remaining - 1)
        with m.Else():
            m.d.comb += [pixel_valid.eq(receiver.o.valid), receiver.o.ready.eq(pixel_ready)]
            with m.If(receiver.o.valid & pixel_ready):
                m.d.sync += remaining.eq(remaining - 1)

        # The class index is held until sent; the next one waits behind it.
        class_index = Signal(8)
        class_pending = Signal()
        m.d.comb += class_take.eq(class_valid & ~class_pending)
        with m.If(class_take):
            m.d.sync += [class_index.eq(class_data), class_pending.eq(1)]
        if self._led_count:
            blink = Signal(self._blink_bit + 1)
            m.d.sync += blink.eq(blink + 1)
            failed = (self.weights != WEIGHTS_READY) & (self.weights != WEIGHTS_LOADING)
            with m.If(weights_ready):
                m.d.comb += self.leds.eq(class_index[:self._led_count])
            with m.Elif(failed):
                m.d.comb += self.leds.eq(Mux(blink[-1], (1 << self._led_count) - 1, 0))

        # Replies: an identity is sent whole, so a class byte never lands inside it. Its last
        # byte is the weights' state, as it is when the reply starts.
        identity_weights = Signal(8)
        identity_rom = Array([*(Const(byte, 8) for byte in self._identity[:-1]), identity_weights])
        identity_index = Signal(range(len(self._identity)))
        with m.If(identity_index == 0):
            m.d.sync += identity_weights.eq(self.weights)
        sending_identity = Signal()
        sent = transmitter.i.valid & transmitter.i.ready
        with m.If(sending_identity):
            m.d.comb += [transmitter.i.payload.eq(identity_rom[identity_index]), transmitter.i.valid.eq(1)]
            with m.If(sent):
                m.d.sync += identity_index.eq(identity_index + 1)
                with m.If(identity_index == len(self._identity) - 1):
                    m.d.sync += [identity_index.eq(0), sending_identity.eq(0)]
        with m.Elif(class_pending):
            m.d.comb += [transmitter.i.payload.eq(class_index), transmitter.i.valid.eq(1)]
            with m.If(sent):
                m.d.sync += class_pending.eq(0)
        with m.Elif(identify_pending):
            m.d.sync += [sending_identity.eq(1), identify_pending.eq(0)]
        return m
