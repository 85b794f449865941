"""The fit estimate against place and route: random networks of varied shapes on each open-flow board.

``python -m bench.fit [--board NAME ...]`` builds every point with yosys + nextpnr (a few minutes
each) and writes ``bench/fit.json``: per point the folds, the estimate and what nextpnr placed,
and the estimate's error. Shapes have odd sizes, SIMD that is not a power of two, every lane
kind (uint8 x ±1 pairs, XNOR-popcount, int8 multiplies) and ``--fold auto`` as well as explicit
folds. ``tests/test_board.py`` keeps two of these builds as a test of the estimate.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hwgen.boards import load_board
from hwgen.build import build_board
from hwgen.fit import auto_folds, estimate
from hwgen.ir import write_atomically
from hwgen.rtl.network import Fold
from tests.helpers import random_model

#: How far an estimate may be from what nextpnr places (LUTs; block RAMs and DSPs must be equal).
LUT_TOLERANCE = 0.15

MIXED = [("int8", "requant"), ("int8", "scores")]


class Point(NamedTuple):
    board: str
    seed: int
    widths: tuple[int, ...]
    input_kind: str = "uint8"
    kinds: tuple | None = None
    folds: str = "auto"         # or "PExSIMD,..."


POINTS = [
    Point("icebreaker", 1, (64, 100, 37, 10)),
    Point("icebreaker", 4, (64, 32, 10)),
    Point("icebreaker", 2, (96, 45, 10), folds="5x3,1x5"),
    Point("icebreaker", 3, (50, 30, 10), input_kind="bits"),
    Point("icebreaker", 5, (36, 24, 10), kinds=tuple(MIXED), folds="1x2,1x2"),
    Point("ulx3s-85f", 1, (64, 100, 37, 10)),
    Point("ulx3s-85f", 6, (200, 90, 10)),
    Point("ulx3s-85f", 2, (96, 45, 10), folds="9x3,2x9"),
    Point("ulx3s-85f", 3, (120, 60, 10), input_kind="bits"),
    Point("ulx3s-85f", 5, (36, 24, 10), kinds=tuple(MIXED), folds="4x6,2x8"),
]

#: Points measured after the model was last fitted to the ones above: a check it did not see.
VALIDATION_POINTS = [
    Point("icebreaker", 7, (80, 40, 10)),
    Point("icebreaker", 8, (72, 60, 10), input_kind="bits", folds="4x24,2x12"),
    Point("ulx3s-85f", 7, (150, 64, 10), input_kind="bits"),
    Point("ulx3s-85f", 8, (100, 50, 20, 10), folds="10x20,5x10,2x10"),
]


def point_model(point: Point):
    """The random model of a point, the same on every run."""
    return random_model(np.random.default_rng(point.seed), list(point.widths), point.input_kind,
                        list(point.kinds) if point.kinds else None)


def measure(point: Point, workdir: Path) -> dict:
    """Estimate and build one point; the estimate's relative error per resource."""
    board = load_board(point.board)
    model = point_model(point)
    if point.folds == "auto":
        est = auto_folds(model, board)
    else:
        est = estimate(model, [Fold(*map(int, fold.split("x"))) for fold in point.folds.split(",")], board)
    start = time.perf_counter()
    report = build_board(model, "calibration", board, est.folds, workdir / f"{point.board}-{point.seed}",
                         est=est).report
    estimated = est.total.as_dict()
    placed = {key: value["used"] for key, value in report["placed"].items() if key in estimated}
    return {"board": point.board, "widths": list(point.widths), "input_kind": point.input_kind,
            "kinds": "mixed" if point.kinds else "binary", "seed": point.seed, "fold_rule": point.folds,
            "folds": [str(fold) for fold in est.folds], "estimate": estimated, "placed": placed,
            "lut_error": round(estimated["luts"] / placed["luts"] - 1, 3), "fmax_mhz": report["fmax_mhz"],
            "seconds": round(time.perf_counter() - start)}


def re_estimate(row: dict) -> dict:
    """A measured row with the current estimate of its folds (what was placed stays as measured)."""
    point = Point(row["board"], row["seed"], tuple(row["widths"]), row["input_kind"],
                  tuple(MIXED) if row["kinds"] == "mixed" else None, row["fold_rule"])
    folds = [Fold(*map(int, fold.split("x"))) for fold in row["folds"]]
    estimated = estimate(point_model(point), folds, load_board(row["board"])).total.as_dict()
    row = dict(row, estimate=estimated, lut_error=round(estimated["luts"] / row["placed"]["luts"] - 1, 3))
    row["within_tolerance"] = within_tolerance(row)
    return row


def _key(row: dict) -> tuple:
    return (row["board"], row["seed"], tuple(row["widths"]), row.get("fold_rule", row.get("folds")))


def within_tolerance(row: dict) -> bool:
    """LUTs within :data:`LUT_TOLERANCE` of placed, block RAMs and DSPs exactly."""
    return (abs(row["lut_error"]) <= LUT_TOLERANCE and row["estimate"]["bram_blocks"] == row["placed"]["bram_blocks"]
            and row["estimate"]["dsps"] == row["placed"].get("dsps", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", action="append", help="only these boards (default: all points)")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench/fit.json"))
    parser.add_argument("--re-estimate", action="store_true",
                        help="build nothing: estimate the measured rows again with the current model "
                             "(after refitting it; the placed numbers stay those of the builds)")
    args = parser.parse_args()
    # Estimates build network tops only for their properties, never elaborated: that is fine.
    warnings.filterwarnings("ignore", message=".*created but never used")
    if args.re_estimate:
        rows = [re_estimate(row) for row in json.loads(args.output.read_text())]
        write_atomically(args.output, json.dumps(rows, indent=2) + "\n")
        print(markdown(rows))
        print(f"{sum(row['within_tolerance'] for row in rows)} of {len(rows)} points within tolerance")
        return
    # Points already measured (same board, seed, shape and fold rule) are kept, not rebuilt:
    # delete the file to measure everything again.
    rows = json.loads(args.output.read_text()) if args.output.exists() else []
    done = {_key(row) for row in rows}
    with tempfile.TemporaryDirectory(prefix="hwgen-fit-") as folder:
        for point in POINTS + VALIDATION_POINTS:
            if (args.board and point.board not in args.board) or _key(point._asdict()) in done:
                continue
            rows.append(dict(measure(point, Path(folder)), validation=point in VALIDATION_POINTS))
            rows[-1]["within_tolerance"] = within_tolerance(rows[-1])
            print(json.dumps(rows[-1]), flush=True)
            write_atomically(args.output, json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    print(f"{sum(row['within_tolerance'] for row in rows)} of {len(rows)} points within tolerance")


def markdown(rows: list[dict]) -> str:
    """The comparison as the README's table."""
    lines = ["| board | network | input | folds | LUT est / placed | BRAM est / placed | DSP est / placed | error | Fmax |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        est, placed = row["estimate"], row["placed"]
        rule = ("auto: " if row["fold_rule"] == "auto" else "") + ("(check) " if row.get("validation") else "")
        lines.append(f"| {row['board']} | {'-'.join(map(str, row['widths']))} {row['kinds']} | {row['input_kind']} "
                     f"| {rule}{','.join(row['folds'])} | {est['luts']:,} / {placed['luts']:,} "
                     f"| {est['bram_blocks']} / {placed['bram_blocks']} | {est['dsps']} / {placed.get('dsps', 0)} "
                     f"| {row['lut_error']:+.1%} | {row['fmax_mhz']} MHz |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
