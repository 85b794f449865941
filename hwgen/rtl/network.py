"""The network top: folded layers chained by streams, AXI-Stream-style ports, Verilog output."""
from __future__ import annotations

from typing import NamedTuple, Sequence

from amaranth.back import verilog
from amaranth.hdl import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal, Shape, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..errors import UserError
from ..ir import Conv2dLayer, IntegerModel, MaxPool2dLayer
from .arith import divisors
from .dense import DEFAULT_TREE_LEVELS, WEIGHT_MEMORIES, FoldedDense, spram_load_words
from .multithreshold import MultiThreshold
from .pool import MaxPool
from .requant import Requantizer
from .resize import StreamResizer
from .scores import ScoreSerializer
from .slice import RegisterSlice
from .window import SlidingWindow

__all__ = ["Fold", "NetworkTop", "parse_folds", "default_folds", "simd_choices", "counts_chain", "incoming_elements",
           "generate_verilog", "TOP_NAME"]

TOP_NAME = "hwgen_network"
#: Output kinds whose accumulators a stage of their own turns into the next layer's elements.
CONVERTED_OUTPUTS = {"requant": Requantizer, "multithreshold": MultiThreshold}


class Fold(NamedTuple):
    """Parallelism of one layer: PE output channels and SIMD inputs per cycle."""

    pe: int
    simd: int

    def __str__(self) -> str:
        return f"{self.pe}x{self.simd}"


def compute_layers(model: IntegerModel) -> list:
    """The layers that take a fold (dense and convolution); pooling has none."""
    return [layer for layer in model.layers if not isinstance(layer, MaxPool2dLayer)]


def parse_folds(text: str, model: IntegerModel) -> list[Fold]:
    """Parse ``"PExSIMD,PExSIMD,…"`` (one per dense or conv layer) or ``"default"``."""
    if text in ("", "default"):
        return default_folds(model)
    folds = []
    for index, item in enumerate(text.split(",")):
        pe, sep, simd = item.strip().lower().partition("x")
        if not sep or not pe.isdigit() or not simd.isdigit() or int(pe) < 1 or int(simd) < 1:
            raise UserError(f"--fold item {index + 1} is {item!r}; write PExSIMD, e.g. 16x32")
        folds.append(Fold(int(pe), int(simd)))
    layers = compute_layers(model)
    if len(folds) != len(layers):
        raise UserError(f"--fold gives {len(folds)} folds, the model has {len(layers)} dense/conv layers "
                        f"({', '.join(layer.name for layer in layers)})")
    return folds


def counts_chain(a: int, b: int) -> bool:
    """Whether beats of ``a`` elements regroup into beats of ``b`` (:class:`StreamResizer`): one
    count divides the other."""
    return a % b == 0 or b % a == 0


def simd_choices(in_features: int, incoming: int | None) -> list[int]:
    """The SIMD values a dense layer of ``in_features`` inputs can take after a stage that emits
    ``incoming`` elements per beat (None: the network's input, whose beats must divide the
    image): the divisors of ``incoming`` and its multiples up to ``in_features``, which need not
    divide it (the last beat is padded, see :class:`~hwgen.rtl.dense.FoldedDense`)."""
    if incoming is None:
        return divisors(in_features)
    return [simd for simd in range(1, in_features + 1) if counts_chain(simd, incoming)]


def incoming_elements(model: IntegerModel, index: int, folds: Sequence[Fold]) -> int | None:
    """Elements per beat that reach compute layer ``index`` (of :func:`compute_layers`) when the
    layers before it take ``folds``: None for a dense first layer (the network's input), a
    convolution's or a pool's channels, 1 after a requantizer or multi-threshold stage (whose
    lanes follow the next layer's SIMD, see :func:`requantizer_lanes`), else the previous layer's PE."""
    layer = compute_layers(model)[index]
    if isinstance(layer, Conv2dLayer):
        return layer.in_shape[2]
    position = next(k for k, candidate in enumerate(model.layers) if candidate is layer)
    if position == 0:
        return None
    previous = model.layers[position - 1]
    if isinstance(previous, MaxPool2dLayer):
        return previous.in_shape[2]
    if previous.output_kind in CONVERTED_OUTPUTS:
        return 1
    return folds[index - 1].pe


