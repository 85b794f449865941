"""Whole test sets through the RTL at Verilator speed: the clock runs inside the simulation.

:class:`BatchSimulator` wraps the network top in ``hwgen_harness`` (``rtl_templates/
stream_harness.v.j2``), builds it once, and runs chunks of images through it in as many
simulator processes as asked; cocotb (``sim.batch_bench``) only moves whole batches of images
and results, so Python is never on the per-clock path.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rtl_templates import render
from hwgen import golden
from hwgen.ir import IntegerModel
from hwgen.rtl.network import TOP_NAME, Fold, NetworkTop, build_top, generate_verilog

from .runner import VerilatorDesign
from .verify import Mismatch, NetworkSimulator, compare, cycle_budget, expected_words, image_beats

BENCH_MODULE = "sim.batch_bench"
HARNESS_NAME = "hwgen_harness"

def harness_verilog(top: NetworkTop, batch: int) -> str:
    """The harness module around ``hwgen_network`` for batches of ``batch`` images."""
    if not 1 <= batch <= 4096:
        raise ValueError(f"batch must be between 1 and 4096 images, not {batch}")
    beat_bits = len(top.s_axis_tdata)
    return render(
        "stream_harness.v.j2", dut=TOP_NAME, batch=batch, beats=top.input_beats, beat_bits=beat_bits, words=top.output_words)


@dataclass
class BatchRun:
    """One simulator process's results: raw output words and cycle stamps."""

    first_image: int
    words: np.ndarray          # (images, words per image), uint32 as simulated
    out_last: np.ndarray       # cycle of each image's last output word
    first_input_cycle: int
    cycles: int
    protocol_errors: int
    hung: bool
    wall_seconds: float


