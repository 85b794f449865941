"""Folded binary-weight dense layer: XNOR-popcount (bit inputs) or signed sums (uint8 inputs)."""
from __future__ import annotations

import dataclasses

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..ir import DenseLayer, signed_width
from .arith import (MemoryShape, check_positive_int, divisors, pipelined_tree_sum, read_rom, register_copies,
                    rom_bank_slices, rom_bank_stages, rom_banks, rom_shapes, tree_stages)
from .spram import SPRAM_WIDTH, SPRAMWeights, spram_columns

__all__ = ["FoldedDense", "padded_inputs", "tree_levels_for", "pipelining_for", "weight_words", "spram_load_words", "channel_words", "uses_pair_signs",
           "pair_sign_corrections", "WEIGHT_MEMORIES"]

#: Where a layer's weights live: ``"rom"`` (block RAM or LUTs, contents in the bitstream) or
#: ``"spram"`` (iCE40UP SPRAM blocks, written at power-up through the layer's load ports).
WEIGHT_MEMORIES = ("rom", "spram")

#: Adder-tree levels between pipeline registers. Measured on ECP5 (nextpnr, README "Pipelining"):
#: three levels of carry-chain adders after a registered block-RAM output stay inside the clock
#: target; more levels per stage cost Fmax, fewer cost flip-flops.
DEFAULT_TREE_LEVELS = 3

#: Adder-tree levels per register stage by FPGA family (see :func:`tree_levels_for`).
TREE_LEVELS_BY_FAMILY = {"ecp5": 2, "ice40": 3}

#: Stages besides the adder tree: memory read, memory-output register, accumulate, and the two of
#: the output queue (its write, and its output register).
FIXED_STAGES = 5

#: Widest input-buffer memory: a multiple of every block RAM width (ECP5 36, 18, 9...; iCE40 16, 8...).
BUFFER_SLICE_BITS = 144

#: Accumulator bits one copy of the accumulate stage's flags drives (see FoldedDense.lanes_per_flag_copy).
FLAG_COPY_LOADS = 64

#: Multiplying lanes that read one registered copy of the input word (see FoldedDense.input_word_copies).
INPUT_COPY_LANES = 1

#: Width of a pair sum or difference of two signed bytes, and of the lane terms built from them.
PAIR_BITS = 9

#: Lanes that read one registered copy of the shared pair sums (see FoldedDense.pair_sum_copies).
PAIR_COPY_LANES = 4

#: What a uint8 input is offset by so that lanes sum signed bytes (``x - 128``: its top bit flipped).
UINT8_OFFSET = 128


#: Families whose networks bank their deep weight ROMs, each bank with an output register
#: (:class:`FoldedDense`'s ``banked_weights``), and register their products twice. Both cost
#: flip-flops, which on iCE40 take logic cells of their own where no LUT feeds them.
SLICED_FAMILIES = ("ecp5",)

#: Families whose networks put register slices between a CNN's stream stages
#: (:class:`~hwgen.rtl.network.NetworkTop`'s ``register_slices``): a few flip-flops per stage
#: boundary, on iCE40 too, where the ready chain through the pools and resizers was the
#: reference CNN's critical path.
SLICE_FAMILIES = ("ecp5", "ice40")


def pipelining_for(family: str) -> dict:
    """The keyword arguments that build a network for an FPGA family
    (:class:`~hwgen.rtl.network.NetworkTop`): ``tree_levels`` (:func:`tree_levels_for`),
    ``banked_weights`` and ``carried_products`` (:data:`SLICED_FAMILIES`), and ``register_slices``
    (:data:`SLICE_FAMILIES`)."""
    sliced = family in SLICED_FAMILIES
    return {"tree_levels": tree_levels_for(family), "banked_weights": sliced, "carried_products": sliced,
            "register_slices": family in SLICE_FAMILIES}


def tree_levels_for(family: str) -> int:
    """Adder levels per pipeline stage for an FPGA family; :data:`DEFAULT_TREE_LEVELS` for others.

    Measured with nextpnr on ECP5: once the rest of the layer was pipelined, a stage of three
    carry-chain adders (most of its delay routing) was the critical path, so ECP5 registers every
    two levels. iCE40 keeps three, the value it was first measured with.
    """
    return TREE_LEVELS_BY_FAMILY.get(family, DEFAULT_TREE_LEVELS)


def uses_pair_signs(layer: DenseLayer) -> bool:
    """Whether lanes take byte inputs with ±1 weights, summed in pairs (see :class:`FoldedDense`)."""
    return layer.weight_kind == "binary" and layer.input_kind != "bits"


def _pair_sign_bits(bits: np.ndarray) -> np.ndarray:
    """Weight bits along the last (SIMD) axis re-coded for pair lanes: bit ``2k`` keeps the first
    weight of pair ``k`` (1 = +1), bit ``2k + 1`` says whether the second weight equals it; an odd
    last element keeps its own bit."""
    coded = bits.copy()
    coded[..., 1::2] = bits[..., 1::2] == bits[..., 0:bits.shape[-1] - 1:2]
    return coded