def default_folds(model: IntegerModel, max_pe: int = 16, max_simd: int = 32) -> list[Fold]:
    """Largest PE/SIMD up to the limits that divide the layer and chain without a gearbox gap.

    A layer's SIMD must divide, or be a multiple of, the elements per beat it receives (the
    previous layer's PE, one after a requantizer, a pixel's channels for a convolution; see
    :class:`StreamResizer`). That count itself always qualifies, so a choice always exists.
    """
    folds: list[Fold] = []
    incoming = None
    for layer in model.layers:
        if isinstance(layer, MaxPool2dLayer):
            incoming = layer.in_shape[2]
            continue
        dense = layer.dense if isinstance(layer, Conv2dLayer) else layer
        receives = layer.in_shape[2] if isinstance(layer, Conv2dLayer) else incoming
        choices = [d for d in divisors(dense.in_features) if d <= max_simd]
        if receives is not None:
            choices = [d for d in choices if counts_chain(d, receives)] or [receives]
        pe = max(d for d in divisors(dense.out_features) if d <= max_pe)
        folds.append(Fold(pe, max(choices)))
        incoming = 1 if layer.output_kind in CONVERTED_OUTPUTS else pe
    return folds


def requantizer_lanes(out_features: int, vectors: int, pe: int, bound: int, receives: int | None) -> int:
    """Lanes for a layer's requantizer: the fewest (each costs a multiplier) that keep it within
    ``bound`` cycles per image (its dense layer's, or the sliding window's if that is slower) and
    whose output beats the next stage can take (``receives`` elements per beat, None: any); 1
    always qualifies."""
    for lanes in divisors(pe):
        if out_features * vectors <= bound * lanes and (receives is None or counts_chain(lanes, receives)):
            return lanes
    return 1


def _receives(model: IntegerModel, index: int, folds: list[Fold]) -> int | None:
    """Elements per beat the layer after ``model.layers[index]`` regroups its input to: a pooling or
    convolution layer's channels, a dense layer's SIMD; None after the last layer."""
    if index + 1 >= len(model.layers):
        return None
    following = model.layers[index + 1]
    if isinstance(following, (MaxPool2dLayer, Conv2dLayer)):
        return following.in_shape[2]
    position = compute_layers(model).index(following)
    return folds[position].simd


