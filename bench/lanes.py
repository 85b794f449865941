"""Lane cost of FoldedDense: yosys synthesis of one layer alone, LUT4s per MAC per cycle.

``python -m bench.lanes [--tree-levels N ...]`` writes ``bench/lanes.json`` (ECP5: the reference
binary MLP's first two layers at their default and ``--fold auto`` folds); ``python -m bench.lanes
--low-bit`` writes ``bench/lanes_low_bit.json``: the lanes of k-bit activations times ±1, ternary
and 2-bit weights against the XNOR lane, on ECP5 and iCE40, each beside the fit estimate of the
same layer. A layer's LUT4s are its LUT4 cells plus two per CCU2C on ECP5 (a carry cell holds two
LUT4s; nextpnr counts them as TRELLIS_COMB like any other LUT4), its SB_LUT4s on iCE40, divided by
PE x SIMD, the MACs it does per cycle.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
from amaranth.back import verilog

from hwgen.boards import load_board
from hwgen.fit import stage_resources
from hwgen.ir import DenseLayer, write_atomically
from hwgen.rtl.dense import FoldedDense, pipelining_for, tree_levels_for
from hwgen.synth import lut4s, synthesize
from tests.helpers import random_layer

#: (name, input kind, in, out, PE, SIMD): mlp-binary's first layer (uint8 x ±1) and a hidden one,
#: at the old default folds and at the folds `--fold auto` picks for them on the ULX3S-85F.
SHAPES = [("first-uint8", "uint8", 784, 256, 16, 28), ("hidden-xnor", "bits", 256, 256, 16, 16),
          ("hidden-xnor", "bits", 256, 256, 16, 32),
          ("first-uint8", "uint8", 784, 256, 16, 196), ("hidden-xnor", "bits", 256, 256, 4, 256)]


#: (input kind, weight kind, in, out, PE, SIMD): a hidden 256-256 layer of the reference MLP at 16x32
#: in each new precision and as W1A1, and a uint8 first layer with ternary weights.
LOW_BIT_SHAPES = [("bits", "binary", 256, 256, 16, 32), ("uint2", "binary", 256, 256, 16, 32),
                  ("uint3", "binary", 256, 256, 16, 32), ("uint4", "binary", 256, 256, 16, 32),
                  ("uint2", "ternary", 256, 256, 16, 32), ("uint2", "int2", 256, 256, 16, 32),
                  ("uint4", "ternary", 256, 256, 16, 32), ("uint8", "ternary", 784, 256, 16, 28)]
#: The board whose budget decides where each family's memories go.
LOW_BIT_BOARDS = {"ecp5": "ulx3s-85f", "ice40": "icebreaker"}


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


def measure_low_bit() -> list[dict]:
    """The low-bit lanes as ``hwgen build`` makes them for each family, yosys against the estimate."""
    rows = []
    for family, board in LOW_BIT_BOARDS.items():
        for input_kind, weight_kind, n_in, n_out, pe, simd in LOW_BIT_SHAPES:
            dense = random_layer(np.random.default_rng(0), "d", input_kind, "threshold", n_in, n_out, weight_kind)
            options = {key: value for key, value in pipelining_for(family).items() if key != "register_slices"}
            dut = FoldedDense(dense, pe=pe, simd=simd, **options)
            start = time.perf_counter()
            cells = synthesize(verilog.convert(dut, name="dense", emit_src=False), "dense", family)
            luts = lut4s(cells, family)
            estimated = stage_resources(dut, 0, load_board(board))[1].luts
            rows.append({"family": family, "input": input_kind, "weights": weight_kind, "pe": pe, "simd": simd,
                         "lut4_total": luts, "lut4_per_mac": round(luts / (pe * simd), 2),
                         "estimate_lut4": round(estimated), "estimate_error": round(estimated / luts - 1, 3),
                         "dsps": sum(v for k, v in cells.items() if k in ("MULT18X18D", "SB_MAC16")),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree-levels", type=int, nargs="*", default=None)
    parser.add_argument("--low-bit", action="store_true", help="the k-bit, ternary and 2-bit lanes (both families)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    if args.low_bit:
        write_atomically(args.output or Path("bench/lanes_low_bit.json"), json.dumps(measure_low_bit(), indent=2) + "\n")
        return
    pipelined = "tree_levels" in inspect.signature(FoldedDense).parameters
    results = [row for levels in (args.tree_levels or [None]) for row in measure(levels if pipelined else None)]
    write_atomically(args.output or Path("bench/lanes.json"), json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
