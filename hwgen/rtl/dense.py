"""Folded binary-weight dense layer: XNOR-popcount (bit inputs) or signed sums (uint8 inputs)."""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import DenseLayer, signed_width
from .arith import MemoryShape, check_positive_int, divisors, tree_sum

__all__ = ["FoldedDense", "weight_words", "channel_words"]

#: Registered stages between issuing the last read of an image and its last output being valid:
#: memory read, partial sums, accumulate-and-compare (int8 multiplies add a product stage).
PIPELINE_STAGES = 3


def weight_words(layer: DenseLayer, pe: int, simd: int) -> list[int]:
    """Weight ROM contents: word ``f_out * (N_in/SIMD) + f_in`` holds PE rows of SIMD weights.

    Weight ``p * SIMD + s`` of that word (a bit, or a two's-complement byte) belongs to output
    channel ``f_out * PE + p`` and input ``f_in * SIMD + s``.
    """
    n_out, n_in = layer.weights.shape
    tiles = layer.weights.reshape(n_out // pe, pe, n_in // simd, simd).transpose(0, 2, 1, 3)
    rows = np.ascontiguousarray(tiles.reshape(-1, pe * simd))
    if layer.weight_kind == "binary":
        rows = np.packbits(rows, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in rows.view(np.uint8)]


def channel_words(values, pe: int, width: int) -> list[int]:
    """Per-channel constant ROM contents: word ``f_out`` holds PE two's-complement values of ``width`` bits."""
    mask = (1 << width) - 1
    words = []
    for group in np.asarray(values).reshape(-1, pe):
        words.append(sum((int(t) & mask) << (p * width) for p, t in enumerate(group)))
    return words


class FoldedDense(wiring.Component):
    """One dense layer with ±1 weights, folded by PE (output channels) and SIMD (inputs per cycle).

    The input vector of an image arrives as ``N_in / SIMD`` beats of SIMD elements and is stored in
    a double-buffered RAM, so the next image loads while this one computes. The layer then reads
    each input word ``N_out / PE`` times against the weight ROM; every cycle each of the PE lanes
    adds ``popcount(XNOR(x, w))`` (bit inputs) or ``sum(±x)`` (uint8 inputs) of SIMD elements to
    its accumulator. After the last input word a lane's result is compared with its threshold
    (``acc >= T``, one output bit) or emitted as a raw score.

    Parameters
    ----------
    layer : :class:`hwgen.ir.DenseLayer`
        The integer layer: weights, thresholds, input and output kinds.
    pe : int
        Output channels computed in parallel; must divide ``layer.out_features``.
    simd : int
        Input elements consumed per cycle; must divide ``layer.in_features``.
    vectors : int
        Input vectors per image: 1 for a dense layer, ``Ho * Wo`` windows for a convolution.
        Only the per-image cycle formula depends on it.

    Attributes
    ----------
    i : ``In(stream.Signature(SIMD * input_bits))``
        Input elements, element ``k`` of a beat in bits ``[k * input_bits, (k + 1) * input_bits)``.
    o : ``Out(stream.Signature(PE * output_bits))``
        Output elements for channels ``f_out * PE + p``, ``p`` in beat order.
    """

    def __init__(self, layer: DenseLayer, *, pe: int, simd: int, vectors: int = 1):
        check_positive_int("pe", pe)
        check_positive_int("simd", simd)
        check_positive_int("vectors", vectors)
        self._vectors = vectors
        if layer.in_features % simd:
            raise ValueError(f"layer {layer.name!r}: SIMD={simd} does not divide in_features={layer.in_features}; "
                             f"valid SIMD values: {divisors(layer.in_features)}")
        if layer.out_features % pe:
            raise ValueError(f"layer {layer.name!r}: PE={pe} does not divide out_features={layer.out_features}; "
                             f"valid PE values: {divisors(layer.out_features)}")
        self._layer = layer
        self._pe = pe
        self._simd = simd
        super().__init__({
            "i": In(stream.Signature(unsigned(simd * layer.input_bits))),
            "o": Out(stream.Signature(unsigned(pe * (1 if layer.output_kind == "threshold"
                                                     else signed_width(layer.acc_min, layer.acc_max))))),
        })

    @property
    def layer(self) -> DenseLayer:
        return self._layer

    @property
    def pe(self) -> int:
        return self._pe

    @property
    def simd(self) -> int:
        return self._simd

    @property
    def input_beats(self) -> int:
        """Input beats per image, ``N_in / SIMD``."""
        return self._layer.in_features // self._simd

    @property
    def output_beats(self) -> int:
        """Output beats per image, ``N_out / PE``."""
        return self._layer.out_features // self._pe

    @property
    def cycles_per_vector(self) -> int:
        """Cycles per input vector: ``(N_in / SIMD) * (N_out / PE)``."""
        return self.input_beats * self.output_beats

    @property
    def cycles_per_image(self) -> int:
        """Initiation interval of the layer: cycles per vector times vectors per image."""
        return self.cycles_per_vector * self._vectors

    @property
    def accept_interval(self) -> int:
        """Cycles between accepted input beats at full rate."""
        return 1

    @property
    def latency(self) -> int:
        """Cycles from a vector's last input transfer to its last output transfer, idle and unstalled."""
        return self.cycles_per_vector + self.pipeline_stages

    @property
    def multiplies(self) -> bool:
        """Whether lanes multiply (int8 weights on byte inputs): products get their own register
        stage so that yosys maps them onto DSP blocks (SB_MAC16, MULT18X18D) without limiting Fmax."""
        return self._layer.weight_kind == "int8" and self._layer.input_kind != "bits"

    @property
    def pipeline_stages(self) -> int:
        """Registered stages from issuing an image's last read to its last output being valid:
        memory read, [products,] lane sums, accumulate-and-output."""
        return PIPELINE_STAGES + int(self.multiplies)

    @property
    def memories(self) -> list[MemoryShape]:
        """The input double buffer, the weight ROM and the per-channel constant ROMs."""
        layer, pe, simd = self._layer, self._pe, self._simd
        shapes = [MemoryShape("buffer", 2 * self.input_beats, simd * layer.input_bits, rom=False),
                  MemoryShape("weights", self.input_beats * self.output_beats, pe * simd * layer.weight_bits, rom=True)]
        if layer.bias is not None:
            width = signed_width(int(layer.bias.min()), int(layer.bias.max()))
            shapes.append(MemoryShape("bias", self.output_beats, pe * width, rom=True))
        if layer.output_kind == "threshold":
            width = signed_width(layer.acc_min, layer.acc_max + 1)
            shapes.append(MemoryShape("thresholds", self.output_beats, pe * width, rom=True))
        return shapes

    @property
    def output_element_bits(self) -> int:
        """One output element: a bit (threshold) or the two's-complement accumulator."""
        layer = self._layer
        return 1 if layer.output_kind == "threshold" else signed_width(layer.acc_min, layer.acc_max)

    def _inputs(self, data: Signal) -> list:
        kind = self._layer.input_kind
        if kind == "bits":
            return [data[k] for k in range(self._simd)]
        return [data.word_select(k, 8).as_signed() if kind == "int8" else data.word_select(k, 8)
                for k in range(self._simd)]

    def _weights(self, data: Signal, lane: int) -> list:
        simd, bits = self._simd, self._layer.weight_bits
        word = data[lane * simd * bits:(lane + 1) * simd * bits]
        return [word[k] for k in range(simd)] if bits == 1 else [word.word_select(k, 8).as_signed() for k in range(simd)]

    def _terms(self, m: Module, x: Signal, w: Signal, lane: int) -> list:
        """The SIMD terms a lane adds: XNOR bits, ±x, ±w, or products (registered by the caller)."""
        layer = self._layer
        if layer.is_popcount:
            # Iterate the bits of a Signal, never of a wide expression (see TOOLCHAIN.md).
            agree = Signal(self._simd, name=f"xnor{lane}")
            m.d.comb += agree.eq(~(x ^ w[lane * self._simd:(lane + 1) * self._simd]))
            return [agree[k] for k in range(self._simd)]
        xs, ws = self._inputs(x), self._weights(w, lane)
        if layer.weight_kind == "binary":
            return [Mux(wk, xk, -xk) for xk, wk in zip(xs, ws)]
        if layer.input_kind == "bits":
            return [Mux(xk, wk, -wk) for xk, wk in zip(xs, ws)]
        return [xk * wk for xk, wk in zip(xs, ws)]

    def elaborate(self, platform):
        m = Module()
        layer, pe, simd = self._layer, self._pe, self._simd
        beats_in, beats_out = self.input_beats, self.output_beats

        m.submodules.buffer = buffer = memory.Memory(
            shape=unsigned(simd * layer.input_bits), depth=2 * beats_in, init=[])
        write, read = buffer.write_port(), buffer.read_port()
        m.submodules.weights = weights = memory.Memory(
            shape=unsigned(pe * simd * layer.weight_bits), depth=beats_in * beats_out,
            init=weight_words(layer, pe, simd))
        weight_read = weights.read_port()

        # The whole compute pipeline moves only when the output register can take a result;
        # valid never depends on ready because o.valid is a register.
        advance = Signal()
        m.d.comb += advance.eq(~self.o.valid | self.o.ready)

        # Writer: fills one bank while the reader works on the other.
        full = Signal(2)
        write_bank = Signal()
        write_index = Signal(range(beats_in))
        m.d.comb += [
            self.i.ready.eq(~full.bit_select(write_bank, 1)),
            write.addr.eq(Mux(write_bank, beats_in, 0) + write_index),
            write.data.eq(self.i.payload),
            write.en.eq(self.i.valid & self.i.ready),
        ]
        with m.If(self.i.valid & self.i.ready):
            with m.If(write_index == beats_in - 1):
                m.d.sync += [write_index.eq(0), write_bank.eq(~write_bank), full.bit_select(write_bank, 1).eq(1)]
            with m.Else():
                m.d.sync += write_index.eq(write_index + 1)

        # Stage 0: address generation over (f_out, f_in); a bank is freed on the edge of its last read.
        read_bank = Signal()
        in_index = Signal(range(beats_in))
        out_index = Signal(range(beats_out))
        weight_addr = Signal(range(beats_in * beats_out))
        fire = Signal()
        m.d.comb += [
            fire.eq(advance & full.bit_select(read_bank, 1)),
            read.addr.eq(Mux(read_bank, beats_in, 0) + in_index),
            read.en.eq(advance),
            weight_read.addr.eq(weight_addr),
            weight_read.en.eq(advance),
        ]
        with m.If(fire):
            m.d.sync += weight_addr.eq(Mux(weight_addr == beats_in * beats_out - 1, 0, weight_addr + 1))
            with m.If(in_index == beats_in - 1):
                m.d.sync += in_index.eq(0)
                with m.If(out_index == beats_out - 1):
                    m.d.sync += [out_index.eq(0), read_bank.eq(~read_bank), full.bit_select(read_bank, 1).eq(0)]
                with m.Else():
                    m.d.sync += out_index.eq(out_index + 1)
            with m.Else():
                m.d.sync += in_index.eq(in_index + 1)

        def stage(name: str, flags: tuple) -> tuple:
            """Register (valid, first, last, out_index) into the next stage when the pipeline advances."""
            regs = (Signal(name=f"{name}_valid"), Signal(name=f"{name}_first"), Signal(name=f"{name}_last"),
                    Signal(range(beats_out), name=f"{name}_out_index"))
            with m.If(advance):
                m.d.sync += [reg.eq(value) for reg, value in zip(regs, flags)]
            return regs

        # Stage 1: memory words are out. Int8 multiplies get a register stage of their own.
        flags = stage("s1", (fire, in_index == 0, in_index == beats_in - 1, out_index))
        lane_terms = [self._terms(m, read.data, weight_read.data, p) for p in range(pe)]
        if self.multiplies:
            registered = []
            for p, terms in enumerate(lane_terms):
                products = [Signal(signed(18), name=f"product{p}_{k}") for k in range(simd)]
                with m.If(advance):
                    m.d.sync += [product.eq(term) for product, term in zip(products, terms)]
                registered.append(products)
            lane_terms = registered
            flags = stage("s1p", flags)
        side_index = flags[3]     # thresholds and bias are read so that they arrive with the sums

        # Stage 2: per-lane partial sums of SIMD terms, registered.
        sum_exprs = [tree_sum(terms) for terms in lane_terms]
        partials = [Signal(expr.shape(), name=f"partial{p}") for p, expr in enumerate(sum_exprs)]
        with m.If(advance):
            m.d.sync += [partial.eq(expr) for partial, expr in zip(partials, sum_exprs)]
        s2_valid, s2_first, s2_last, _ = stage("s2", flags)

        # Stage 3: accumulate (from the bias on an image's first word); on its last word, output.
        if layer.is_popcount:
            acc_shape = unsigned(layer.in_features.bit_length())
        else:
            acc_shape = signed(signed_width(layer.acc_min, layer.acc_max))
        start = [Const(0, acc_shape)] * pe
        if layer.bias is not None:
            bias_width = signed_width(int(layer.bias.min()), int(layer.bias.max()))
            bias_read = self._side_rom(m, "bias", layer.bias, bias_width, side_index, advance)
            start = [bias_read.data.word_select(p, bias_width).as_signed() for p in range(pe)]
        sums = []
        for p in range(pe):
            acc = Signal(acc_shape, name=f"acc{p}")
            total = Signal(acc_shape, name=f"total{p}")
            m.d.comb += total.eq(Mux(s2_first, start[p], acc) + partials[p])
            with m.If(advance & s2_valid):
                m.d.sync += acc.eq(total)
            sums.append(total)

        if layer.output_kind == "threshold":
            width = signed_width(layer.acc_min, layer.acc_max + 1)
            threshold_read = self._side_rom(m, "thresholds", layer.thresholds, width, side_index, advance)
            result = Cat(sums[p] >= threshold_read.data.word_select(p, width).as_signed() for p in range(pe))
        else:
            scores = [Signal(signed(self.output_element_bits), name=f"score{p}") for p in range(pe)]
            m.d.comb += [score.eq(total) for score, total in zip(scores, sums)]
            result = Cat(scores)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(advance & s2_valid & s2_last):
            m.d.sync += [self.o.valid.eq(1), self.o.payload.eq(result)]
        return m

    def _side_rom(self, m: Module, name: str, values, width: int, addr: Signal, advance: Signal):
        """A ROM of PE per-channel constants per word (thresholds or bias), read at ``addr``."""
        m.submodules[name] = rom = memory.Memory(
            shape=unsigned(self._pe * width), depth=self.output_beats, init=channel_words(values, self._pe, width))
        port = rom.read_port()
        m.d.comb += [port.addr.eq(addr), port.en.eq(advance)]
        return port

