"""Lane cost of FoldedDense on ECP5: yosys synth_ecp5 of one layer alone, LUT4s per MAC per cycle.

``python -m bench.lanes [--tree-levels N ...]`` writes ``bench/lanes.json``. A layer's LUT4s are
its LUT4 cells plus two per CCU2C (a carry cell holds two LUT4s; nextpnr counts them as
TRELLIS_COMB like any other LUT4), divided by PE x SIMD, the MACs it does per cycle. The shapes
are the reference binary MLP's first two layers at their default folds.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
from amaranth.back import verilog

from hwgen.ir import DenseLayer, write_atomically
from hwgen.rtl.dense import FoldedDense, tree_levels_for
from hwgen.synth import lut4s, synthesize

#: (name, input kind, in, out, PE, SIMD): mlp-binary's first layer (uint8 x ±1) and a hidden one,
#: at the old default folds and at the folds `--fold auto` picks for them on the ULX3S-85F.
SHAPES = [("first-uint8", "uint8", 784, 256, 16, 28), ("hidden-xnor", "bits", 256, 256, 16, 16),
          ("hidden-xnor", "bits", 256, 256, 16, 32),
          ("first-uint8", "uint8", 784, 256, 16, 196), ("hidden-xnor", "bits", 256, 256, 4, 256)]


def layer(input_kind: str, n_in: int, n_out: int, seed: int = 0) -> DenseLayer:
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8)
    probe = DenseLayer("d", input_kind, "threshold", weights, np.zeros(n_out, np.int64), "binary")
    lo, hi = probe.channel_acc_bounds
    thresholds = rng.integers(lo, hi + 1).astype(np.int64)
    return DenseLayer("d", input_kind, "threshold", weights, thresholds, "binary")


def measure(tree_levels: int | None) -> list[dict]:
    rows = []
    for name, kind, n_in, n_out, pe, simd in SHAPES:
        options = {"tree_levels": tree_levels or tree_levels_for("ecp5")}
        dut = FoldedDense(layer(kind, n_in, n_out), pe=pe, simd=simd, **options)
        start = time.perf_counter()
        cells = synthesize(verilog.convert(dut, name="dense", emit_src=False), "dense", "ecp5")
        luts = lut4s(cells, "ecp5")
        rows.append({"layer": name, "pe": pe, "simd": simd, "tree_levels": options["tree_levels"],
                     "lut4": cells.get("LUT4", 0), "ccu2c": cells.get("CCU2C", 0), "lut4_total": luts,
                     "lut4_per_mac": round(luts / (pe * simd), 2),
                     "ffs": sum(v for k, v in cells.items() if k.startswith("TRELLIS_FF")),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree-levels", type=int, nargs="*", default=None)
    parser.add_argument("-o", "--output", type=Path, default=Path("bench/lanes.json"))
    args = parser.parse_args()
    pipelined = "tree_levels" in inspect.signature(FoldedDense).parameters
    results = [row for levels in (args.tree_levels or [None]) for row in measure(levels if pipelined else None)]
    write_atomically(args.output, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
