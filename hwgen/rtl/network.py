"""The network top: folded layers chained by streams, AXI-Stream-style ports, Verilog output."""
from __future__ import annotations

from typing import NamedTuple, Sequence

from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..errors import UserError
from ..ir import IntegerModel
from .arith import divisors
from .dense import FoldedDense
from .requant import Requantizer
from .resize import StreamResizer
from .scores import ScoreSerializer

__all__ = ["Fold", "NetworkTop", "parse_folds", "default_folds", "generate_verilog", "TOP_NAME"]

TOP_NAME = "hwgen_network"


class Fold(NamedTuple):
    """Parallelism of one layer: PE output channels and SIMD inputs per cycle."""

    pe: int
    simd: int

    def __str__(self) -> str:
        return f"{self.pe}x{self.simd}"


def parse_folds(text: str, model: IntegerModel) -> list[Fold]:
    """Parse ``"PExSIMD,PExSIMD,…"`` (one per layer) or ``"default"``."""
    if text in ("", "default"):
        return default_folds(model)
    folds = []
    for index, item in enumerate(text.split(",")):
        pe, sep, simd = item.strip().lower().partition("x")
        if not sep or not pe.isdigit() or not simd.isdigit() or int(pe) < 1 or int(simd) < 1:
            raise UserError(f"--fold item {index + 1} is {item!r}; write PExSIMD, e.g. 16x32")
        folds.append(Fold(int(pe), int(simd)))
    if len(folds) != len(model.layers):
        raise UserError(f"--fold gives {len(folds)} folds, the model has {len(model.layers)} layers "
                        f"({', '.join(layer.name for layer in model.layers)})")
    return folds


def default_folds(model: IntegerModel, max_pe: int = 16, max_simd: int = 32) -> list[Fold]:
    """Largest PE/SIMD up to the limits that divide the layer and chain without a gearbox gap.

    A layer's SIMD must divide, or be a multiple of, the previous layer's PE (see
    :class:`StreamResizer`); the previous PE itself always qualifies, so a choice always exists.
    After a requantizing layer, elements arrive one per beat and every SIMD qualifies.
    """
    folds: list[Fold] = []
    for index, layer in enumerate(model.layers):
        simd_choices = [d for d in divisors(layer.in_features) if d <= max_simd]
        if folds and model.layers[index - 1].output_kind != "requant":
            prev = folds[-1].pe
            simd_choices = [d for d in simd_choices if d % prev == 0 or prev % d == 0] or [prev]
        pe = max(d for d in divisors(layer.out_features) if d <= max_pe)
        folds.append(Fold(pe, max(simd_choices)))
    return folds


class NetworkTop(wiring.Component):
    """The whole network as one streaming component with AXI-Stream-style ports.

    Input: ``s_axis_tdata`` carries SIMD elements of the first layer per beat (uint8 pixels,
    element ``k`` in bits ``[8k, 8k + 8)``); an image is ``N_in / SIMD`` beats. Images are framed
    by count; ``s_axis_tlast`` is accepted for drop-in compatibility and not checked.
    Output: per image, one 32-bit word per class score, then the class index with
    ``m_axis_tlast`` set.

    Parameters
    ----------
    model : :class:`hwgen.ir.IntegerModel`
    folds : sequence of :class:`Fold`
        One per layer.
    """

    def __init__(self, model: IntegerModel, folds: Sequence[Fold]):
        if len(folds) != len(model.layers):
            raise ValueError(f"{len(folds)} folds for {len(model.layers)} layers")
        self._model = model
        self._folds = [Fold(*fold) for fold in folds]
        stages: list[wiring.Component] = []
        incoming = 0       # elements per beat the previous stage emits
        for index, (layer, fold) in enumerate(zip(model.layers, self._folds)):
            compute = FoldedDense(layer, pe=fold.pe, simd=fold.simd)
            if index:
                if incoming % fold.simd and fold.simd % incoming:
                    raise ValueError(
                        f"layer {layer.name!r}: SIMD={fold.simd} must divide or be a multiple of the "
                        f"{incoming} elements per beat the previous layer emits (its PE); valid SIMD values: "
                        f"{[d for d in divisors(layer.in_features) if d % incoming == 0 or incoming % d == 0]}")
                stages.append(StreamResizer(layer.input_bits, incoming, fold.simd, layer.in_features))
            stages.append(compute)
            incoming = fold.pe
            if layer.output_kind == "requant":
                stages.append(Requantizer(layer, fold.pe))
                incoming = 1
        last = model.layers[-1]
        stages.append(ScoreSerializer(last.out_features, last.output_bits, self._folds[-1].pe))
        self._stages = stages
        first = stages[0]
        super().__init__({
            "s_axis_tdata": In(first.simd * first.layer.input_bits),
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
    def layers(self) -> list[FoldedDense]:
        return [stage for stage in self._stages if isinstance(stage, FoldedDense)]

    @property
    def input_beats(self) -> int:
        """``s_axis`` beats per image."""
        return self._stages[0].input_beats

    @property
    def output_words(self) -> int:
        """``m_axis`` words per image: the scores and the class index."""
        return self._model.classes + 1

    @property
    def cycles_per_image(self) -> int:
        """Initiation interval: the slowest stage's cycles per image."""
        return max(stage.cycles_per_image for stage in self._stages)

    @property
    def latency(self) -> int:
        """Cycles from an image's first input transfer to its last output transfer, idle and unstalled.

        The sum of the stages' own latencies; exact when :attr:`latency_is_exact`, otherwise a
        lower bound (a stage then waits on its successor).
        """
        return self.input_beats - 1 + sum(stage.latency for stage in self._stages)

    @property
    def latency_is_exact(self) -> bool:
        """Whether no stage ever waits on its successor for the first image.

        A layer emits one output beat every ``N_in / SIMD`` cycles; only a splitting resizer or
        the serializer accepts more slowly than one beat per cycle, so each of those must not be
        fed several beats faster than it accepts them.
        """
        return all(producer.output_beats == 1 or producer.input_beats >= consumer.accept_interval
                   for producer, consumer in zip(self._stages, self._stages[1:])
                   if isinstance(producer, FoldedDense))

    def elaborate(self, platform):
        m = Module()
        for index, stage in enumerate(self._stages):
            m.submodules[f"stage{index}"] = stage
        for upstream, downstream in zip(self._stages, self._stages[1:]):
            wiring.connect(m, upstream.o, downstream.i)
        first, last = self._stages[0], self._stages[-1]
        m.d.comb += [
            first.i.payload.eq(self.s_axis_tdata),
            first.i.valid.eq(self.s_axis_tvalid),
            self.s_axis_tready.eq(first.i.ready),
            self.m_axis_tdata.eq(last.o.payload.data),
            self.m_axis_tlast.eq(last.o.payload.last),
            self.m_axis_tvalid.eq(last.o.valid),
            last.o.ready.eq(self.m_axis_tready),
        ]
        return m


def build_top(model: IntegerModel, folds: Sequence[Fold]) -> NetworkTop:
    """Construct the top, turning a fold that does not fit the model into a :class:`UserError`."""
    try:
        return NetworkTop(model, folds)
    except (ValueError, TypeError) as error:
        raise UserError(f"--fold {','.join(map(str, folds))}: {error}") from None


def generate_verilog(top: NetworkTop, name: str = TOP_NAME) -> str:
    """Verilog for the top; byte-identical across runs (no source locations)."""
    return verilog.convert(top, name=name, emit_src=False, strip_internal_attrs=True)