def padded_inputs(layer: DenseLayer, simd: int) -> DenseLayer:
    """``layer`` with its inputs padded to a multiple of ``simd`` (``layer`` itself where ``simd``
    divides them), as its lanes see it: the padding inputs are zero (:class:`~hwgen.rtl.resize.StreamResizer`
    sends them) and their weights make a zero add nothing to any lane's sum. On bit inputs 0 is -1
    and a +1 weight XNORs it to 0; 0 times a ternary, 2-bit or int8 weight is 0; ±1 weights on
    integer inputs take +1, and the pair lanes' start values count the padding like any weight
    (:func:`pair_sign_corrections`). The thresholds stay those of the unpadded sum, which padding
    leaves unchanged."""
    padding = -layer.in_features % simd
    if not padding:
        return layer
    weight = 1 if layer.weight_kind == "binary" else 0
    return dataclasses.replace(layer, weights=np.pad(layer.weights, ((0, 0), (0, padding)), constant_values=weight))


def pair_sign_corrections(layer: DenseLayer, simd: int) -> np.ndarray:
    """Per output channel, what pair lanes leave out of the sum and the accumulator starts with.

    Each pair term that is a ones' complement (first weight -1) lacks a +1. A uint8 input enters
    the lanes as the signed byte ``x - 128``, so that pair sums and differences fit
    :data:`PAIR_BITS`; the channel's ``128 * sum(w)`` is added back here. Inputs padded to a
    multiple of ``simd`` (:func:`padded_inputs`) count like the others.
    """
    layer = padded_inputs(layer, simd)
    n_out, n_in = layer.weights.shape
    firsts = layer.weights.reshape(n_out, n_in // simd, simd)[..., 0::2]
    corrections = (firsts == 0).sum(axis=(1, 2)).astype(np.int64)
    if layer.input_kind == "uint8":
        plus_ones = layer.weights.astype(np.int64).sum(axis=1)
        corrections += UINT8_OFFSET * (2 * plus_ones - n_in)
    return corrections


def weight_words(layer: DenseLayer, pe: int, simd: int) -> list[int]:
    """Weight ROM contents: word ``f_out * (N_in/SIMD) + f_in`` holds PE rows of SIMD weights.

    Weight ``p * SIMD + s`` of that word (a bit, or a two's-complement byte) belongs to output
    channel ``f_out * PE + p`` and input ``f_in * SIMD + s``. Byte inputs with ±1 weights store
    each row's bits re-coded in pairs (:func:`uses_pair_signs`). Where SIMD does not divide
    ``N_in``, the last input word of each row holds :func:`padded_inputs`' padding weights.
    """
    layer = padded_inputs(layer, simd)
    n_out, n_in = layer.weights.shape
    tiles = layer.weights.reshape(n_out // pe, pe, n_in // simd, simd).transpose(0, 2, 1, 3)
    if uses_pair_signs(layer):
        tiles = _pair_sign_bits(tiles)
    rows = tiles.reshape(-1, pe * simd).astype(np.int64)
    bits = layer.weight_bits
    # Each weight as ``bits`` bits of two's complement (a ternary weight's low bit is its nonzero
    # mask, its high bit its sign), weight 0 lowest.
    planes = (rows[..., None] >> np.arange(bits)) & 1
    packed = np.packbits(planes.reshape(len(rows), -1).astype(np.uint8), axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def spram_load_words(layer: DenseLayer, pe: int, simd: int) -> list[int]:
    """The 16-bit words that load the layer's SPRAM weight memory, in load order: row by row
    (:func:`weight_words`), each row's columns from its least significant 16 bits up."""
    width = pe * simd * layer.weight_bits
    mask = (1 << SPRAM_WIDTH) - 1
    return [(word >> (SPRAM_WIDTH * column)) & mask for word in weight_words(layer, pe, simd)
            for column in range(spram_columns(width))]


def channel_words(values, pe: int, width: int) -> list[int]:
    """Per-channel constant ROM contents: word ``f_out`` holds PE two's-complement values of ``width`` bits."""
    mask = (1 << width) - 1
    words = []
    for group in np.asarray(values).reshape(-1, pe):
        words.append(sum((int(t) & mask) << (p * width) for p, t in enumerate(group)))
    return words


class FoldedDense(wiring.Component):
    """One dense layer with ±1 weights, folded by PE (output channels) and SIMD (inputs per cycle).

    The input vector of an image arrives as ``ceil(N_in / SIMD)`` beats of SIMD elements and is stored in
    a double-buffered RAM, so the next image loads while this one computes. The layer then reads
    each input word ``N_out / PE`` times against the weight ROM; every cycle each of the PE lanes
    adds ``popcount(XNOR(x, w))`` (bit inputs) or ``sum(±x)`` (uint8 inputs) of SIMD elements to
    its accumulator. After the last input word a lane's result is its output bit ``acc >= T``
    (the accumulator starts at ``-T``, so the bit is its sign, inverted) or a raw score.

    The pipeline: memory read, a register on the memory outputs, the lanes' adder trees with a
    register every ``tree_levels`` levels, the accumulator, and an output queue (which takes the
    comparison of the finished accumulator), so that no stage holds more than a few adder levels.
    Int8 products and shared pair sums get a stage of their own.

    The pipeline never stalls, so its registers need no clock enable (which would be a net to
    every flip-flop of the layer). Instead a read is issued only while the output queue has room
    for every result in flight: a credit is taken when the last read of an output beat is issued
    and returned when that beat leaves on ``o``. The queue holds
    :attr:`output_queue_depth` beats, enough that credits never slow an unstalled layer.

    Byte inputs with ±1 weights use ``w_a·a + w_b·b = w_a·(a ± b)``: the pair sum ``a + b`` and
    difference ``a - b`` are computed once per cycle for all lanes, and each lane picks one and
    conditionally inverts it (one LUT4 per bit, from two re-coded weight bits). An inverted term
    is ``-(a ± b) - 1``; the missing +1s are a per-channel constant that starts the accumulator.
    A uint8 input enters as the signed byte ``x - 128`` so that sums and differences take 9 bits;
    the start value adds the channel's ``128 · Σw`` back. With more than :data:`PAIR_COPY_LANES`
    lanes the pair sums are registered once more, one copy per group of lanes
    (:attr:`pair_sum_copies`): one register driving every lane of a wide layer was its critical
    path on ECP5 (12.4 ns of routing to 16 lanes).

    Parameters
    ----------
    layer : :class:`hwgen.ir.DenseLayer`
        The integer layer: weights, thresholds, input and output kinds.
    pe : int
        Output channels computed in parallel; must divide ``layer.out_features``.
    simd : int
        Input elements consumed per cycle, at most ``layer.in_features``. Where it does not divide
        them, each vector's last beat is padded with zeros (:func:`padded_inputs`): the layer
        reads ``ceil(N_in / SIMD)`` beats per vector. A convolution's SIMD must divide.
    vectors : int
        Input vectors per image: 1 for a dense layer, ``Ho * Wo`` windows for a convolution.
        Only the per-image cycle formula depends on it.
    tree_levels : int
        Adder levels between pipeline registers in the lanes' trees.
    weight_memory : str
        ``"rom"``: the weights are a ROM in the bitstream (block RAM, or LUTs when small).
        ``"spram"``: they live in SB_SPRAM256KA blocks (:class:`~hwgen.rtl.spram.SPRAMWeights`),
        which start empty and are written through the ``load_*`` ports before the first image,
        in the order of :func:`spram_load_words`. The pipeline and its formulas are the same.
    banked_weights : bool
        Split a weight ROM of more than one block RAM's depth into banks, each with an output
        register (:func:`~hwgen.rtl.arith.read_rom`), at the cost of one or two pipeline stages
        (:attr:`weight_banks`, :attr:`weight_bank_stages`).
    carried_products : bool
        With multiplying lanes, a second register after the products (:attr:`lane_stages`): the
        products' own register is the DSP block's, and the route from a DSP column to the adder
        tree was the mixed MLP's ECP5 critical path (8.2 ns of routing).

    Attributes
    ----------
    i : ``In(stream.Signature(SIMD * input_bits))``
        Input elements, element ``k`` of a beat in bits ``[k * input_bits, (k + 1) * input_bits)``.
    o : ``Out(stream.Signature(PE * output_bits))``
        Output elements for channels ``f_out * PE + p``, ``p`` in beat order.
    load_valid, load_row, load_column, load_data
        With ``weight_memory="spram"`` only: see :class:`~hwgen.rtl.spram.SPRAMWeights`.
    """

    def __init__(self, layer: DenseLayer, *, pe: int, simd: int, vectors: int = 1,
                 tree_levels: int = DEFAULT_TREE_LEVELS, weight_memory: str = "rom", banked_weights: bool = False,
                 carried_products: bool = False):
        if weight_memory not in WEIGHT_MEMORIES:
            raise ValueError(f"layer {layer.name!r}: weight_memory must be one of {', '.join(WEIGHT_MEMORIES)}, "
                             f"not {weight_memory!r}")
        self._weight_memory = weight_memory
        check_positive_int("pe", pe)
        check_positive_int("simd", simd)
        check_positive_int("vectors", vectors)
        check_positive_int("tree_levels", tree_levels)
        self._vectors = vectors
        self._tree_levels = tree_levels
        self._banked_weights = banked_weights and weight_memory == "rom"
        self._carried_products = carried_products
        if simd > layer.in_features:
            raise ValueError(f"layer {layer.name!r}: SIMD={simd} exceeds in_features={layer.in_features}")
        if layer.in_features % simd and vectors > 1:
            raise ValueError(f"layer {layer.name!r}: SIMD={simd} does not divide in_features={layer.in_features}, "
                             f"as a convolution's SIMD must; valid SIMD values: {divisors(layer.in_features)}")
        if layer.out_features % pe:
            raise ValueError(f"layer {layer.name!r}: PE={pe} does not divide out_features={layer.out_features}; "
                             f"valid PE values: {divisors(layer.out_features)}")
        self._layer = layer
        self._pe = pe
        self._simd = simd
        ports = {
            "i": In(stream.Signature(unsigned(simd * layer.input_bits))),
            "o": Out(stream.Signature(unsigned(pe * (1 if layer.output_kind == "threshold"
                                                     else signed_width(layer.acc_min, layer.acc_max))))),
        }
        if weight_memory == "spram":
            ports.update(load_valid=In(1), load_row=In(range(self.weight_depth)),
                         load_column=In(range(self.load_columns)), load_data=In(SPRAM_WIDTH))
        super().__init__(ports)

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
    def weight_memory(self) -> str:
        """Where the weights live: ``"rom"`` or ``"spram"``."""
        return self._weight_memory

    @property
    def weight_width(self) -> int:
        """Bits of one weight word: PE rows of SIMD weights."""
        return self._pe * self._simd * self._layer.weight_bits

    @property
    def weight_depth(self) -> int:
        """Weight words: ``ceil(N_in / SIMD) * (N_out / PE)``."""
        return self.input_beats * self.output_beats

    @property
    def load_columns(self) -> int:
        """16-bit columns of a weight word, as an SPRAM weight memory is loaded."""
        return spram_columns(self.weight_width)

    @property
    def load_words(self) -> int:
        """16-bit words that load an SPRAM weight memory (0 for a ROM)."""
        return self.weight_depth * self.load_columns if self._weight_memory == "spram" else 0

    @property
    def input_beats(self) -> int:
        """Input beats per vector, ``ceil(N_in / SIMD)``."""
        return -(-self._layer.in_features // self._simd)

    @property
    def padding(self) -> int:
        """Zero inputs that end each vector's last beat (:func:`padded_inputs`)."""
        return -self._layer.in_features % self._simd

    @property
    def output_beats(self) -> int:
        """Output beats per image, ``N_out / PE``."""
        return self._layer.out_features // self._pe

    @property
    def cycles_per_vector(self) -> int:
        """Cycles per input vector: ``ceil(N_in / SIMD) * (N_out / PE)``."""
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
    def pair_signs(self) -> bool:
        """Whether lanes sum byte inputs with ±1 weights in pairs (:func:`uses_pair_signs`)."""
        return uses_pair_signs(self._layer)

    @property
    def lane_terms(self) -> int:
        """Terms each lane's adder tree sums per cycle: SIMD, or ``ceil(SIMD / 2)`` pair terms."""
        return -(-self._simd // 2) if self.pair_signs else self._simd

    @property
    def complement_terms(self) -> bool:
        """Whether lanes select the input, doubled or complemented, per ternary or 2-bit weight (on
        integer inputs); the accumulator then starts with each row's count of negative weights."""
        return self._layer.weight_bits == 2 and self._layer.input_kind != "bits"

    @property
    def term_bits(self) -> int:
        """Bits of one term a lane's adder tree sums: 1 (XNOR), the pair term's, a product's (16
        before the DSP's register), or for ternary and 2-bit weights the selected input, one bit
        wider for its complement (two with 2x)."""
        layer = self._layer
        if layer.is_popcount:
            return 1
        if self.pair_signs:
            return min(PAIR_BITS, layer.input_bits + 1)
        if self.complement_terms:
            return layer.input_bits + (1 if layer.weight_kind == "ternary" else 2) - (layer.input_kind == "int8")
        return 16 if self.multiplies else layer.weight_bits + 1

    @property
    def tree_stages(self) -> int:
        """Registers in a lane's adder tree: ``max(1, ceil(ceil(log2(terms)) / tree_levels))``."""
        return tree_stages(self.lane_terms, self._tree_levels)

    @property
    def lane_stages(self) -> int:
        """Registers between the memory-output register and the adder trees: the products (int8
        weights on bytes; two with ``carried_products``); the shared pair sums, then each lane's pair
        terms (±1 weights on bytes), with a stage of copies between them when there are
        :attr:`pair_sum_copies`."""
        if self.pair_signs:
            return 3 if self.pair_sum_copies > 1 else 2
        return (2 if self._carried_products else 1) if self.multiplies else 0

    @property
    def pair_sum_copies(self) -> int:
        """Registered copies of the shared pair sums, one per :data:`PAIR_COPY_LANES` lanes (0
        without pair lanes; 1 means the lanes read the pair sums themselves)."""
        return -(-self._pe // PAIR_COPY_LANES) if self.pair_signs else 0

    @property
    def input_word_copies(self) -> int:
        """Registered copies of the input word, one per :data:`INPUT_COPY_LANES` multiplying lanes (1
        otherwise). They load beside the weight word, so they add no stage: one word fanned out to
        every lane's DSP blocks was the mixed MLP's ECP5 critical path (8.1 ns of routing)."""
        return -(-self._pe // INPUT_COPY_LANES) if self.multiplies else 1

    @property
    def weight_banks(self) -> int:
        """Banks of the weight ROM, each with output registers (:func:`~hwgen.rtl.arith.rom_banks`
        with ``banked_weights``; otherwise 1)."""
        return rom_banks(self.weight_depth, self.weight_width) if self._banked_weights else 1

    @property
    def weight_bank_stages(self) -> int:
        """Pipeline stages the weight banks' output registers add (:func:`~hwgen.rtl.arith.rom_bank_stages`):
        0 unbanked, 1 for LUT tables, 2 for block RAMs."""
        return rom_bank_stages(self.weight_depth, self.weight_width) if self._banked_weights else 0

    @property
    def pipeline_stages(self) -> int:
        """Registered stages from issuing an image's last read to its last output being valid:
        memory read, the banks' output registers (:attr:`weight_bank_stages`), memory-output
        register, :attr:`lane_stages`, the adder tree's stages, accumulate, and the output queue's two."""
        return FIXED_STAGES + self.weight_bank_stages + self.lane_stages + self.tree_stages

    @property
    def lanes_per_flag_copy(self) -> int:
        """Lanes that share one copy of the accumulate stage's valid and first flags: as many as
        keep each copy's load within :data:`FLAG_COPY_LOADS` accumulator bits."""
        return max(1, FLAG_COPY_LOADS // self.accumulator_shape.width)

    @property
    def output_queue_depth(self) -> int:
        """Output beats the queue holds: the results a full-rate pipeline has in flight, plus one.

        A credit taken at an output beat's last read comes back ``pipeline_stages`` cycles later at
        the earliest, and a new beat needs one every ``ceil(N_in / SIMD)`` cycles.
        """
        return -(-(self.pipeline_stages + 1) // self.input_beats) + 1

    @property
    def memories(self) -> list[MemoryShape]:
        """The input double buffer, the output queue's storage, the weight ROM and the per-channel
        constant ROMs."""
        layer, pe, simd = self._layer, self._pe, self._simd
        width = simd * layer.input_bits
        shapes = [MemoryShape(f"buffer{index}", 2 * self.input_beats, min(BUFFER_SLICE_BITS, width - low), rom=False)
                  for index, low in enumerate(range(0, width, BUFFER_SLICE_BITS))]
        shapes.append(MemoryShape("outputs", self.output_queue_depth - 1, pe * self.output_element_bits, rom=False))
        if self._weight_memory == "spram":
            shapes.append(MemoryShape("weights", self.weight_depth, self.weight_width, rom=False, spram=True))
        else:
            shapes += rom_shapes("weights", self.weight_depth, self.weight_width, banked=self._banked_weights)
        if self.start_values is not None:
            shapes += rom_shapes("start", self.output_beats, pe * self.accumulator_shape.width)
        return shapes

    @property
    def start_values(self) -> np.ndarray | None:
        """Per output channel, what its accumulator starts from (None: all zero, no ROM).

        The bias, plus the pair lanes' corrections (or for ternary and 2-bit weights the row's count
        of negative weights, whose terms are ones' complements), minus the threshold: a threshold layer's
        accumulator then ends at ``acc - T``, and its output bit ``acc >= T`` is that value's
        sign bit inverted, so no lane needs a comparator.
        """
        layer = self._layer
        start = np.zeros(layer.out_features, dtype=np.int64)
        if layer.bias is not None:
            start += np.asarray(layer.bias, dtype=np.int64)
        if self.pair_signs:
            start += pair_sign_corrections(layer, self._simd)
        if self.complement_terms:
            start += (layer.weight_values < 0).sum(axis=1)
        if layer.output_kind == "threshold":
            start -= np.asarray(layer.thresholds, dtype=np.int64)
        return start if start.any() else None

    @property
    def accumulator_bounds(self) -> tuple[int, int]:
        """The least and greatest value an accumulator ends with: ``acc``, or ``acc - T``.

        Accumulators add modulo their width, so values on the way (a start value holding what pair
        lanes have yet to add, say) may wrap: the sum of an image's words comes out exact as long
        as the final value fits.
        """
        layer = self._layer
        low, high = layer.acc_min, layer.acc_max
        if layer.output_kind == "threshold":
            thresholds = np.asarray(layer.thresholds, dtype=np.int64)
            low, high = low - int(thresholds.max()), high - int(thresholds.min())
        return low, high

    @property
    def accumulator_shape(self) -> Shape:
        """A lane accumulator's shape: just wide enough for :attr:`accumulator_bounds`. Start values
        are stored modulo its width."""
        low, high = self.accumulator_bounds
        return unsigned(high.bit_length()) if low >= 0 else signed(signed_width(low, high))

    @property
    def output_element_bits(self) -> int:
        """One output element: a bit (threshold) or the two's-complement accumulator."""
        layer = self._layer
        return 1 if layer.output_kind == "threshold" else signed_width(layer.acc_min, layer.acc_max)

    def _inputs(self, data: Signal) -> list:
        kind, bits = self._layer.input_kind, self._layer.input_bits
        if kind == "bits":
            return [data[k] for k in range(self._simd)]
        return [data.word_select(k, bits).as_signed() if kind == "int8" else data.word_select(k, bits)
                for k in range(self._simd)]

    def _weights(self, data: Signal, lane: int) -> list:
        simd, bits = self._simd, self._layer.weight_bits
        word = data[lane * simd * bits:(lane + 1) * simd * bits]
        return [word[k] for k in range(simd)] if bits == 1 else [word.word_select(k, bits).as_signed()
                                                                 for k in range(simd)]

    def _pair_operands(self, m: Module, x: Signal) -> list[tuple]:
        """Per pair of input elements, the shared ``(a + b, a - b)`` of signed bytes (a uint8 ``x``
        as ``x - 128``), registered because each fans out to every lane; an odd last element alone
        (registered too, to stay aligned)."""
        if self._layer.input_kind == "uint8":
            xs = [Cat(x.word_select(k, 8)[:7], ~x.word_select(k, 8)[7]).as_signed() for k in range(self._simd)]
        else:
            xs = self._inputs(x)
        operands = []
        for k in range(0, self._simd - 1, 2):
            total = Signal(signed(PAIR_BITS), name=f"pair_sum{k // 2}", reset_less=True)
            difference = Signal(signed(PAIR_BITS), name=f"pair_difference{k // 2}", reset_less=True)
            m.d.sync += [total.eq(xs[k] + xs[k + 1]), difference.eq(xs[k] - xs[k + 1])]
            operands.append((total, difference))
        if self._simd % 2:
            odd = Signal(signed(PAIR_BITS), name="pair_odd", reset_less=True)
            m.d.sync += odd.eq(xs[-1])
            operands.append((odd,))
        return operands

    def _pair_operand_copies(self, m: Module, operands: list[tuple]) -> list[list[tuple]]:
        """:attr:`pair_sum_copies` registered copies of the pair operands, copy ``c`` for lanes
        ``c * PAIR_COPY_LANES`` onwards."""
        copied = [[register_copies(m, value, self.pair_sum_copies, value.name) for value in pair]
                  for pair in operands]
        return [[tuple(values[c] for values in pair) for pair in copied] for c in range(self.pair_sum_copies)]

    def _pair_terms(self, m: Module, operands: list[tuple], w: Signal, lane: int) -> list[Signal]:
        """A lane's pair terms: the chosen sum or difference, inverted where the first weight is -1.

        Registered: the shared pair sums reach every lane across the layer, and that routing was
        the critical path when the first adders followed in the same cycle."""
        word = w[lane * self._simd:(lane + 1) * self._simd]
        terms = []
        for k, pair in enumerate(operands):
            term = Signal(signed(PAIR_BITS), name=f"term{lane}_{k}", reset_less=True)
            chosen = Mux(word[2 * k + 1], pair[0], pair[1]) if len(pair) == 2 else pair[0]
            m.d.sync += term.eq(chosen ^ Mux(word[2 * k], 0, -1))
            terms.append(term)
        return terms

    def _terms(self, m: Module, x: Signal, w: Signal, lane: int) -> list:
        """The SIMD terms a lane adds: XNOR bits, ±w, or products (registered by the caller)."""
        layer = self._layer
        if layer.is_popcount:
            # Iterate the bits of a Signal, never of a wide expression (see TOOLCHAIN.md).
            agree = Signal(self._simd, name=f"xnor{lane}")
            m.d.comb += agree.eq(~(x ^ w[lane * self._simd:(lane + 1) * self._simd]))
            return [agree[k] for k in range(self._simd)]
        xs, ws = self._inputs(x), self._weights(w, lane)
        if layer.input_kind == "bits":
            return [Mux(xk, wk, -wk) for xk, wk in zip(xs, ws)]
        if self.complement_terms:
            # Ternary and 2-bit weights select the input, doubled or complemented, since yosys maps
            # ``x * w`` onto a DSP block. -x and -2x are the ones' complements ~x = -x - 1 and
            # ~2x: no adder per term, a LUT4 per term bit; the accumulator starts with the row's
            # count of negative weights instead (:attr:`start_values`). A weight's bits are two's
            # complement (b0 - 2 b1); a ternary weight never has b1 without b0.
            ternary = layer.weight_kind == "ternary"
            terms = []
            for xk, wk in zip(xs, ws):
                # x one bit wider as signed (two for 2x), so that ~x holds -x - 1.
                single = xk if layer.input_kind == "int8" else Cat(xk, Const(0, 1)).as_signed()
                if ternary:
                    terms.append(Mux(wk[1], ~single, Mux(wk[0], single, 0)))
                else:
                    double = single << 1
                    terms.append(Mux(wk[1], Mux(wk[0], ~single, ~double), Mux(wk[0], single, 0)))
            return terms
        return [xk * wk for xk, wk in zip(xs, ws)]

    def elaborate(self, platform):
        m = Module()
        layer, pe, simd = self._layer, self._pe, self._simd
        beats_in, beats_out = self.input_beats, self.output_beats

        # Writer: fills one bank while the reader works on the other. An accepted beat is written
        # one cycle later from registers, so that the write enable comes straight from a
        # flip-flop. Its bank counts as full at once: the reader starts at the bank's first word,
        # written cycles earlier unless it is the only one. A wide buffer is built as several
        # memories of at most BUFFER_SLICE_BITS, each written and read through its own copies of
        # the addresses and enable: one address register reaching all of a 512-bit buffer's LUT
        # RAMs was the critical path of its layer on ECP5.
        width = simd * layer.input_bits
        slices = [(low, min(width, low + BUFFER_SLICE_BITS)) for low in range(0, width, BUFFER_SLICE_BITS)]
        full = Signal(2)
        write_bank = Signal()
        write_index = Signal(range(beats_in))
        write_data = Signal.like(self.i.payload, name="write_data", reset_less=True)
        accepted = self.i.valid & self.i.ready
        m.d.comb += self.i.ready.eq(~full.bit_select(write_bank, 1))
        m.d.sync += write_data.eq(self.i.payload)
        write_addrs = register_copies(m, Mux(write_bank, beats_in, 0) + write_index, len(slices), "write_addr")
        write_ens = register_copies(m, accepted, len(slices), "write_en")
        # The reader's address: a counter of its own (read_addr), not bank base + index (an adder
        # in front of a buffer held in logic was the iCE40 critical path), copied per slice.
        read_addr = Signal(range(2 * beats_in))
        read_addr_next = Signal.like(read_addr)
        m.d.sync += read_addr.eq(read_addr_next)
        read_addrs = register_copies(m, read_addr_next, len(slices), "read_addr")
        buffer_word = []
        for index, ((low, high), write_addr, write_en, read_addr_copy) in enumerate(
                zip(slices, write_addrs, write_ens, read_addrs)):
            m.submodules[f"buffer{index}"] = buffer = memory.Memory(
                shape=unsigned(high - low), depth=2 * beats_in, init=[])
            write = buffer.write_port()
            # A one-beat vector may be read in the very cycle its registered write lands.
            read = buffer.read_port(transparent_for=(write,) if beats_in == 1 else ())
            m.d.comb += [write.addr.eq(write_addr), write.data.eq(write_data[low:high]), write.en.eq(write_en),
                         read.addr.eq(read_addr_copy), read.en.eq(1)]
            buffer_word.append(read.data)
        with m.If(accepted):
            with m.If(write_index == beats_in - 1):
                m.d.sync += [write_index.eq(0), write_bank.eq(~write_bank), full.bit_select(write_bank, 1).eq(1)]
            with m.Else():
                m.d.sync += write_index.eq(write_index + 1)

        # Output queue and its credits: `reserved` counts output beats in flight or queued.
        depth = self.output_queue_depth
        m.submodules.outputs = outputs = fifo.SyncFIFOBuffered(width=len(self.o.payload), depth=depth)
        m.d.comb += [
            self.o.valid.eq(outputs.r_rdy),
            self.o.payload.eq(outputs.r_data),
            outputs.r_en.eq(self.o.ready),
        ]
        reserved = Signal(range(depth + 1))
        has_credit = Signal()
        m.d.comb += has_credit.eq(reserved != depth)

        # Stage 0: address generation over (f_out, f_in); a bank is freed on the edge of its last read.
        read_bank = Signal()
        in_index = Signal(range(beats_in))
        out_index = Signal(range(beats_out))
        # Whether the indices sit on their first or last value, registered a read ahead: compared
        # in the same cycle, they were the iCE40 critical path (index -> compare -> next address).
        in_first, in_last = Signal(init=1), Signal(init=int(beats_in == 1))
        out_last = Signal(init=int(beats_out == 1))
        weight_addr = Signal(range(beats_in * beats_out))
        fire = Signal()
        closing = Signal()
        m.d.comb += [
            fire.eq(has_credit & full.bit_select(read_bank, 1)),
            closing.eq(fire & in_last),
            read_addr_next.eq(read_addr),
        ]
        departing = self.o.valid & self.o.ready
        with m.If(closing & ~departing):
            m.d.sync += reserved.eq(reserved + 1)
        with m.Elif(departing & ~closing):
            m.d.sync += reserved.eq(reserved - 1)
        next_weight_addr = Mux(in_last & out_last, 0, weight_addr + 1)
        if self._weight_memory == "spram":
            m.submodules.weights = weights = SPRAMWeights(self.weight_width, self.weight_depth)
            m.d.comb += [weights.read_addr.eq(weight_addr), weights.load_valid.eq(self.load_valid),
                         weights.load_row.eq(self.load_row), weights.load_column.eq(self.load_column),
                         weights.load_data.eq(self.load_data)]
            weight_data = weights.read_data
        else:
            bank_addrs = None
            if self.weight_bank_stages == 2:
                # Block-RAM banks: each memory of each its own copy of the address counter.
                bank_addrs = register_copies(m, next_weight_addr,
                                             self.weight_banks * rom_bank_slices(self.weight_depth, self.weight_width),
                                             "weight_addr", fire, reset_less=False)
            weight_data = read_rom(m, "weights", weight_words(layer, pe, simd), self.weight_width, weight_addr,
                                   Const(1), banked=self._banked_weights, bank_addrs=bank_addrs)
        with m.If(fire):
            m.d.sync += [weight_addr.eq(next_weight_addr), in_first.eq(in_last)]
            with m.If(in_last):
                m.d.sync += [in_index.eq(0), in_last.eq(beats_in == 1)]
                with m.If(out_last):
                    m.d.sync += [out_index.eq(0), out_last.eq(beats_out == 1), read_bank.eq(~read_bank),
                                 full.bit_select(read_bank, 1).eq(0)]
                    m.d.comb += read_addr_next.eq(Mux(read_bank, 0, beats_in))
                with m.Else():
                    m.d.sync += [out_index.eq(out_index + 1), out_last.eq(out_index == beats_out - 2)]
                    m.d.comb += read_addr_next.eq(Mux(read_bank, beats_in, 0))
            with m.Else():
                m.d.sync += [in_index.eq(in_index + 1), in_last.eq(in_index == beats_in - 2)]
                m.d.comb += read_addr_next.eq(read_addr + 1)

        # Only the valid flags are reset. The datapath registers are not: a reset net to every
        # flip-flop of the layer was the critical path once the logic between them was short.
        def stage(name: str, flags: tuple) -> tuple:
            """Register (valid, first, last, out_index) into the next stage."""
            regs = (Signal(name=f"{name}_valid"), Signal(name=f"{name}_first", reset_less=True),
                    Signal(name=f"{name}_last", reset_less=True),
                    Signal(range(beats_out), name=f"{name}_out_index", reset_less=True))
            m.d.sync += [reg.eq(value) for reg, value in zip(regs, flags)]
            return regs

        # Stage 1: memory words are out; stage 2: they are registered, so that the block RAMs'
        # clock-to-output delay does not add to the adder trees'.
        flags = [stage("s1", (fire, in_first, in_last, out_index))]
        for index in range(self.weight_bank_stages):
            # The weight banks' output registers: the input word waits beside them.
            waiting = Signal(width, name=f"input_word_waiting{index}", reset_less=True)
            m.d.sync += waiting.eq(Cat(buffer_word))
            buffer_word = [waiting]
            flags.append(stage(f"s1b{index}", flags[-1]))
        if self.input_word_copies > 1:
            lane_inputs = register_copies(m, Cat(buffer_word), self.input_word_copies, "input_word")
        else:
            lane_inputs = [Signal(width, name="input_word", reset_less=True)]
            m.d.sync += lane_inputs[0].eq(Cat(buffer_word))
        data = lane_inputs[0]
        weight_word = Signal(pe * simd * layer.weight_bits, name="weight_word", reset_less=True)
        m.d.sync += weight_word.eq(weight_data)
        flags.append(stage("s2", flags[-1]))

        if self.pair_signs:
            operands = self._pair_operands(m, data)
            pair_weight_word = Signal.like(weight_word, name="pair_weight_word", reset_less=True)
            m.d.sync += pair_weight_word.eq(weight_word)
            flags.append(stage("s2s", flags[-1]))
            copies = [operands]
            if self.pair_sum_copies > 1:
                copies = self._pair_operand_copies(m, operands)
                copied_weight_word = Signal.like(weight_word, name="copied_weight_word", reset_less=True)
                m.d.sync += copied_weight_word.eq(pair_weight_word)
                pair_weight_word = copied_weight_word
                flags.append(stage("s2r", flags[-1]))
            lane_terms = [self._pair_terms(m, copies[p // PAIR_COPY_LANES], pair_weight_word, p)
                          for p in range(pe)]
            flags.append(stage("s2t", flags[-1]))
        else:
            lane_terms = [self._terms(m, lane_inputs[p // INPUT_COPY_LANES % len(lane_inputs)], weight_word, p)
                          for p in range(pe)]
        # The products' registers: one, or with carried_products a second carrying them on.
        for suffix in ("", "_carried")[:self.lane_stages if self.multiplies else 0]:
            registered = []
            for p, terms in enumerate(lane_terms):
                products = [Signal(signed(18), name=f"product{p}_{k}{suffix}", reset_less=True) for k in range(simd)]
                m.d.sync += [product.eq(term) for product, term in zip(products, terms)]
                registered.append(products)
            lane_terms = registered
            flags.append(stage("s2c" if suffix else "s2p", flags[-1]))

        # The lanes' adder trees, registered every tree_levels levels and at the end.
        partials = [pipelined_tree_sum(m, terms, levels_per_stage=self._tree_levels, name=f"lane{p}",
                                       keep=not layer.is_popcount)
                    for p, terms in enumerate(lane_terms)]
        for t in range(self.tree_stages):
            flags.append(stage(f"tree{t}", flags[-1]))

        # Accumulate (from the start value on an image's first word). Per-channel constants are
        # read two stages before they are used and registered, so that they arrive with the
        # values from a register: read from a 64-word ROM in the cycle of the accumulation, they
        # were that adder's critical path on ECP5.
        acc_shape = self.accumulator_shape
        start = [Const(0, acc_shape)] * pe
        start_values = self.start_values
        if start_values is not None:
            width = acc_shape.width
            start_words = Signal(pe * width, name="start_words", reset_less=True)
            m.d.sync += start_words.eq(read_rom(m, "start", channel_words(start_values, pe, width), pe * width,
                                                flags[-3][3], Const(1)))
            start = [start_words.word_select(p, width) for p in range(pe)]
        accs = [Signal(acc_shape, name=f"acc{p}", reset_less=True) for p in range(pe)]
        # Each group of lanes reads its own copy of the tree stage's valid and first flags: one
        # flag to every accumulator bit of a wide layer was its critical path on ECP5.
        group = self.lanes_per_flag_copy
        copies = -(-pe // group)
        valid_copies = register_copies(m, flags[-2][0], copies, "acc_valid")
        first_copies = register_copies(m, flags[-2][1], copies, "acc_first")
        for p, acc in enumerate(accs):
            with m.If(valid_copies[p // group]):
                m.d.sync += acc.eq(Mux(first_copies[p // group], start[p], acc) + partials[p])
        acc_valid, _, acc_last, _ = stage("acc", flags[-1])

        # Into the queue: the finished accumulators' sign bits (acc - T >= 0), or the scores.
        if layer.output_kind == "threshold":
            result = Cat(~acc[-1] if acc_shape.signed else Const(1) for acc in accs)
        else:
            scores = [Signal(signed(self.output_element_bits), name=f"score{p}") for p in range(pe)]
            m.d.comb += [score.eq(acc) for score, acc in zip(scores, accs)]
            result = Cat(scores)
        m.d.comb += [outputs.w_en.eq(acc_valid & acc_last), outputs.w_data.eq(result)]
        return m
