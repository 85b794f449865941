"""RTL against the golden model: every output word of every image, plus measured cycles."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hwgen import golden
from hwgen.ir import IntegerModel, MaxPool2dLayer
from hwgen.rtl.dense import pipelining_for
from hwgen.rtl.network import TOP_NAME, Fold, NetworkTop, build_top, generate_verilog

from .runner import VerilatorDesign

BENCH_MODULE = "sim.stream_bench"


@dataclass(frozen=True)
class Mismatch:
    """One output that differs: which image, which layer (or ``argmax``), which index, both values."""

    image: int
    layer: str
    index: int
    expected: int
    got: int | None   # None: the RTL produced no value there

    def __str__(self) -> str:
        got = "produced no value" if self.got is None else self.got
        return (f"image {self.image}, layer {self.layer}, index {self.index}: "
                f"golden {self.expected}, RTL {got}")


@dataclass
class SimRun:
    """What one simulation run measured."""

    images: int
    mismatches: list[Mismatch]
    protocol_errors: list[str]
    cycles: int
    latency: int
    intervals: list[int]
    wall_seconds: float
    probe_beats: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.protocol_errors


@dataclass
class VerifyReport:
    """A stalled correctness run and an unstalled timing run, beside the folding formulas."""

    checked: SimRun
    timing: SimRun
    ii_formula: int
    latency_formula: int | None
    latency_exact: bool
    folds: list[Fold] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked.ok and self.timing.ok

    @property
    def ii_measured(self) -> int | None:
        """Steady-state interval between consecutive images' last outputs (the last one measured)."""
        return self.timing.intervals[-1] if self.timing.intervals else None

    def summary(self) -> str:
        c = self.checked
        lines = [
            f"RTL vs golden: {c.images - len({m.image for m in c.mismatches})}/{c.images} images bit-exact "
            f"(every score and class word; random stalls on both stream ends)",
            f"cycles per image (II): measured {self.ii_measured}, formula {self.ii_formula} "
            f"(folds {', '.join(map(str, self.folds))})",
            f"latency (first input to last output): measured {self.timing.latency}, formula "
            + (f"{self.latency_formula}{'' if self.latency_exact else ' (a lower bound for these folds)'}"
               if self.latency_formula is not None else "n/a (convolution stages overlap within an image)"),
            f"simulated {c.cycles} cycles in {c.wall_seconds:.1f} s "
            f"({c.cycles / max(c.wall_seconds, 1e-9):,.0f} cycles/s)",
        ]
        lines += [f"MISMATCH {m}" for m in c.mismatches[:20]]
        lines += [f"PROTOCOL {e}" for e in (c.protocol_errors + self.timing.protocol_errors)[:20]]
        return "\n".join(lines)


def image_beats(top: NetworkTop, images: np.ndarray) -> np.ndarray:
    """``s_axis`` beats for uint8 images: ``(images, beats, bytes)``, little-endian element order.

    Images are flattened in raster order with channels innermost, the order the stream carries.
    """
    x = images.reshape(len(images), top.input_beats, top.input_elements_per_beat)
    return np.ascontiguousarray(x, dtype=np.uint8)


def expected_words(result: golden.GoldenResult) -> np.ndarray:
    """Golden ``m_axis`` words per image: the scores, then the class index."""
    return np.concatenate([result.scores, result.classes[:, None]], axis=1)


def decode_words(words: list[list[int]]) -> np.ndarray:
    """32-bit two's-complement words to signed integers."""
    raw = np.array(words, dtype=np.int64).reshape(len(words), -1)
    return np.where(raw >= 1 << 31, raw - (1 << 32), raw)


def cycle_budget(top: NetworkTop, images: int, stall_in: float = 0.0, stall_out: float = 0.0) -> int:
    """Cycles after which a run of ``images`` counts as hung: four times a generous estimate
    (each image through every stage one after another, slowed by the stall probabilities)."""
    slack = 1.0 / max(1e-3, (1 - stall_in) * (1 - stall_out))
    per_image = top.cycles_per_image + sum(stage.cycles_per_image for stage in top.stages)
    return int(images * per_image * slack * 4) + 1000


def compare(model: IntegerModel, expected: np.ndarray, got: np.ndarray, first_image: int = 0) -> list[Mismatch]:
    """Every differing word, named by image, layer and index."""
    mismatches = []
    classes = model.classes
    for image, index in zip(*np.nonzero(expected != got)):
        layer = model.layers[-1].name if index < classes else "argmax"
        mismatches.append(Mismatch(first_image + int(image), layer, int(index) if index < classes else 0,
                                   int(expected[image, index]), int(got[image, index])))
    return mismatches


def probe_elements(beats: list[int], beat_bits: int, element_bits: int) -> np.ndarray:
    """Unpack stream beats into their elements (element 0 in the low bits of each beat)."""
    per_beat = beat_bits // element_bits
    mask = (1 << element_bits) - 1
    return np.array([(beat >> (k * element_bits)) & mask for beat in beats for k in range(per_beat)], np.int64)