class NetworkTop(wiring.Component):
    """The whole network as one streaming component with AXI-Stream-style ports.

    Input: ``s_axis_tdata`` carries the first stage's beat: SIMD elements of a dense first layer,
    or one pixel (its channels) for a convolutional first layer; uint8 pixels are bytes, element
    ``k`` in bits ``[8k, 8k + 8)``, in raster order with channels innermost. Images are framed by
    count; ``s_axis_tlast`` is accepted for drop-in compatibility and not checked.
    Output: per image, one 32-bit word per class score, then the class index with
    ``m_axis_tlast`` set.

    A convolution becomes a :class:`SlidingWindow`, a regrouping to SIMD, and a
    :class:`FoldedDense` run once per output pixel; max-pooling a :class:`MaxPool`.

    Parameters
    ----------
    model : :class:`hwgen.ir.IntegerModel`
    folds : sequence of :class:`Fold`
        One per dense or convolution layer.
    probes : bool
        Also bring out each hidden layer's output stream, for debugging: ``probe_<layer>_data``
        (that layer's last stage's payload) and ``probe_<layer>_valid`` (high on each transfer).
        The network logic is unchanged.
    tree_levels : int
        Adder levels between pipeline registers in every layer's lanes (:func:`tree_levels_for`
        picks it for an FPGA family).
    weight_memories : sequence of str, optional
        Per dense or convolution layer, where its weights live (``"rom"`` or ``"spram"``, see
        :class:`FoldedDense`); default all ``"rom"``. With any ``"spram"`` layer the top has the
        ports ``load_valid`` and ``load_data`` (16 bits): the words of :func:`spram_load_image`, one
        per ``load_valid`` cycle, in order, ending at least two cycles before the first image (they
        are registered on the way in).
    banked_weights : bool
        Bank every layer's deep weight ROM (see :class:`FoldedDense`); :func:`~.dense.pipelining_for`
        gives it, with ``tree_levels``, for an FPGA family.
    carried_products : bool
        A second register after every multiplying lane's products (see :class:`FoldedDense`).
    register_slices : bool
        A :class:`~.slice.RegisterSlice` after each convolution or requantizer, before each
        sliding window but the first and between each such window and its convolution's lanes,
        and between a max-pool and a dense layer, ending the ready chains between those stages.
    """

    def __init__(self, model: IntegerModel, folds: Sequence[Fold], *, probes: bool = False,
                 tree_levels: int = DEFAULT_TREE_LEVELS, weight_memories: Sequence[str] | None = None,
                 banked_weights: bool = False, carried_products: bool = False, register_slices: bool = False):
        layers = compute_layers(model)
        if len(folds) != len(layers):
            raise ValueError(f"{len(folds)} folds for {len(layers)} dense/conv layers")
        weight_memories = list(weight_memories) if weight_memories is not None else ["rom"] * len(layers)
        if len(weight_memories) != len(layers) or any(memory not in WEIGHT_MEMORIES for memory in weight_memories):
            raise ValueError(f"weight_memories must give one of {', '.join(WEIGHT_MEMORIES)} for each of the "
                             f"{len(layers)} dense/conv layers, not {weight_memories!r}")
        self._weight_memories = weight_memories
        memory_iter = iter(weight_memories)
        self._model = model
        self._folds = [Fold(*fold) for fold in folds]
        self._spatial = len(layers) != len(model.layers) or any(isinstance(l, Conv2dLayer) for l in layers)
        stages: list[wiring.Component] = []
        stage_layers: list[str] = []      # the layer each stage belongs to
        incoming = None          # elements per beat the previous stage emits (None: s_axis, any)
        fold_iter = iter(self._folds)

        def regroup(layer_name: str, bits: int, to: int, elements: int, what: str) -> None:
            if incoming is None or incoming == to:
                return
            if not counts_chain(incoming, to):
                raise ValueError(f"layer {layer_name!r}: {what} {to} must divide or be a multiple of the "
                                 f"{incoming} elements per beat the previous stage emits")
            stages.append(StreamResizer(bits, incoming, to, elements))

        def sliced(elements: int) -> None:
            # Stream stages (a window, a layer's output reservation, a requantizer, resizers, a
            # pool) pass ready back combinationally; a slice ends that chain. A layer's input
            # buffer ends it too, so a network of dense layers without requantizers needs none.
            if register_slices:
                stages.append(RegisterSlice(Shape.cast(stages[-1].o.payload.shape()).width, elements // incoming))

        for layer_index, layer in enumerate(model.layers):
            if isinstance(layer, MaxPool2dLayer):
                channels = layer.in_shape[2]
                regroup(layer.name, layer.input_bits, channels, layer.in_features, "its channel count")
                stages.append(MaxPool(layer.in_shape, layer.kernel, layer.input_kind))
                incoming = channels
            else:
                fold = next(fold_iter)
                if isinstance(layer, Conv2dLayer):
                    dense, vectors = layer.dense, layer.out_shape[0] * layer.out_shape[1]
                    compute = FoldedDense(dense, pe=fold.pe, simd=fold.simd, vectors=vectors,
                                          tree_levels=tree_levels, weight_memory=next(memory_iter),
                                          banked_weights=banked_weights, carried_products=carried_products)
                    channels = layer.in_shape[2]
                    regroup(layer.name, layer.input_bits, channels, layer.in_features, "its channel count")
                    window = SlidingWindow(layer.in_shape, layer.kernel, layer.stride, layer.padding, layer.input_bits)
                    after_another_stage = bool(stages)
                    if after_another_stage:
                        sliced(layer.in_features)
                    stages.append(window)
                    incoming = channels
                    if not counts_chain(channels, fold.simd):
                        raise ValueError(
                            f"layer {layer.name!r}: SIMD={fold.simd} must divide or be a multiple of its {channels} "
                            f"input channels; valid SIMD values: "
                            f"{[d for d in divisors(dense.in_features) if counts_chain(d, channels)]}")
                    regroup(layer.name, layer.input_bits, fold.simd, dense.in_features * vectors, "SIMD")
                    if after_another_stage:
                        # The ready chain from this layer's input buffer back through its resizer
                        # into the sliding window's read logic was the iCE40 CNN's critical path
                        # (38.5 MHz, 19.7 ns of routing over six LUTs). Not in a first layer: there
                        # the window reads the board top's pixel slice, and on the iCEBreaker the
                        # CNN's first convolution at 4x1 would no longer fit.
                        incoming = fold.simd
                        sliced(dense.in_features * vectors)
                else:
                    dense, vectors = layer, 1
                    compute = FoldedDense(dense, pe=fold.pe, simd=fold.simd, tree_levels=tree_levels,
                                          weight_memory=next(memory_iter), banked_weights=banked_weights,
                                          carried_products=carried_products)
                    if stages and isinstance(stages[-1], MaxPool):
                        # The ready chain from this layer's input buffer back through its
                        # resizer and the pool was the iCE40 CNN's critical path.
                        sliced(layer.in_features)
                    if incoming is None and compute.padding:
                        raise ValueError(
                            f"layer {layer.name!r}: SIMD={fold.simd} does not divide in_features={layer.in_features}, "
                            f"as the first layer's SIMD must (the input stream carries whole beats); valid SIMD "
                            f"values: {divisors(layer.in_features)}")
                    if incoming is not None and not counts_chain(incoming, fold.simd):
                        raise ValueError(
                            f"layer {layer.name!r}: SIMD={fold.simd} must divide or be a multiple of the "
                            f"{incoming} elements per beat the previous stage emits; valid SIMD values: "
                            f"{simd_choices(layer.in_features, incoming)}")
                    regroup(layer.name, layer.input_bits, fold.simd, layer.in_features, "SIMD")
                stages.append(compute)
                incoming = fold.pe
                if layer.output_kind in CONVERTED_OUTPUTS:
                    # A requantizer emitting one element per cycle would set the interval where
                    # PE channels arrive faster (a convolution over few input channels).
                    bound = max(compute.cycles_per_image, window.cycles_per_image if vectors > 1 else 0)
                    lanes = requantizer_lanes(dense.out_features, vectors, fold.pe, bound,
                                              _receives(model, layer_index, self._folds))
                    stages.append(CONVERTED_OUTPUTS[layer.output_kind](dense, fold.pe, vectors, lanes=lanes))
                    incoming = lanes
                if vectors > 1 or layer.output_kind in CONVERTED_OUTPUTS:
                    sliced(layer.out_features)
            stage_layers += [layer.name] * (len(stages) - len(stage_layers))
        last = model.layers[-1]
        stages.append(ScoreSerializer(last.out_features, last.output_bits, self._folds[-1].pe))
        stage_layers.append(last.name)
        self._stages = stages
        self._stage_layers = stage_layers
        # A hidden layer's output is the stream leaving its last stage.
        self._probe_stages = {layer.name: max(i for i, name in enumerate(stage_layers) if name == layer.name)
                              for layer in model.layers[:-1]} if probes else {}
        first = stages[0]
        probe_ports = {}
        for name, index in self._probe_stages.items():
            probe_ports[f"probe_{name}_data"] = Out(len(stages[index].o.payload))
            probe_ports[f"probe_{name}_valid"] = Out(1)
        load_ports = {"load_valid": In(1), "load_data": In(16)} if self.load_words else {}
        super().__init__({
            **probe_ports,
            **load_ports,
            "s_axis_tdata": In(len(first.i.payload)),
            "s_axis_tvalid": In(1),
            "s_axis_tready": Out(1),
            "s_axis_tlast": In(1),
            "m_axis_tdata": Out(32),
            "m_axis_tvalid": Out(1),
            "m_axis_tready": In(1),
            "m_axis_tlast": Out(1),
        })

    @property
    def folds(self) -> list[Fold]:
        return list(self._folds)

    @property
    def stages(self) -> list[wiring.Component]:
        return list(self._stages)

    @property
    def stage_layers(self) -> list[str]:
        """The name of the layer each stage belongs to (a window and resizers go with their layer)."""
        return list(self._stage_layers)

    @property
    def probed_layers(self) -> list[str]:
        """Layers whose output streams are ports (``probes=True``), in network order."""
        return list(self._probe_stages)

    @property
    def compute_stages(self) -> list[FoldedDense]:
        return [stage for stage in self._stages if isinstance(stage, FoldedDense)]

    @property
    def weight_memories(self) -> list[str]:
        """Where each dense or convolution layer's weights live (``"rom"`` or ``"spram"``)."""
        return list(self._weight_memories)

    @property
    def spram_stages(self) -> list[FoldedDense]:
        """The layers whose weights are loaded into SPRAM, in load order."""
        return [stage for stage in self.compute_stages if stage.weight_memory == "spram"]

    @property
    def load_words(self) -> int:
        """16-bit words the SPRAM weight memories take at power-up (0: none)."""
        return sum(stage.load_words for stage in self.spram_stages)

    @property
    def input_elements_per_beat(self) -> int:
        """Input elements (pixels' channel values or bits) per ``s_axis`` beat."""
        first = self._model.layers[0]
        return len(self._stages[0].i.payload) // first.input_bits

    @property
    def input_beats(self) -> int:
        """``s_axis`` beats per image."""
        return self._model.in_features // self.input_elements_per_beat

    @property
    def output_words(self) -> int:
        """``m_axis`` words per image: the scores and the class index."""
        return self._model.classes + 1

    @property
    def cycles_per_image(self) -> int:
        """Initiation interval: the slowest stage's cycles per image."""
        return max(stage.cycles_per_image for stage in self._stages)

    @property
    def latency(self) -> int | None:
        """Cycles from an image's first input transfer to its last output transfer, idle and unstalled.

        The sum of the stages' own latencies; exact when :attr:`latency_is_exact`, otherwise a
        lower bound (a stage then waits on its successor). ``None`` for networks with convolution
        or pooling, whose stages overlap within an image, so no stage sum describes them.
        """
        if self._spatial:
            return None
        return self.input_beats - 1 + sum(stage.latency for stage in self._stages)

    @property
    def latency_is_exact(self) -> bool:
        """Whether no stage ever waits on its successor for the first image.

        A layer emits one output beat every ``N_in / SIMD`` cycles; only a splitting resizer or
        the serializer accepts more slowly than one beat per cycle, so each of those must not be
        fed several beats faster than it accepts them.
        """
        return not self._spatial and all(producer.output_beats == 1 or producer.input_beats >= consumer.accept_interval
                   for producer, consumer in zip(self._stages, self._stages[1:])
                   if isinstance(producer, FoldedDense))

    def elaborate(self, platform):
        m = Module()
        # Each stage resets from a register of its own, so the network's reset reaches a few
        # flip-flops, not every stage's control registers across the device (routed as one net,
        # it was a critical path on ECP5; promoted to a global, it failed to route in a 39k-LUT
        # design). Every copy is one register deep, so all stages leave reset on the same cycle.
        held = []
        for index, stage in enumerate(self._stages):
            domain = f"stage{index}"
            m.domains += ClockDomain(domain, local=True)
            stage_reset = Signal(init=1, name=f"{domain}_reset")
            m.d.sync += stage_reset.eq(ResetSignal())
            m.d.comb += [ClockSignal(domain).eq(ClockSignal()), ResetSignal(domain).eq(stage_reset)]
            m.submodules[domain] = DomainRenamer(domain)(stage)
            held.append(stage_reset)
        for upstream, downstream in zip(self._stages, self._stages[1:]):
            wiring.connect(m, upstream.o, downstream.i)
        first, last = self._stages[0], self._stages[-1]
        m.d.comb += [
            first.i.payload.eq(self.s_axis_tdata),
            first.i.valid.eq(self.s_axis_tvalid),
            # A beat offered in the cycle after reset would reach a stage still held in reset.
            self.s_axis_tready.eq(first.i.ready & ~held[0]),
            self.m_axis_tdata.eq(last.o.payload.data),
            self.m_axis_tlast.eq(last.o.payload.last),
            self.m_axis_tvalid.eq(last.o.valid),
            last.o.ready.eq(self.m_axis_tready),
        ]
        self._elaborate_load(m)
        for name, index in self._probe_stages.items():
            out = self._stages[index].o
            m.d.comb += [getattr(self, f"probe_{name}_data").eq(out.payload),
                         getattr(self, f"probe_{name}_valid").eq(out.valid & out.ready)]
        return m

    def _elaborate_load(self, m: Module) -> None:
        """Steer the load words to the SPRAM layers: each takes its rows, column by column, in turn."""
        stages = self.spram_stages
        if not stages:
            return
        # The words are registered on the way in: the loader's own logic and the blocks' address
        # multiplexers were one path (the critical path of a CNN on the iCE40UP5K).
        load_valid = Signal()
        load_data = Signal.like(self.load_data)
        m.d.sync += [load_valid.eq(self.load_valid), load_data.eq(self.load_data)]
        current = Signal(range(len(stages) + 1))
        row = Signal(range(max(stage.weight_depth for stage in stages)))
        column = Signal(range(max(stage.load_columns for stage in stages)))
        for index, stage in enumerate(stages):
            columns = stage.load_columns
            m.d.comb += [stage.load_valid.eq(load_valid & (current == index)), stage.load_row.eq(row),
                         stage.load_column.eq(column), stage.load_data.eq(load_data)]
            with m.If(load_valid & (current == index)):
                with m.If(column == columns - 1):
                    m.d.sync += column.eq(0)
                    with m.If(row == stage.weight_depth - 1):
                        m.d.sync += [row.eq(0), current.eq(index + 1)]
                    with m.Else():
                        m.d.sync += row.eq(row + 1)
                with m.Else():
                    m.d.sync += column.eq(column + 1)


def spram_load_image(top: NetworkTop) -> list[int]:
    """The 16-bit words ``top``'s ``load_data`` takes: each SPRAM layer's :func:`spram_load_words`,
    in network order."""
    return [word for stage in top.spram_stages for word in spram_load_words(stage.layer, stage.pe, stage.simd)]


def build_top(model: IntegerModel, folds: Sequence[Fold], *, probes: bool = False,
              tree_levels: int = DEFAULT_TREE_LEVELS, weight_memories: Sequence[str] | None = None,
              banked_weights: bool = False, carried_products: bool = False,
              register_slices: bool = False) -> NetworkTop:
    """Construct the top, turning a fold that does not fit the model into a :class:`UserError`."""
    try:
        return NetworkTop(model, folds, probes=probes, tree_levels=tree_levels, weight_memories=weight_memories,
                          banked_weights=banked_weights, carried_products=carried_products,
                          register_slices=register_slices)
    except (ValueError, TypeError) as error:
        raise UserError(f"--fold {','.join(map(str, folds))}: {error}") from None


def generate_verilog(top: NetworkTop, name: str = TOP_NAME) -> str:
    """Verilog for the top; byte-identical across runs (no source locations)."""
    return verilog.convert(top, name=name, emit_src=False, strip_internal_attrs=True)
