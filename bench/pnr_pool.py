"""make bench's place and route two ways on this machine: through ``hwgen sweep`` (Ray, as the bench
runs it now) and through the thread pool the bench used before, on the same builds.

Each way starts from an empty folder (no finished builds reused), two builds at a time, and the
wall time is taken around the whole batch (Ray's start-up included). The placed counts and Fmax
of the two ways are compared build by build: the tools are deterministic, so they must agree.

    python -m bench.pnr_pool [NETWORK:BOARD,...]      (default: every placed row of results.json)

Results: ``bench/pnr_pool.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hwgen.sweep import SweepPoint, run_sweep

from .run import RESULTS, ROOT, WORK, hwgen, pnr_point

OUTPUT = ROOT / "bench" / "pnr_pool.json"
JOBS = 2


def thread_pool(points: list[SweepPoint], folder: Path) -> tuple[float, list[Path]]:
    """The former bench's way: ``hwgen build`` processes, ``JOBS`` at a time from a thread pool."""

    def build(index: int, point: SweepPoint) -> Path:
        output = folder / f"build{index}"
        hwgen("build", point.model, "--board", point.board, "--fold", point.folds,
              "--weight-memory", point.weights, "-o", str(output))
        return output / "hwgen_report.json"

    start = time.perf_counter()
    with ThreadPoolExecutor(JOBS) as pool:
        reports = list(pool.map(build, range(len(points)), points))
    return time.perf_counter() - start, reports


def sweep(points: list[SweepPoint], folder: Path) -> tuple[float, list[Path]]:
    """The bench's way now: one ``hwgen sweep`` on a local Ray of ``JOBS`` workers."""
    start = time.perf_counter()
    rows = run_sweep(points, folder, num_cpus=JOBS, progress=False)
    wall = time.perf_counter() - start
    failed = [row for row in rows if "error" in row]
    if failed:
        raise SystemExit(f"sweep point failed: {failed[0]['error'][-800:]}")
    return wall, [Path(row["build"]) / "hwgen_report.json" for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", default=None, help="NETWORK:BOARD,... (default: every placed row)")
    parser.add_argument("--only", choices=("thread-pool", "sweep"), default=None,
                        help="measure one way again and keep the other's figures from pnr_pool.json")
    args = parser.parse_args(argv)
    networks = json.loads(RESULTS.read_text())["networks"]
    wanted = ([tuple(item.split(":", 1)) for item in args.rows.split(",")] if args.rows else
              [(name, board) for name, row in networks.items() for board, cell in row.items()
               if isinstance(cell, dict) and "placed" in cell])
    points = [pnr_point(name, board, networks[name][board]) for name, board in wanted]
    folder = WORK / "pnr_pool"
    ways = {"thread-pool": thread_pool, "sweep": sweep}
    earlier = json.loads(OUTPUT.read_text()) if args.only else None
    walls, paths = {}, {}
    for way, run in ways.items():
        if args.only in (None, way):
            shutil.rmtree(folder / way, ignore_errors=True)
            walls[way], paths[way] = run(points, folder / way)
        else:       # the other way's figures and build reports from the earlier run
            walls[way], paths[way] = earlier["wall_s"][way], [Path(path) for path in earlier["reports"][way]]
    reports = {way: [json.loads(path.read_text()) for path in paths[way]] for way in ways}
    builds = []
    for (name, board), by_pool, by_sweep in zip(wanted, reports["thread-pool"], reports["sweep"]):
        same = by_pool["placed"] == by_sweep["placed"] and by_pool["fmax_mhz"] == by_sweep["fmax_mhz"]
        builds.append({"build": f"{name}:{board}", "placed_and_fmax_equal": same,
                       "tool_s_thread_pool": by_pool["tool_seconds"], "tool_s_sweep": by_sweep["tool_seconds"]})
    result = {"machine": f"{platform.machine()}, 2 cores", "date": time.strftime("%Y-%m-%d"), "jobs": JOBS,
              "wall_s": {way: round(wall, 1) for way, wall in walls.items()},
              "sweep_over_thread_pool": round(walls["sweep"] / walls["thread-pool"], 3), "builds": builds,
              "reports": {way: [str(path) for path in paths[way]] for way in ways}}
    OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