def hidden_mismatches(model: IntegerModel, top: NetworkTop, probe_beats: dict[str, list[int]],
                      result: golden.GoldenResult, first_image: int = 0) -> list[Mismatch]:
    """Every hidden layer's probed output (a top built with ``probes=True``) against golden, in
    network order: each differing element by image, layer and index, and a missing tail as one
    mismatch whose RTL value is None. Values compare as the stream carries them (two's complement
    in the layer's output width)."""
    mismatches = []
    for index, layer in enumerate(model.layers[:-1]):
        bits = layer.input_bits if isinstance(layer, MaxPool2dLayer) else layer.output_bits
        beat_bits = len(getattr(top, f"probe_{layer.name}_data"))
        want = result.outputs[index] & ((1 << bits) - 1)
        got = probe_elements(probe_beats[layer.name], beat_bits, bits)[:want.size]
        flat = want.reshape(-1)
        for position in np.nonzero(got != flat[:len(got)])[0]:
            image, element = divmod(int(position), layer.out_features)
            mismatches.append(Mismatch(first_image + image, layer.name, element, int(flat[position]),
                                       int(got[position])))
        if len(got) < flat.size:
            image, element = divmod(len(got), layer.out_features)
            mismatches.append(Mismatch(first_image + image, layer.name, element, int(flat[len(got)]), None))
    return mismatches


class NetworkSimulator:
    """One built simulator of a network top; runs any number of image batches against golden.

    Parameters
    ----------
    model : :class:`hwgen.ir.IntegerModel`
    folds : list of :class:`Fold`
    build_dir : path
        Verilator build folder (reused while the Verilog is unchanged).
    waves : bool
        Dump a VCD waveform of every run (``run<N>/dump.vcd`` under ``build_dir``).
    probes : bool
        Build the top with probe ports and record every hidden layer's output beats.
    family : str, optional
        Build the layers as for this FPGA family (:func:`~hwgen.rtl.dense.pipelining_for`: its
        adder-tree stages and weight banks), as ``hwgen build`` does; default the generic top.
    """

    def __init__(self, model: IntegerModel, folds: list[Fold], build_dir: Path | str, *, waves: bool = False,
                 probes: bool = False, family: str | None = None):
        self.model = model
        self.top = build_top(model, folds, probes=probes, **(pipelining_for(family) if family else {}))
        self.build_dir = Path(build_dir).resolve()
        self.design = VerilatorDesign(generate_verilog(self.top), TOP_NAME, self.build_dir / "verilator",
                                      waves=waves).build()
        self._runs = 0

    def run(self, images: np.ndarray, *, stall_in: float = 0.0, stall_out: float = 0.0, seed: int = 0,
            first_image: int = 0, reference: IntegerModel | None = None) -> SimRun:
        """Stream ``images`` through the RTL and compare every output word with the golden model
        (of ``reference``, by default the model the RTL was built from); with probes, every hidden
        layer's output element as well (listed first, in network order)."""
        images = images.reshape(len(images), -1)
        result = golden.run(reference or self.model, images)
        expected = expected_words(result)
        self.last_run_dir = run_dir = self.build_dir / f"run{self._runs}"
        self._runs += 1
        run_dir.mkdir(parents=True, exist_ok=True)
        beats_path = run_dir / "beats.npy"
        np.save(beats_path, image_beats(self.top, images), allow_pickle=False)
        budget = cycle_budget(self.top, len(images) + 2, stall_in, stall_out)
        config = {"beats": str(beats_path), "words_per_image": self.top.output_words,
                  "stall_in": stall_in, "stall_out": stall_out, "seed": seed, "max_cycles": budget,
                  "probes": self.top.probed_layers,
                  "drain_cycles": cycle_budget(self.top, 1, stall_in, stall_out) if self.top.probed_layers else 0}
        start = time.perf_counter()
        results = self.design.run(BENCH_MODULE, config, run_dir)
        wall = time.perf_counter() - start
        errors = list(results["errors"])
        if results["hung"]:
            errors.append(f"the design stopped producing output after {len(results['words'])} of "
                          f"{len(images)} images ({results['cycles']} cycles)")
        got = decode_words(results["words"]) if results["words"] else np.zeros((0, expected.shape[1]), np.int64)
        mismatches = compare(self.model, expected[:len(got)], got, first_image)
        if self.top.probed_layers:
            mismatches = hidden_mismatches(reference or self.model, self.top, results["probes"], result,
                                           first_image) + mismatches
        out_last = results["out_last"]
        intervals = [b - a for a, b in zip(out_last, out_last[1:]) if a is not None and b is not None]
        latency = out_last[0] - results["in_first"][0] if out_last and out_last[0] is not None else -1
        return SimRun(len(images), mismatches, errors, results["cycles"], latency, intervals, wall,
                      results["probes"])

    def verify(self, images: np.ndarray, *, stall: float = 0.25, seed: int = 0,
               timing_images: int = 8) -> VerifyReport:
        """A stalled run over all ``images`` and an unstalled timing run over the first few."""
        checked = self.run(images, stall_in=stall, stall_out=stall, seed=seed)
        timing = self.run(images[:max(2, min(timing_images, len(images)))])
        return VerifyReport(checked, timing, self.top.cycles_per_image, self.top.latency,
                            self.top.latency_is_exact, self.top.folds)
