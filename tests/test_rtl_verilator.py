"""Network tops in Verilator through cocotb: bit-exact against golden, with stalls, cycles vs formula.

Each configuration is built once and runs two streams: a stalled one (random valid/ready on both
ends) for correctness and handshakes, and an unstalled one for the cycle counts.
"""
from __future__ import annotations

import numpy as np
import pytest

from hwgen.rtl.arith import divisors
from hwgen.rtl.network import Fold, NetworkTop, generate_verilog
from sim.verify import NetworkSimulator
from helpers import random_images, random_model


HIDDEN_KINDS = [("binary", "threshold"), ("int8", "threshold"), ("int8", "requant")]


def random_configuration(seed: int, mixed: bool = False):
    """Random widths (odd ones included), 1-3 layers, and random legal folds.

    ``mixed`` draws each layer's weights (binary or int8) and each hidden layer's output
    (threshold or requantized) at random; otherwise every layer is binary.
    """
    rng = np.random.default_rng(seed)
    depth = int(rng.integers(1, 4)) if not mixed else int(rng.integers(2, 4))
    widths = [int(rng.choice([9, 16, 25, 36, 49, 64, 100]))]
    widths += [int(rng.choice([3, 6, 7, 8, 12, 15, 16, 24, 32, 33])) for _ in range(depth - 1)]
    widths += [int(rng.choice([2, 3, 5, 10]))]
    kinds = None
    if mixed:
        kinds = [HIDDEN_KINDS[int(rng.integers(len(HIDDEN_KINDS)))] for _ in range(depth - 1)]
        kinds.append((str(rng.choice(["binary", "int8"])), "scores"))
    model = random_model(rng, widths, kinds=kinds)
    folds = []
    for layer in model.layers:
        simd_choices = divisors(layer.in_features)
        if folds and model.layers[len(folds) - 1].output_kind != "requant":
            prev = folds[-1].pe
            simd_choices = [d for d in simd_choices if d % prev == 0 or prev % d == 0]
        folds.append(Fold(int(rng.choice(divisors(layer.out_features))), int(rng.choice(simd_choices))))
    return model, folds, rng


CONFIGURATIONS = [(seed, False) for seed in range(12)] + [(seed, True) for seed in range(20, 28)]


@pytest.mark.parametrize("seed, mixed", CONFIGURATIONS)
def test_random_network_rtl_equals_golden(seed, mixed, tmp_path):
    model, folds, rng = random_configuration(seed, mixed)
    simulator = NetworkSimulator(model, folds, tmp_path)
    images = random_images(rng, 24, model.in_features)
    report = simulator.verify(images, stall=0.3, seed=seed, timing_images=6)
    layers = [f"{layer.in_features}->{layer.out_features} {layer.weight_kind}/{layer.input_kind}/{layer.output_kind}"
              for layer in model.layers]
    where = f"layers {layers}, folds {folds}"
    assert report.checked.mismatches == [], where
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == [], where
    assert report.timing.mismatches == [], where
    # Steady state: every image after the pipeline fills finishes exactly II cycles after the last.
    assert report.timing.intervals[-3:] == [report.ii_formula] * 3, where
    if report.latency_exact:
        assert report.timing.latency == report.latency_formula, where
    else:
        assert report.timing.latency > report.latency_formula, where


def test_stall_heavy_run_is_still_exact(tmp_path):
    model, folds, rng = random_configuration(100)
    simulator = NetworkSimulator(model, folds, tmp_path)
    images = random_images(rng, 16, model.in_features)
    for stall_in, stall_out in ((0.8, 0.0), (0.0, 0.8), (0.6, 0.6)):
        run = simulator.run(images, stall_in=stall_in, stall_out=stall_out, seed=7)
        assert run.ok, (stall_in, stall_out, run.mismatches[:3], run.protocol_errors[:3])


def test_verilog_is_byte_identical_across_runs():
    model, folds, _ = random_configuration(3)
    first = generate_verilog(NetworkTop(model, folds))
    second = generate_verilog(NetworkTop(model, folds))
    assert first == second and "module hwgen_network" in first
    for port in ("s_axis_tdata", "s_axis_tvalid", "s_axis_tready", "s_axis_tlast",
                 "m_axis_tdata", "m_axis_tvalid", "m_axis_tready", "m_axis_tlast"):
        assert port in first


def test_mismatch_report_names_image_layer_index_and_values(tmp_path):
    """Real RTL of one model checked against the golden model of a slightly different one."""
    from hwgen.ir import DenseLayer, IntegerModel

    model, folds, rng = random_configuration(5)
    simulator = NetworkSimulator(model, folds, tmp_path)
    last = model.layers[-1]
    weights = last.weights.copy()
    weights[1] ^= 1                      # class 1's popcount p becomes N - p
    simulator.model = IntegerModel(model.input_shape, model.layers[:-1] + (
        DenseLayer(last.name, last.input_kind, last.output_kind, weights),))
    run = simulator.run(random_images(rng, 4, model.in_features))
    named = [m for m in run.mismatches if m.layer == last.name]
    assert {m.image for m in named} == {0, 1, 2, 3} and {m.index for m in named} == {1}
    first = named[0]
    assert str(first) == (f"image 0, layer {last.name}, index 1: golden {first.expected}, RTL {first.got}")
    assert last.input_kind == "bits" and first.expected + first.got == last.in_features
