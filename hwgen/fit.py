"""Resource estimates before synthesis, the fit check against a board, and automatic folding.

The estimate walks the stages of a :class:`~hwgen.rtl.network.NetworkTop`: every memory is
placed in block RAM (the cheapest block configuration for its depth and width) or, when small,
in logic; every lane's adder tree, multiplies and accumulator costs LUTs by a per-family model
calibrated against yosys (``bench/run.py`` compares estimates with synthesis). It is an estimate:
the build report gives the placed numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from amaranth.hdl import Shape

from .boards import Board, Budget
from .errors import UserError
from .ir import Conv2dLayer, IntegerModel, signed_width
from .rtl.arith import LUT_ROM_GROUP_BITS, LUT_ROM_TABLE, MemoryShape, divisors, rom_in_luts
from .rtl.dense import PAIR_BITS, WEIGHT_MEMORIES, FoldedDense, pipelining_for
from .rtl.spram import SPRAM_WIDTH, spram_banks, spram_blocks
from .rtl.network import Fold, NetworkTop, compute_layers, counts_chain, incoming_elements
from .rtl.pool import MaxPool
from .rtl.multithreshold import MultiThreshold
from .rtl.requant import Requantizer
from .rtl.scores import ScoreSerializer
from .rtl.slice import RegisterSlice
from .rtl.window import SlidingWindow

__all__ = ["Resources", "StageEstimate", "Estimate", "estimate", "check_fit", "auto_folds", "fit_folds",
           "weight_placements", "parse_weight_memories", "RESOURCE_NAMES"]

RESOURCE_NAMES = {"luts": "LUTs", "ffs": "flip-flops", "dsps": "DSP multipliers", "bram_blocks": "block RAMs",
                  "spram_blocks": "SPRAM blocks"}

#: Share of the LUTs `--fold auto` may plan for, leaving room for routing and the board top.
AUTO_ROUTING_SHARE = 0.75
#: Share of the DSP blocks it may plan for. At 0.75 the int8 MLP's first layer stopped at 4x16
#: (II 3136, 88 % of the ideal for its lanes); at 2x49 it takes 140 of the ULX3S's 156 and routes
#: (nextpnr-ecp5, 75.0 MHz against 67.7 at 4x16, II 2048). DSP blocks are hard sites: using more of
#: them costs routing time, not LUTs.
AUTO_DSP_SHARE = 0.9


@dataclass(frozen=True)
class FamilyCosts:
    """LUT costs of the family's logic, in its own LUTs (LUT4 on iCE40/ECP5, LUT6 on 7-series), and
    the costs yosys's ``memory_libmap`` weighs when it places a memory (its ``cost`` lines in
    ``share/ice40/brams.txt``, ``share/lattice/brams_16kd.txt`` and ``lutrams_trellis.txt``)."""

    lut_scale: float            # placed LUTs per LUT4 of the model below (carry chains and packing included)
    bram_cost: int              # memory_libmap's cost of one block RAM
    lutram_cost: int | None     # ... of one 16x4 distributed RAM (RAMs only; None: the family has none)
    lut_bits: int               # bits of a ROM one LUT holds (16 for LUT4, 64 for LUT6)
    ffs_take_own_luts: bool     # a flip-flop not fed by a LUT takes a logic cell of its own (iCE40 LCs)
    multiplier_luts: int        # an 8x8 multiply when no DSP is left
    # yosys (synth_ecp5, synth_ice40 -dsp) maps every multiply to a DSP block however many the
    # device has, so past the budget the design does not place; Vivado (-max_dsp defaults to the
    # device's count) puts the rest in LUTs.
    multiplies_spill_to_luts: bool
    # An XNOR-popcount lane per input: base + per_level * log2(SIMD) (ABC maps the popcount between
    # two tree registers as one block; the registers every two levels on ECP5 cost LUTs there).
    xnor_luts_per_input: float = 1.8
    xnor_luts_per_input_per_level: float = 0.0
    # Address counters, handshakes and pipeline control of one dense layer.
    layer_base_luts: float = 100
    # `--fold auto`'s bound on a layer's input bits times its lanes (PE x SIMD x input bits): each
    # lane reads every bit of the input word, so this counts the wires its broadcast must route.
    # None: no bound (the LUT budget binds first).
    max_broadcast_sinks: int | None = None

    def dsps_for(self, products: int, dsps_left: int) -> int:
        """How many of ``products`` multiplies yosys or Vivado puts in DSP blocks."""
        return min(products, dsps_left) if self.multiplies_spill_to_luts else products


#: Placed TRELLIS_COMB per LUT4 of the model on ECP5 (carry cells, LUT RAMs and the pass-through
#: LUTs nextpnr adds for flip-flops it cannot pack included): fitted to bench/fit.py's ECP5 builds.
ECP5_LUT_SCALE = 1.22
#: ECP5's XNOR-popcount lane cost per input: (base, per level of log2(SIMD)), fitted to yosys.
ECP5_XNOR = (0.3, 0.45)
#: Measured with nextpnr-ecp5 on the ULX3S-85F: a 784-input uint8 layer at 32x98 (25,088 sinks,
#: 39k LUT4 in all) did not route (router2 ~10,000 overused wires after 42 minutes); 15x100
#: (12,000) and 16x98 (12,544) route (placed at 111.0 and 91.2 MHz).
ECP5_MAX_BROADCAST_SINKS = 12800

FAMILY_COSTS = {
    "ice40": FamilyCosts(lut_scale=1.25, bram_cost=64, lutram_cost=None, lut_bits=16, ffs_take_own_luts=True,
                         multiplier_luts=90, multiplies_spill_to_luts=False),
    "ecp5": FamilyCosts(lut_scale=ECP5_LUT_SCALE, bram_cost=128, lutram_cost=4, lut_bits=16, ffs_take_own_luts=False,
                        multiplier_luts=90, multiplies_spill_to_luts=False,
                        xnor_luts_per_input=ECP5_XNOR[0], xnor_luts_per_input_per_level=ECP5_XNOR[1],
                        layer_base_luts=70, max_broadcast_sinks=ECP5_MAX_BROADCAST_SINKS),
    # Vivado's own memory inference: modelled with the same rule, LUT6 ROMs and 64x1 LUT RAMs.
    "xc7": FamilyCosts(lut_scale=0.7, bram_cost=128, lutram_cost=1, lut_bits=64, ffs_take_own_luts=False,
                       multiplier_luts=60, multiplies_spill_to_luts=True),
}


@dataclass
class Resources:
    luts: float = 0
    ffs: float = 0
    dsps: int = 0
    bram_blocks: int = 0
    spram_blocks: int = 0

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(self.luts + other.luts, self.ffs + other.ffs, self.dsps + other.dsps,
                         self.bram_blocks + other.bram_blocks, self.spram_blocks + other.spram_blocks)

    def as_dict(self) -> dict[str, int]:
        return {"luts": round(self.luts), "ffs": round(self.ffs), "dsps": self.dsps, "bram_blocks": self.bram_blocks,
                "spram_blocks": self.spram_blocks}


@dataclass
class StageEstimate:
    """One stage of the network: the layer it belongs to, what it is, what it costs."""

    layer: str
    stage: str
    resources: Resources
    cycles_per_image: int


@dataclass
class Estimate:
    """The whole network on one board."""

    board: Board
    folds: list[Fold]
    stages: list[StageEstimate]
    board_top: Resources
    cycles_per_image: int
    weight_memories: list[str]          # per dense/conv layer: "rom" or "spram"

    @property
    def total(self) -> Resources:
        total = self.board_top
        for stage in self.stages:
            total = total + stage.resources
        return total

    def per_layer(self) -> dict[str, Resources]:
        layers: dict[str, Resources] = {}
        for stage in self.stages:
            layers[stage.layer] = layers.get(stage.layer, Resources()) + stage.resources
        return layers

    def over_budget(self, routing_share: float = 1.0, keys: tuple[str, ...] = tuple(RESOURCE_NAMES)) -> list[str]:
        """Resources among ``keys`` the estimate exceeds, most over first, each named with the layer
        that uses most of it."""
        budget, total, layers = self.board.budget, self.total.as_dict(), self.per_layer()
        limits = _limits(budget, routing_share)
        over = sorted((key for key in keys if total[key] > limits[key]),
                      key=lambda key: total[key] / max(limits[key], 1e-9), reverse=True)
        problems = []
        for key in over:
            layer, used = max(((name, r.as_dict()[key]) for name, r in layers.items()), key=lambda item: item[1])
            problems.append(f"{RESOURCE_NAMES[key]}: estimated {total[key]} of {budget.__dict__[key]} "
                            f"on {self.board.name}; layer {layer!r} alone needs {used}")
        return problems

    def table(self) -> list[dict]:
        """Per-layer rows for reports."""
        rows = []
        dense = [s.layer for s in self.stages if s.stage == "dense"]
        fold_of = dict(zip(dense, self.folds))
        memory_of = dict(zip(dense, self.weight_memories))
        for name, r in self.per_layer().items():
            cycles = max(s.cycles_per_image for s in self.stages if s.layer == name)
            fold = fold_of.get(name)
            rows.append({"layer": name, "fold": str(fold) if fold else "-", "weights": memory_of.get(name, "-"),
                         "cycles_per_image": cycles, **r.as_dict()})
        rows.append({"layer": "(board top)", "fold": "-", "weights": "-", "cycles_per_image": 0,
                     **self.board_top.as_dict()})
        return rows


def bram_blocks_for(shape: MemoryShape, budget: Budget) -> int:
    """Blocks of the cheapest block-RAM configuration holding ``shape`` (depth x width)."""
    return min(math.ceil(shape.width / width) * math.ceil(shape.depth / depth)
               for depth, width in budget.bram_shapes)


def _emulation_cost(shape: MemoryShape) -> int:
    """What ``memory_libmap`` adds to a block RAM's cost for logic it emulates around it (twice its
    emulation score): a ROM's read enable (score 1); a RAM's read-first behaviour when one address
    is written and read in the same cycle (score 7, whatever the size: seen with ``debug
    memory_libmap`` on the dense layers' buffers, 8x128 to 200x1)."""
    return 2 * (1 if shape.rom else 7)


def memory_placement(shape: MemoryShape, budget: Budget, costs: FamilyCosts) -> str:
    """Where yosys puts a memory: ``"block"`` RAM, ``"distributed"`` (LUT) RAM or ``"logic"``.

    ``memory_libmap`` costs logic at one per bit of a RAM (flip-flops) and one per 16 bits of a
    ROM (LUTs), a library memory at its cost line per block plus emulated logic, and takes a
    library memory only when it is strictly cheaper; a memory of any size can so end up in logic.
    """
    if shape.spram:
        return "spram"
    if shape.in_luts:
        return "logic"
    options = {"logic": shape.bits / (16 if shape.rom else 1)}
    if budget.bram_blocks:
        options["block"] = bram_blocks_for(shape, budget) * costs.bram_cost + _emulation_cost(shape)
    if costs.lutram_cost is not None and not shape.rom:
        options["distributed"] = math.ceil(shape.depth / 16) * math.ceil(shape.width / 4) * costs.lutram_cost
    best = min(options.values())
    return "logic" if options["logic"] <= best else min(options, key=options.get)


def _or_luts(inputs: int) -> int:
    """LUT4s per bit of an OR of ``inputs`` registers: the first takes four, each further one three more."""
    return math.ceil((inputs - 1) / 3)


def _memory_cost(shape: MemoryShape, budget: Budget, costs: FamilyCosts) -> Resources:
    """What a memory costs where :func:`memory_placement` puts it (its read register included)."""
    placement = memory_placement(shape, budget, costs)
    if placement == "spram":
        # The blocks, and the multiplexer of the banks' outputs.
        return Resources(luts=SPRAM_WIDTH * (spram_banks(shape.depth) - 1) * -(-shape.width // SPRAM_WIDTH),
                         spram_blocks=spram_blocks(shape.width, shape.depth))
    if placement == "block":
        return Resources(luts=8, bram_blocks=bram_blocks_for(shape, budget))
    if placement == "distributed":
        return Resources(luts=shape.width * math.ceil(shape.depth / 16) * 1.5, ffs=shape.width)
    if shape.tables_registered:
        # A LUT4 per table and bit, then an OR of three more tables per LUT4 (yosys: the reference
        # CNN's 36 x 512-bit ROM, about 4 LUT4 per bit); the tables' registers are the layer's.
        tables = math.ceil(shape.depth / LUT_ROM_TABLE)
        return Resources(luts=shape.width * (tables + _or_luts(tables)),
                         ffs=math.ceil(shape.width / LUT_ROM_GROUP_BITS) * (shape.depth - 1).bit_length())
    if shape.rom:
        # LUT tables of lut_bits entries per bit, then a mux tree joining them; read_rom registers
        # a copy of the address per group of bits, yosys the data.
        tables = math.ceil(shape.depth / costs.lut_bits)
        ffs = (math.ceil(shape.width / LUT_ROM_GROUP_BITS) * (shape.depth - 1).bit_length() if shape.in_luts
               else shape.width)
        return Resources(luts=shape.width * (2 * tables - 1), ffs=ffs)
    # Flip-flops written straight from the input (on iCE40 each in a logic cell of its own) and a read mux.
    mux = shape.width * (shape.depth - 1) / 2
    return Resources(luts=mux + (shape.bits if costs.ffs_take_own_luts else 0), ffs=shape.bits + shape.width)


#: A lane's accumulator (its start multiplexer and adder), per accumulator bit (LUT4).
LANE_ACC_LUTS = 2
#: Per byte x byte product lane (DSP multiply, then an adder-tree share), LUT4s per input.
PRODUCT_LUTS_PER_INPUT = 12
#: A pair lane (byte inputs, ±1 weights) per input: a LUT4 per bit of each 9-bit pair term, then a
#: carry-chain tree (bench/lanes.py).
PAIR_LUTS_PER_INPUT = 10.0
#: The pair sums and differences shared by a layer's lanes, per input.
PAIR_SUM_LUTS_PER_INPUT = 5
#: A ternary or int2 weight's term (the input selected, doubled or complemented) and its share of the
#: adder tree, per input and per term bit (LUT4).
SMALL_PRODUCT_LUTS_PER_INPUT = 2.0
SMALL_PRODUCT_LUTS_PER_BIT = 1.2
#: A multi-threshold unit (LUT4): its control and counters; the share of a full multiplexer its
#: lanes' accumulator picks cost; per bit of each comparator (the level count included).
MULTITHRESHOLD_BASE_LUTS = 120
MULTITHRESHOLD_PICK_SHARE = 0.4
MULTITHRESHOLD_LUTS_PER_THRESHOLD_BIT = 0.65
#: The SPI flash loader and the SPRAM load sequencer (logic and flip-flops).
LOADER_LUTS = 180
LOADER_FFS = 130
#: A sliding window's logic besides its pixel width (LUT4).
WINDOW_LUTS = 370
#: A requantizer lane besides its multipliers: rounding, shift, clamp, and its constants (LUT4).
#: 350 when the clamp spanned the whole product; its narrow clamp took 130 LUT4 less per lane (yosys).
REQUANT_LANE_LUTS = 220


def _dense_cost(stage: FoldedDense, dsps_left: int, costs: FamilyCosts) -> Resources:
    layer, pe, simd = stage.layer, stage.pe, stage.simd
    acc_bits = stage.accumulator_shape.width
    partial_bits = math.ceil(math.log2(simd + 1)) + (0 if layer.is_popcount else 9)
    lanes = Resources(luts=costs.layer_base_luts + 3 * math.log2(max(2, stage.cycles_per_vector)),
                      ffs=40 + pe * (acc_bits + partial_bits + stage.output_element_bits))
    if layer.is_popcount:
        per_lane = simd * (costs.xnor_luts_per_input + costs.xnor_luts_per_input_per_level * math.log2(simd))
    elif stage.multiplies:
        products = pe * simd
        on_dsp = costs.dsps_for(products, dsps_left)
        lanes.dsps = on_dsp
        lanes.ffs += products * 16 * stage.lane_stages + (stage.input_word_copies - 1) * simd * layer.input_bits
        per_lane = PRODUCT_LUTS_PER_INPUT * simd + (products - on_dsp) * costs.multiplier_luts / pe
    elif stage.pair_signs:
        # Pair terms are an input bit wider than the inputs (9 bits for bytes).
        term_share = stage.term_bits / PAIR_BITS
        per_lane = PAIR_LUTS_PER_INPUT * simd * term_share
        lanes.luts += PAIR_SUM_LUTS_PER_INPUT * simd * term_share
        # Each lane's registered pair terms; the pair sums' copies and the weight word beside them.
        lanes.ffs += pe * -(-simd // 2) * PAIR_BITS * term_share
        if stage.pair_sum_copies > 1:
            lanes.ffs += stage.pair_sum_copies * simd * PAIR_BITS * term_share + pe * simd
    else:
        # Ternary or int2 weights on k-bit (or byte) inputs: a select-and-negate per product bit,
        # then the adder tree.
        per_lane = simd * (SMALL_PRODUCT_LUTS_PER_INPUT + SMALL_PRODUCT_LUTS_PER_BIT * stage.term_bits)
    # Pipeline registers of the adder trees (bench/lanes.py).
    lanes.ffs += pe * simd * (0.8 if layer.is_popcount else 1.75) * stage.tree_stages
    # The memory-output registers (input_word, weight_word) take their D from a register or a
    # block RAM, not a LUT: on iCE40 each flip-flop is a logic cell of its own. (A weight ROM of
    # LUTs feeds its register from a LUT.)
    weight_bits = pe * simd * layer.weight_bits
    in_luts = rom_in_luts(stage.input_beats * stage.output_beats)
    word_registers = simd * layer.input_bits + (0 if in_luts else weight_bits)
    lanes.ffs += simd * layer.input_bits + weight_bits
    if stage.pair_signs:
        # The weight word's copy that travels beside the registered pair sums, and those sums.
        word_registers += pe * simd
        lanes.ffs += pe * simd + simd * PAIR_BITS
    if costs.ffs_take_own_luts:
        lanes.luts += word_registers
    lanes.luts += pe * (per_lane + LANE_ACC_LUTS * acc_bits)
    if stage.start_values is not None:
        # The accumulators' start values, registered after their ROM.
        lanes.ffs += pe * acc_bits
    if stage.weight_bank_stages:
        # The banks' output registers and the input word waiting beside them.
        lanes.ffs += stage.weight_bank_stages * (stage.weight_banks * weight_bits + simd * layer.input_bits)
        if not in_luts:
            # The OR of the block-RAM banks' registers, three more banks per LUT4 (yosys: the int8
            # MLP's 7-bank first layer took 3,291 LUT4 where the lanes alone were estimated at 1,765).
            lanes.luts += weight_bits * _or_luts(stage.weight_banks)
    return lanes


def _stage_cost(stage, dsps_left: int, costs: FamilyCosts) -> tuple[str, Resources]:
    """What a stage is called in reports and what its logic costs (memories excluded)."""
    if isinstance(stage, FoldedDense):
        return "dense", _dense_cost(stage, dsps_left, costs)
    if isinstance(stage, Requantizer):
        # Per lane, acc * M0 (32 x 31 bits) in four 16x16 or 18x18 multipliers, then round, shift and
        # clamp; six register stages (operands, partial products, two for their sum, shift) and the queue.
        products = 4 * stage.lanes
        on_dsp = costs.dsps_for(products, dsps_left)
        ffs = 400 * stage.lanes
        luts = REQUANT_LANE_LUTS * stage.lanes + (products - on_dsp) * 4 * costs.multiplier_luts
        if costs.ffs_take_own_luts:
            # Its pipeline registers are loaded from multipliers and registers, not from a LUT: on
            # iCE40 each takes a logic cell of its own (nextpnr: a 36-24-10 int8 MLP at 1x2,1x2
            # placed 2,250 cells where the estimate without them was 1,626).
            luts += ffs
        return "requant", Resources(luts=luts, ffs=ffs, dsps=on_dsp)
    if isinstance(stage, MultiThreshold):
        # Per lane the pick of its accumulator from the held beat (a multiplexer of PE / lanes
        # inputs per accumulator bit) and a comparator per threshold; registers for the held beat,
        # the accumulators (twice), the thresholds, the comparisons and the output. Fitted to yosys
        # (synth_ecp5) on six units: 1-32 lanes, 2-4 bits, 9-11-bit accumulators, within 15 %.
        lanes, width, bits = stage.lanes, stage.acc_bits, stage.threshold_bits
        pick = width * (stage.accept_interval - 1) / 2
        return "multithreshold", Resources(
            luts=MULTITHRESHOLD_BASE_LUTS + lanes * (MULTITHRESHOLD_PICK_SHARE * pick
                                                     + MULTITHRESHOLD_LUTS_PER_THRESHOLD_BIT * stage.levels * bits),
            ffs=20 + stage.pe * width + lanes * (2 * width + stage.levels * (bits + 1) + stage.output_bits))
    if isinstance(stage, SlidingWindow):
        # Its counters, position registers and their adders, and a LUT per pixel bit to zero the
        # padding (yosys, the reference CNN's two windows and three other shapes, 1 and 8 bits:
        # 327-572 LUT4 on iCE40, 394-639 on ECP5, within 12 % of this).
        width = Shape.cast(stage.o.payload.shape()).width
        return "window", Resources(luts=WINDOW_LUTS + width, ffs=130 + 3 * width)
    if isinstance(stage, MaxPool):
        # The row max and the merge with the rows above (an OR per bit on bits, a compare and a
        # select per byte), the row max and output registers; the rows above are in `memories`.
        width = stage.pixel_width
        return "pool", Resources(luts=40 + width * (2 if stage._bits == 1 else 5), ffs=30 + 2 * width)
    if isinstance(stage, RegisterSlice):
        # Two entries and the level; the output multiplexer picks one entry per bit.
        width = Shape.cast(stage.o.payload.shape()).width
        return "slice", Resources(luts=8 + width, ffs=4 + 2 * width)
    width = Shape.cast(stage.i.payload.shape()).width + Shape.cast(stage.o.payload.shape()).width
    kind = "scores" if isinstance(stage, ScoreSerializer) else "stream"
    return kind, Resources(luts=20 + width / 2, ffs=10 + width)


def stage_resources(stage, dsps_left: int, board: Board) -> tuple[str, Resources]:
    """What a stage is called in reports, and what it and its memories take on ``board`` (LUTs as
    placed), with ``dsps_left`` DSP blocks not yet taken by the stages before it."""
    costs = FAMILY_COSTS[board.family]
    kind, logic = _stage_cost(stage, dsps_left, costs)
    for shape in getattr(stage, "memories", []):
        logic = logic + _memory_cost(shape, board.budget, costs)
    logic.luts *= costs.lut_scale
    return kind, logic


def estimate(model: IntegerModel, folds: list[Fold], board: Board, weight_memories: list[str] | None = None) -> Estimate:
    """Estimate every stage of ``model`` folded by ``folds`` on ``board``, with each layer's weights
    where ``weight_memories`` says (default: all ROM)."""
    weight_memories = list(weight_memories or ["rom"] * len(folds))
    if "spram" in weight_memories and not board.budget.spram_blocks:
        raise UserError(f"{board.name} has no SPRAM for weights; its layers' weights go in ROM")
    top = NetworkTop(model, folds, weight_memories=weight_memories, **pipelining_for(board.family))
    costs = FAMILY_COSTS[board.family]
    budget = board.budget
    stages = []
    dsps_left = budget.dsps
    for stage, layer in zip(top.stages, top.stage_layers):
        kind, logic = stage_resources(stage, dsps_left, board)
        dsps_left -= logic.dsps
        stages.append(StageEstimate(layer, kind, logic, stage.cycles_per_image))
    # UART receiver and transmitter, command decoder, identity ROM, class and LED registers; the
    # flash loader's shift registers, CRC, header compare and counters.
    board_top = Resources(luts=180 * costs.lut_scale, ffs=120)
    if top.load_words:
        board_top = board_top + Resources(luts=LOADER_LUTS * costs.lut_scale, ffs=LOADER_FFS)
    return Estimate(board, list(folds), stages, board_top, top.cycles_per_image, weight_memories)


def check_fit(est: Estimate) -> None:
    """Raise :class:`UserError` naming each resource the design exceeds and its largest layer."""
    problems = est.over_budget()
    if problems:
        raise UserError(f"the design does not fit {est.board.name} (folds {','.join(map(str, est.folds))}): "
                        + "; ".join(problems) + ". Try --fold auto, or a smaller network or a larger board")


def _fold_options(model: IntegerModel, max_broadcast_sinks: int | None = None) -> list[list[Fold]]:
    """Every fold of every compute layer, without those whose input broadcast exceeds
    ``max_broadcast_sinks`` (see :attr:`FamilyCosts.max_broadcast_sinks`; 1x1 is always kept)."""
    options = []
    for layer in compute_layers(model):
        dense = layer.dense if isinstance(layer, Conv2dLayer) else layer
        options.append([Fold(pe, simd) for pe in divisors(dense.out_features) for simd in divisors(dense.in_features)
                        if max_broadcast_sinks is None or pe * simd == 1
                        or pe * simd * dense.input_bits <= max_broadcast_sinks])
    return options


def _padded_fold(layer, incoming: int, target: int, max_broadcast_sinks: int | None) -> Fold | None:
    """The fold of dense ``layer`` with the fewest lanes that meets ``target`` cycles per image
    with a SIMD that is a multiple of ``incoming`` and does not divide the layer's inputs (its last
    beat padded, see :class:`~hwgen.rtl.dense.FoldedDense`); None if there is none. Where no
    divisor lies between two SIMD values (784 × 256 has no PE × SIMD between 128 and 196), such a
    fold keeps a layer from being much faster than the interval needs."""
    best = None
    for pe in divisors(layer.out_features):
        beats = target // (layer.out_features // pe)
        if beats < 1:
            continue
        fewest = -(-layer.in_features // beats)               # elements per beat for that many beats
        simd = -(-fewest // incoming) * incoming             # rounded up to whole incoming beats
        if simd > layer.in_features or layer.in_features % simd == 0:
            continue
        if max_broadcast_sinks is not None and pe * simd * layer.input_bits > max_broadcast_sinks:
            continue
        if best is None or pe * simd < best.pe * best.simd:
            best = Fold(pe, simd)
    return best


def _limits(budget: Budget, routing_share: float) -> dict[str, float]:
    """What a design may use of each resource: LUTs up to ``routing_share`` of the device, and DSPs
    up to :data:`AUTO_DSP_SHARE` when ``routing_share`` is below 1 (a plan, not a hard limit)."""
    dsp_share = 1.0 if routing_share >= 1 else max(routing_share, AUTO_DSP_SHARE)
    return {"luts": budget.luts * routing_share, "ffs": budget.ffs, "dsps": budget.dsps * dsp_share,
            "bram_blocks": budget.bram_blocks, "spram_blocks": budget.spram_blocks}


def _share(used: dict[str, int], limits: dict[str, float]) -> float:
    """The scarcest resource's share of its limit (a resource not used counts 0, even on a device without it)."""
    return max(used[key] / max(limit, 1e-9) if used[key] else 0.0 for key, limit in limits.items())


class NoFoldingFits(UserError):
    """No folding fits the board; ``resources`` are the budget keys the error names."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.resources = {key for key, name in RESOURCE_NAMES.items()
                          if any(problem.startswith(f"{name}:") for problem in problems)}


class _FoldOption(NamedTuple):
    """One fold of one layer, costed with the other layers at 1x1."""

    share: float                # of the scarcest resource (see _share)
    cycles: int                 # the layer's cycles per image at this fold
    fold: Fold
    used: dict[str, int]        # the layer's resources


def _interval_for(target_fps: float, board: Board, clock_hz: float, floor: int, fastest: int) -> int:
    """The largest initiation interval, in cycles of ``clock_hz``, that makes ``target_fps`` images/s."""
    if not target_fps > 0:
        raise UserError(f"--target-fps {target_fps:g}: give a number of images per second above 0")
    interval, best = math.floor(clock_hz / target_fps), max(floor, fastest, 1)
    if interval < best:
        raise UserError(f"--target-fps {target_fps:g}: at {clock_hz / 1e6:g} MHz on {board.name} the network "
                        f"takes at least {best} cycles per image even fully unfolded, at most "
                        f"{clock_hz / best:,.0f} images/s")
    return interval


def parse_weight_memories(text: str, model: IntegerModel, board: Board) -> list[str] | None:
    """``--weight-memory``: None for ``auto``, else one of rom/spram per dense or conv layer."""
    if text == "auto":
        return None
    layers = compute_layers(model)
    memories = [item.strip().lower() for item in text.split(",")]
    if len(memories) != len(layers) or any(memory not in WEIGHT_MEMORIES for memory in memories):
        raise UserError(f"--weight-memory {text!r}: give 'auto' or one of {'/'.join(WEIGHT_MEMORIES)} for each of "
                        f"the {len(layers)} dense/conv layers ({', '.join(layer.name for layer in layers)})")
    if "spram" in memories and not board.budget.spram_blocks:
        raise UserError(f"--weight-memory: {board.name} has no SPRAM; use rom for every layer")
    return memories


def weight_placements(model: IntegerModel, board: Board) -> list[list[str]]:
    """Where the layers' weights may go on ``board``, fewest SPRAM layers first: all in ROM, then
    the largest layer's in SPRAM, then the two largest, and so on while the SPRAM blocks last
    (one block at least per layer). SPRAM reads 16 bits per block per cycle, so a layer placed
    there is slower than in block RAM: it is placed there only when the ROMs do not fit."""
    layers = compute_layers(model)
    placement = ["rom"] * len(layers)
    placements = [list(placement)]
    denses = [layer.dense if isinstance(layer, Conv2dLayer) else layer for layer in layers]
    bits = [dense.weights.size * dense.weight_bits for dense in denses]
    blocks_left = board.budget.spram_blocks
    for index in sorted(range(len(layers)), key=lambda i: -bits[i]):
        need = spram_blocks(SPRAM_WIDTH, -(-bits[index] // SPRAM_WIDTH))
        if need > blocks_left:
            break
        blocks_left -= need
        placement[index] = "spram"
        placements.append(list(placement))
    return placements


def fit_folds(model: IntegerModel, folds: list[Fold], board: Board, weight_memories: list[str] | None = None) -> Estimate:
    """The estimate of ``folds`` on ``board`` with the weights where ``weight_memories`` says, or
    (None) at the first of :func:`weight_placements` that fits (the all-ROM one if none does)."""
    if weight_memories is not None:
        return estimate(model, folds, board, weight_memories)
    estimates = []
    for placement in weight_placements(model, board):
        try:
            est = estimate(model, folds, board, placement)
        except (ValueError, TypeError):
            continue
        if not est.over_budget():
            return est
        estimates.append(est)
    return estimates[0] if estimates else estimate(model, folds, board)


def auto_folds(model: IntegerModel, board: Board, routing_share: float = AUTO_ROUTING_SHARE, *,
               target_fps: float | None = None, clock_hz: float | None = None,
               weight_memories: list[str] | None = None) -> Estimate:
    """:func:`auto_folds_placed` with the weights where ``weight_memories`` says, or (None) at the
    first of :func:`weight_placements` for which a folding fits. The next placement is tried only
    while block RAM is among what did not fit; the error is the last placement's."""
    if weight_memories is not None:
        return auto_folds_placed(model, board, routing_share, target_fps=target_fps, clock_hz=clock_hz,
                                 weight_memories=weight_memories)
    placements = weight_placements(model, board)
    for index, placement in enumerate(placements):
        try:
            return auto_folds_placed(model, board, routing_share, target_fps=target_fps, clock_hz=clock_hz,
                                     weight_memories=placement)
        except NoFoldingFits as error:
            if index == len(placements) - 1 or "bram_blocks" not in error.resources:
                raise
    raise AssertionError("weight_placements gives at least one placement")


def auto_folds_placed(model: IntegerModel, board: Board, routing_share: float = AUTO_ROUTING_SHARE, *,
                      target_fps: float | None = None, clock_hz: float | None = None,
                      weight_memories: list[str]) -> Estimate:
    """The folds with the lowest initiation interval whose estimate fits ``board``, or with
    ``target_fps`` the cheapest folds that reach that many images per second at ``clock_hz``
    (the network's clock; default the board's).

    Every fold of every layer is costed once, with the other layers at 1x1. Then, for each
    candidate interval from the fastest up, each layer takes the fold with the fewest lanes that
    meets the interval (then the one using least of its scarcest resource), so that no layer is
    faster than the interval needs (extra speed there would be wasted area); the first choice
    whose whole-network estimate fits within budget (LUTs up to ``routing_share``, leaving room for routing, DSPs up to :data:`AUTO_DSP_SHARE`) wins. With
    ``target_fps`` the only candidate is the interval ``floor(clock / fps)`` (FINN's target_fps rule).

    Each layer's fold must chain with the one before (:func:`~hwgen.rtl.network.incoming_elements`);
    a dense layer after another may take a SIMD that does not divide its inputs
    (:func:`_padded_fold`) when that needs fewer lanes than any dividing fold meeting the interval.
    """
    max_sinks = FAMILY_COSTS[board.family].max_broadcast_sinks
    options = _fold_options(model, max_sinks)
    base = [Fold(1, 1)] * len(options)       # always chains: 1 divides every beat size
    names = [layer.name for layer in compute_layers(model)]
    limits = _limits(board.budget, routing_share)
    costed: list[list[_FoldOption]] = []
    floor = 0
    for index, layer_options in enumerate(options):
        rows = []
        for fold in layer_options:
            try:
                est = estimate(model, base[:index] + [fold] + base[index + 1:], board, weight_memories)
            except (ValueError, TypeError):
                continue
            mine = [stage for stage in est.stages if stage.layer == names[index]]
            cost = Resources()
            for stage in mine:
                cost = cost + stage.resources
            used = cost.as_dict()
            # Flip-flops do not break ties: each LUT comes with one, and their estimate is the least
            # calibrated (+14 % over the placed count of the W1A2 MLP on ECP5).
            without_ffs = {key: value for key, value in limits.items() if key != "ffs"}
            rows.append(_FoldOption(_share(used, without_ffs), max(s.cycles_per_image for s in mine if s.stage == "dense"),
                                    fold, used))
            # Windows and pools move a pixel per cycle and the serializer a class score per cycle
            # whatever the folds: no interval beats them, so no layer needs to be faster.
            floor = max(floor, max((s.cycles_per_image for s in est.stages if s.stage in ("window", "pool", "scores")),
                                   default=0))
        # Fewest lanes first: the slowest fold that meets an interval wastes no lane on speed the
        # network cannot use (FINN's balance); the scarcest resource breaks ties.
        costed.append(sorted(rows, key=lambda row: (row.fold.pe * row.fold.simd, row.share, row.cycles)))
    targets = sorted({row.cycles for rows in costed for row in rows if row.cycles >= floor} | {floor})
    if target_fps is not None:
        unfolded = [min(rows, key=lambda row: row.cycles).fold for rows in costed]
        clock_hz = clock_hz or board.clock_hz
        targets = [_interval_for(target_fps, board, clock_hz, floor, estimate(model, unfolded, board, weight_memories).cycles_per_image)]
    last_problems: list[str] = []
    layers = compute_layers(model)

    def choose(target: int, padding: bool) -> list[Fold] | None:
        """Each layer's fold with the fewest lanes that meets ``target`` and chains with the one
        before; with ``padding``, padded folds where they need fewer lanes."""
        folds: list[Fold] = []
        for index, rows in enumerate(costed):
            incoming = incoming_elements(model, index, folds)
            meeting = [row.fold for row in rows if row.cycles <= target
                       and (incoming is None or counts_chain(row.fold.simd, incoming))]
            if padding and incoming is not None and not isinstance(layers[index], Conv2dLayer):
                padded = _padded_fold(layers[index], incoming, target, max_sinks)
                if padded is not None and (not meeting or padded.pe * padded.simd < meeting[0].pe * meeting[0].simd):
                    meeting.insert(0, padded)
            if not meeting:
                return None
            folds.append(meeting[0])
        return folds

    for target in targets:
        # A padded fold takes fewer lanes but a deeper weight memory; where that does not fit,
        # the dividing folds still may.
        tries = [choose(target, True)]
        dividing = choose(target, False)
        if dividing != tries[0]:
            tries.append(dividing)
        for folds in tries:
            if folds is None:
                continue
            try:
                est = estimate(model, folds, board, weight_memories)
            except (ValueError, TypeError):
                continue
            last_problems = est.over_budget(routing_share)
            if target_fps is not None and est.cycles_per_image > target:
                last_problems.append(f"a stage besides the dense layers takes {est.cycles_per_image} cycles per image")
            if not last_problems:
                return est
    # A resource whose own smallest folding (each layer at the fold using least of it) still
    # exceeds the board is what no folding can fix: name those first, not the balanced cheapest.
    unfixable = []
    for key in RESOURCE_NAMES:
        least = [min(rows, key=lambda row: (row.used[key], row.cycles)).fold for rows in costed]
        unfixable += estimate(model, least, board, weight_memories).over_budget(keys=(key,))
    if unfixable:
        raise NoFoldingFits(f"no folding fits {board.name}: these exceed it even at the folding that needs "
                            f"least of each: " + "; ".join(unfixable)
                            + ". Use a larger board or a smaller network", unfixable)
    if target_fps is not None:
        fastest = auto_folds_placed(model, board, routing_share, weight_memories=weight_memories)
        raise NoFoldingFits(f"{target_fps:g} images/s on {board.name} needs an interval of {targets[0]} cycles at "
                            f"{clock_hz / 1e6:g} MHz, and no folding that fast fits: "
                            + "; ".join(last_problems) + f". The fastest that fits "
                            f"({','.join(map(str, fastest.folds))}) makes {clock_hz / fastest.cycles_per_image:,.0f} "
                            "images/s", last_problems)
    cheapest = [rows[0].fold for rows in costed]
    problems = estimate(model, cheapest, board, weight_memories).over_budget() or last_problems
    raise NoFoldingFits(f"no folding fits {board.name}; even the cheapest ({','.join(map(str, cheapest))}) "
                        f"needs more than the board has: " + "; ".join(problems), problems)