class BatchSimulator:
    """The network top inside the clocked harness, built once; runs any number of image chunks.

    Parameters
    ----------
    model : :class:`hwgen.ir.IntegerModel`
    folds : list of :class:`Fold`
    build_dir : path
        Verilator build folder (reused while the Verilog is unchanged); runs go in subfolders.
    batch : int
        Images the harness takes per transfer; larger batches mean fewer Python wake-ups.
    """

    def __init__(self, model: IntegerModel, folds: list[Fold], build_dir: Path | str, *, batch: int = 64):
        self.model = model
        self.top = build_top(model, folds)
        self.batch = batch
        self.build_dir = Path(build_dir).resolve()
        source = generate_verilog(self.top) + harness_verilog(self.top, batch)
        self.design = VerilatorDesign(source, HARNESS_NAME, self.build_dir / "harness", timing=True).build()

    def run(self, images: np.ndarray, run_dir: Path | str, *, first_image: int = 0,
            stall_in: float = 0.0, stall_out: float = 0.0) -> BatchRun:
        """Stream ``images`` (uint8, one row per image) through the RTL in one simulator process."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        beats_path = run_dir / "beats.npy"
        np.save(beats_path, image_beats(self.top, images.reshape(len(images), -1)), allow_pickle=False)
        config = {"beats": str(beats_path), "batch": self.batch, "words_per_image": self.top.output_words,
                  "stall_in": stall_in, "stall_out": stall_out,
                  "max_cycles": cycle_budget(self.top, len(images) + 2 * self.batch, stall_in, stall_out)}
        start = time.perf_counter()
        results = self.design.run(BENCH_MODULE, config, run_dir)
        wall = time.perf_counter() - start
        words = np.load(results["words"], allow_pickle=False)
        return BatchRun(first_image, words, np.array(results["out_last"], np.int64), results["first_input_cycle"],
                        results["cycles"], results["protocol_errors"], results["hung"], wall)

    def run_split(self, images: np.ndarray, *, jobs: int = 2, chunks: int | None = None,
                  stall_in: float = 0.0, stall_out: float = 0.0,
                  progress: Callable[[int], None] | None = None, address: str | None = None) -> list[BatchRun]:
        """Split ``images`` into chunks and run them in ``jobs`` simulator processes at once, or,
        with a Ray ``address`` (``"local"`` for a Ray on this machine), as Ray tasks.

        ``progress`` is called with each finished chunk's image count. Runs come back in image order.
        """
        images = images.reshape(len(images), -1)
        chunks = max(1, min(len(images), chunks or jobs))
        bounds = np.linspace(0, len(images), chunks + 1).astype(int)
        run_root = self.build_dir / "runs"

        def one(index: int) -> BatchRun:
            lo, hi = bounds[index], bounds[index + 1]
            run = self.run(images[lo:hi], run_root / f"chunk{index}", first_image=int(lo),
                           stall_in=stall_in, stall_out=stall_out)
            if progress is not None:
                progress(int(hi - lo))
            return run

        if address is not None:
            return _run_on_ray(self, images, bounds, run_root, stall_in, stall_out, progress)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, range(chunks)))


def _ray_chunk(model: IntegerModel, folds: list[Fold], build_dir: str, batch: int, images: np.ndarray,
               first_image: int, run_dir: str, stall_in: float, stall_out: float) -> BatchRun:
    """One chunk on a Ray worker: the simulator built in ``build_dir`` on that node (once per node;
    already built on the driver's), then the chunk run."""
    simulator = BatchSimulator(model, folds, build_dir, batch=batch)
    return simulator.run(images, run_dir, first_image=first_image, stall_in=stall_in, stall_out=stall_out)


def _run_on_ray(simulator: BatchSimulator, images: np.ndarray, bounds: np.ndarray, run_root: Path,
                stall_in: float, stall_out: float, progress: Callable[[int], None] | None) -> list[BatchRun]:
    """:meth:`BatchSimulator.run_split`'s chunks as Ray tasks on the Ray the caller initialized."""
    import ray

    task = ray.remote(num_cpus=1)(_ray_chunk)
    model = ray.put(simulator.model)
    pending = {}
    for index in range(len(bounds) - 1):
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        reference = task.remote(model, simulator.top.folds, str(simulator.build_dir), simulator.batch,
                                images[lo:hi], lo, str(run_root / f"chunk{index}"), stall_in, stall_out)
        pending[reference] = (index, hi - lo)
    runs: dict[int, BatchRun] = {}
    while pending:
        finished, _ = ray.wait(list(pending), num_returns=1)
        index, count = pending.pop(finished[0])
        runs[index] = ray.get(finished[0])
        if progress is not None:
            progress(count)
    return [runs[index] for index in sorted(runs)]


@dataclass(frozen=True)
class Divergence:
    """Where a failing image first differs, from a per-cycle rerun with probes and a waveform."""

    image: int
    layer: str
    index: int
    expected: int | None
    got: int | None
    waveform: Path | None

    def __str__(self) -> str:
        where = (f"first diverging layer: {self.layer} (image {self.image}, output {self.index}: "
                 + (f"golden {self.expected}, RTL {self.got})" if self.got is not None
                    else f"golden {self.expected}, RTL produced no value)"))
        return where + (f"\nwaveform of the failing image: {self.waveform}" if self.waveform else "")


@dataclass
class FullReport:
    """A whole image set through the RTL: every output word against golden, and the timing."""

    images: int
    mismatches: list[Mismatch]
    protocol_errors: int
    hung_chunks: int
    cycles: int
    intervals: np.ndarray
    latency: int
    ii_formula: int
    jobs: int
    wall_seconds: float
    folds: list[Fold]
    stall: float
    divergence: Divergence | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.protocol_errors and not self.hung_chunks

    @property
    def mismatched_images(self) -> int:
        return len({m.image for m in self.mismatches})

    @property
    def ii_measured(self) -> int | None:
        """The most common interval between consecutive images' last outputs."""
        if len(self.intervals) == 0:
            return None
        values, counts = np.unique(self.intervals, return_counts=True)
        return int(values[np.argmax(counts)])

    def summary(self) -> str:
        timing = (f"II measured {self.ii_measured}, formula {self.ii_formula}" if not self.stall else
                  f"most common interval {self.ii_measured} with {self.stall:.0%} stalls on both ends "
                  f"(II formula {self.ii_formula}, measured without stalls)")
        lines = [
            f"images: {self.images}, mismatches: {self.mismatched_images} images "
            f"({len(self.mismatches)} words) against the golden model",
            f"cycles per image: {timing} (folds {', '.join(map(str, self.folds))}); "
            f"latency {self.latency} cycles",
            f"simulated {self.cycles:,} cycles in {self.wall_seconds:.1f} s on {self.jobs} processes "
            f"({self.cycles / max(self.wall_seconds, 1e-9):,.0f} cycles/s, "
            f"{self.images / max(self.wall_seconds, 1e-9):,.0f} images/s)",
        ]
        if self.protocol_errors:
            lines.append(f"PROTOCOL: {self.protocol_errors} m_axis beats with tlast on the wrong word or "
                         f"changed before they were taken")
        if self.hung_chunks:
            lines.append(f"HUNG: {self.hung_chunks} simulator processes stopped getting output")
        lines += [f"MISMATCH {m}" for m in self.mismatches[:10]]
        if self.divergence is not None:
            lines.append(str(self.divergence))
        return "\n".join(lines)


def verify_all(model: IntegerModel, folds: list[Fold], images: np.ndarray, build_dir: Path | str, *,
               jobs: int = 2, stall: float = 0.0, batch: int = 32, reference: IntegerModel | None = None,
               progress: Callable[[int], None] | None = None, address: str | None = None) -> FullReport:
    """Every image through the RTL of ``model`` and every output word against the golden model.

    ``reference`` is the model the golden run uses (default ``model``). On a mismatch, the first
    failing image is rerun in the per-cycle bench with probes on every layer and a waveform, to
    name the first layer whose output differs. With ``address`` the chunks (``jobs`` × 4) run as
    tasks on the Ray the caller initialized (see ``hwgen verify --address``).
    """
    reference = reference or model
    images = images.reshape(len(images), -1)
    build_dir = Path(build_dir)
    simulator = BatchSimulator(model, folds, build_dir / "batch", batch=batch)
    start = time.perf_counter()
    chunks = jobs * 4 if len(images) >= 1000 * jobs or address is not None else jobs
    runs = simulator.run_split(images, jobs=jobs, chunks=min(chunks, len(images)), stall_in=stall, stall_out=stall,
                               progress=progress, address=address)
    wall = time.perf_counter() - start
    got = np.concatenate([run.words for run in runs]).view(np.int32).astype(np.int64)
    expected = expected_words(golden.run(reference, images))
    mismatches = compare(reference, expected[:len(got)], got)
    intervals = np.concatenate([np.diff(run.out_last) for run in runs])
    if len(got) < len(images):
        mismatches.append(Mismatch(len(got), "output", 0, int(expected[len(got), 0]), None))
    report = FullReport(len(images), mismatches, sum(run.protocol_errors for run in runs),
                        sum(run.hung for run in runs), sum(run.cycles for run in runs), intervals,
                        int(runs[0].out_last[0] - runs[0].first_input_cycle) if len(runs[0].out_last) else -1,
                        simulator.top.cycles_per_image, jobs, wall, simulator.top.folds, stall)
    if mismatches:
        report.divergence = locate_divergence(model, folds, images, mismatches[0].image, build_dir / "debug",
                                              reference=reference)
    return report


def locate_divergence(model: IntegerModel, folds: list[Fold], images: np.ndarray, image: int,
                      build_dir: Path | str, *, reference: IntegerModel | None = None,
                      context: int = 2) -> Divergence:
    """Rerun ``image`` (after up to ``context`` images before it, so pipeline state is similar)
    with every layer's output probed and a waveform dumped; name the first layer that differs."""
    reference = reference or model
    first = max(0, image - context)
    chosen = images[first:image + 1]
    simulator = NetworkSimulator(model, folds, build_dir, waves=True, probes=True)
    run = simulator.run(chosen, reference=reference)
    waveform = simulator.last_run_dir / "dump.vcd"
    kept = None
    if waveform.is_file():
        kept = waveform.replace(Path(build_dir) / f"mismatch_image{image}.vcd")
    last = len(chosen) - 1
    # Probed hidden layers come first, in network order: the first of them is where it diverged.
    own = [m for m in run.mismatches if m.image == last or m.got is None]
    if own:
        return Divergence(image, own[0].layer, own[0].index, own[0].expected, own[0].got, kept)
    return Divergence(image, "none (the per-cycle rerun matched golden: the mismatch depends on earlier "
                      "images or on timing)", 0, None, None, kept)
