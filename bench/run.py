"""Benchmarks of the reference binary MLP: Verilog generation, golden throughput, RTL simulation.

Writes ``bench/results.json``; each figure comes from this run on this machine. The reference
network is a random-weight 784-256-256-10 binary MLP (the speed of every stage here does not depend
on trained weights), with the default folds.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from hwgen import golden
from hwgen.data import FASHION_MNIST_DIR, load_dataset
from hwgen.ir import DenseLayer, IntegerModel
from hwgen.rtl.network import NetworkTop, default_folds, generate_verilog
from sim.verify import NetworkSimulator

RESULTS = Path(__file__).with_name("results.json")


def reference_model(seed: int = 0) -> IntegerModel:
    rng = np.random.default_rng(seed)
    widths, layers = [784, 256, 256, 10], []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        weights = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8)
        kind = "uint8" if index == 0 else "bits"
        if index == len(widths) - 2:
            layers.append(DenseLayer(f"dense{index}", kind, "scores", weights))
            continue
        probe = DenseLayer("probe", kind, "threshold", weights)
        lo, hi = probe.channel_acc_bounds
        layers.append(DenseLayer(f"dense{index}", kind, "threshold", weights, ((lo + hi) // 2).astype(np.int64)))
    return IntegerModel((28, 28), tuple(layers))


def timed(function, repeat: int = 1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    model = reference_model()
    folds = default_folds(model)
    images = (load_dataset("fashion-mnist").test_x if FASHION_MNIST_DIR.is_dir()
              else np.random.default_rng(1).integers(0, 256, (10000, 784)).astype(np.uint8))
    results = {"machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
               "network": "binary MLP 784-256-256-10", "folds": [str(f) for f in folds]}

    seconds, verilog = timed(lambda: generate_verilog(NetworkTop(model, folds)), repeat=2)
    results["verilog_generation_s"] = round(seconds, 3)
    results["verilog_bytes"] = len(verilog)

    seconds, _ = timed(lambda: golden.run(model, images), repeat=3)
    results["golden_images_per_s"] = round(len(images) / seconds)

    with tempfile.TemporaryDirectory() as build:
        start = time.perf_counter()
        simulator = NetworkSimulator(model, folds, build)
        results["verilator_build_s"] = round(time.perf_counter() - start, 1)
        run = simulator.run(images[:500])
        results["rtl_images"] = run.images
        results["rtl_mismatches"] = len(run.mismatches)
        results["rtl_wall_s"] = round(run.wall_seconds, 2)
        results["rtl_images_per_s"] = round(run.images / run.wall_seconds, 1)
        results["rtl_simulated_cycles_per_s"] = round(run.cycles / run.wall_seconds)
        results["ii_measured"] = run.intervals[-1]
        results["ii_formula"] = simulator.top.cycles_per_image
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
