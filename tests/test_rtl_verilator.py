"""Network tops in Verilator through cocotb: bit-exact against golden, with stalls, cycles vs formula.

Each configuration is built once and runs two streams: a stalled one (random valid/ready on both
ends) for correctness and handshakes, and an unstalled one for the cycle counts.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from hwgen.rtl import arith
from hwgen.rtl.arith import divisors
from hwgen.rtl.dense import FoldedDense
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


SLOW = pytest.mark.slow
# make test runs the first few of each list; the hypothesis fuzz (test_fuzz.py) draws many more.
CONFIGURATIONS = ([pytest.param(seed, False, marks=SLOW if seed >= 4 else ()) for seed in range(12)]
                  + [pytest.param(seed, True, marks=SLOW if seed >= 23 else ()) for seed in range(20, 28)])


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


def random_cnn_configuration(seed: int):
    """Kernels 1/3/5, strides 1/2, padding 0/1, odd sizes, binary or int8, random legal folds."""
    from helpers import random_cnn
    from hwgen.ir import Conv2dLayer, MaxPool2dLayer

    rng = np.random.default_rng(seed)
    size = (int(rng.integers(5, 12)), int(rng.integers(5, 12)), int(rng.integers(1, 3)))
    convs, height, width = [], size[0], size[1]
    for index in range(int(rng.integers(1, 3))):
        kernel = int(rng.choice([k for k in (1, 3, 5) if k <= min(height, width)]))
        stride, padding = int(rng.choice([1, 2])), int(rng.choice([p for p in (0, 1) if p < kernel]))
        height, width = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
        weights = str(rng.choice(["binary", "int8"]))
        output = "requant" if weights == "int8" and rng.random() < 0.5 else "threshold"
        pool = 2 if min(height, width) >= 4 and rng.random() < 0.5 else 0
        if pool:
            height, width = height // 2, width // 2
        convs.append(dict(channels=int(rng.choice([2, 3, 4, 6])), kernel=kernel, stride=stride,
                          padding=padding, weights=weights, output=output, pool=pool))
    model = random_cnn(rng, size, convs, int(rng.choice([2, 3, 5])), str(rng.choice(["binary", "int8"])))
    folds, incoming = [], None
    for layer in model.layers:
        if isinstance(layer, MaxPool2dLayer):
            incoming = layer.in_shape[2]
            continue
        dense = layer.dense if isinstance(layer, Conv2dLayer) else layer
        receives = layer.in_shape[2] if isinstance(layer, Conv2dLayer) else incoming
        simd = [d for d in divisors(dense.in_features) if receives is None or d % receives == 0 or receives % d == 0]
        pe = int(rng.choice(divisors(dense.out_features)))
        folds.append(Fold(pe, int(rng.choice(simd))))
        incoming = 1 if layer.output_kind == "requant" else pe
    return model, folds, rng


@pytest.mark.parametrize("seed", [pytest.param(seed, marks=SLOW if seed >= 43 else ()) for seed in range(40, 48)])
def test_random_cnn_rtl_equals_golden(seed, tmp_path):
    model, folds, rng = random_cnn_configuration(seed)
    simulator = NetworkSimulator(model, folds, tmp_path)
    report = simulator.verify(random_images(rng, 8, model.in_features), stall=0.3, seed=seed, timing_images=5)
    where = f"{[layer.header() for layer in model.layers]}, folds {folds}"
    assert report.checked.mismatches == [] and report.timing.mismatches == [], where
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == [], where
    assert report.timing.intervals[-2:] == [report.ii_formula] * 2, (report.timing.intervals, report.ii_formula, where)


@pytest.mark.parametrize("kinds", [None, [("int8", "requant"), ("int8", "scores")]])
def test_ecp5_layers_with_banked_weights_equal_golden(kinds, tmp_path, monkeypatch):
    """The layers as `hwgen build` makes them for ECP5: a 1200-word first-layer weight ROM in three
    block-RAM banks with output registers, a 120-word one in one bank with the same registers, two
    adder levels per stage; int8 weights make both banks several memories side by side (one block
    each here); exact, II and latency as the formulas say."""
    monkeypatch.setattr(arith, "ROM_SINGLE_BANK_SLICE_BLOCKS", 1)
    rng = np.random.default_rng(600)
    model = random_model(rng, [600, 72, 10], kinds=kinds)
    simulator = NetworkSimulator(model, [Fold(6, 6), Fold(2, 3)], tmp_path, family="ecp5")
    first, second = (stage for stage in simulator.top._stages if hasattr(stage, "weight_banks"))
    assert (first.weight_depth, first.weight_banks, first.weight_bank_stages) == (1200, 3, 2)
    assert (second.weight_depth, second.weight_banks, second.weight_bank_stages) == (120, 1, 2)
    slices = [arith.rom_bank_slices(stage.weight_depth, stage.weight_width) for stage in (first, second)]
    assert slices == ([1, 1] if kinds is None else [2, 2])
    copies = sorted(len(set(re.findall(r"weight_addr_copy(\d+)", module)))
                    for module in generate_verilog(simulator.top).split("\nmodule ") if "weight_addr_copy" in module)
    assert copies == ([1, 3] if kinds is None else [2, 6])         # bank memories each read their own
    report = simulator.verify(random_images(rng, 12, 600), stall=0.3, seed=1, timing_images=5)
    assert report.checked.mismatches == [] and report.timing.mismatches == []
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == []
    assert report.timing.intervals[-3:] == [report.ii_formula] * 3
    assert report.latency_exact and report.timing.latency == report.latency_formula


@pytest.mark.parametrize("widths, kinds, folds, family", [
    # ±1 weights on bytes (pair lanes), then XNOR-popcount layers padded by 2 and 1 inputs.
    ([16, 13, 11, 10], None, [Fold(1, 8), Fold(1, 5), Fold(1, 4)], "ecp5"),
    # int8 weights on bytes after a requantizer (padded by 1), then ±1 weights on bytes (by 3).
    ([12, 8, 9, 10], [("int8", "requant"), ("int8", "requant"), ("binary", "scores")],
     [Fold(2, 4), Fold(3, 3), Fold(5, 4)], None),
    # 2-bit and ternary weights on 2-bit activations, padded by 2 and 1; a popcount-free chain.
    ([12, 10, 7, 10], [("ternary", "multithreshold", 2), ("int2", "multithreshold", 2), ("ternary", "scores")],
     [Fold(2, 6), Fold(7, 3), Fold(2, 2)], None),
    # Padded SIMDs that are multiples of the previous layer's PE: 8 -> 24 over 40 inputs, 4 -> 16 over 24.
    ([32, 40, 24, 10], None, [Fold(8, 8), Fold(4, 24), Fold(2, 16)], None),
], ids=["popcount", "int8-and-pairs", "low-bit", "gathered"])
def test_padded_simd_layers_equal_golden(widths, kinds, folds, family, tmp_path):
    """A SIMD that does not divide a layer's inputs: each vector's last beat is padded with zeros
    (their weights add nothing); every hidden element and output word equals golden, with
    stalls, and the II is ``ceil(N_in / SIMD) * N_out / PE`` as the formula says."""
    rng = np.random.default_rng(sum(widths))
    model = random_model(rng, widths, kinds=kinds)
    simulator = NetworkSimulator(model, folds, tmp_path, probes=True, family=family)
    dense = [stage for stage in simulator.top._stages if isinstance(stage, FoldedDense)]
    assert [stage.padding for stage in dense][1:] == [-layer.in_features % fold.simd
                                                       for layer, fold in zip(model.layers[1:], folds[1:])]
    assert all(stage.padding for stage in dense[1:])
    report = simulator.verify(random_images(rng, 16, model.in_features), stall=0.3, seed=2, timing_images=6)
    assert report.checked.mismatches == [] and report.timing.mismatches == [], report.checked.mismatches[:3]
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == []
    assert report.timing.intervals[-3:] == [report.ii_formula] * 3
    assert report.ii_formula == max(-(-layer.in_features // fold.simd) * layer.out_features // fold.pe
                                    for layer, fold in zip(model.layers, folds))


@pytest.mark.parametrize("seed", [40, 41, 42])
def test_random_cnn_as_built_for_ecp5_equals_golden(seed, tmp_path):
    """CNNs as `hwgen build` makes them for ECP5: register slices after each convolution, and before
    each sliding window but the first and between it and its lanes, banked weight ROMs, two adder
    levels per stage."""
    from hwgen.ir import Conv2dLayer
    from hwgen.rtl.slice import RegisterSlice

    model, folds, rng = random_cnn_configuration(seed)
    simulator = NetworkSimulator(model, folds, tmp_path, family="ecp5")
    convolutions = sum(isinstance(layer, Conv2dLayer) for layer in model.layers)
    assert sum(isinstance(stage, RegisterSlice) for stage in simulator.top._stages) == 3 * convolutions - 2
    report = simulator.verify(random_images(rng, 8, model.in_features), stall=0.3, seed=seed, timing_images=5)
    where = f"{[layer.header() for layer in model.layers]}, folds {folds}"
    assert report.checked.mismatches == [] and report.timing.mismatches == [], where
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == [], where
    assert report.timing.intervals[-2:] == [report.ii_formula] * 2, (report.timing.intervals, report.ii_formula, where)


#: Low-bit MLPs: (widths, per-layer kinds, folds). k-bit activations from multi-threshold units on
#: ±1, ternary and 2-bit weights, thresholds at both ends of the range, all-zero ternary rows.
LOW_BIT_MLPS = [
    ([49, 24, 16, 5], [("binary", "multithreshold", 2), ("binary", "multithreshold", 2), ("binary", "scores")],
     [Fold(4, 7), Fold(8, 4), Fold(5, 16)]),
    ([36, 12, 10, 3], [("ternary", "multithreshold", 2), ("ternary", "multithreshold", 3), ("ternary", "scores")],
     [Fold(3, 9), Fold(2, 3), Fold(1, 10)]),
    ([25, 16, 6], [("int2", "multithreshold", 4), ("int2", "scores")], [Fold(16, 5), Fold(3, 16)]),
]


# make test runs W1A2 plain, ternary as built for ECP5 and int2 plain; the other three are slow.
@pytest.mark.parametrize("index, family", [
    (0, None), pytest.param(0, "ecp5", marks=SLOW), pytest.param(1, None, marks=SLOW), (1, "ecp5"), (2, None),
    pytest.param(2, "ecp5", marks=SLOW)])
def test_low_bit_mlp_rtl_equals_golden(index, family, tmp_path):
    widths, kinds, folds = LOW_BIT_MLPS[index]
    rng = np.random.default_rng(700 + index)
    model = random_model(rng, widths, kinds=kinds)
    simulator = NetworkSimulator(model, folds, tmp_path, family=family)
    report = simulator.verify(random_images(rng, 24, model.in_features), stall=0.3, seed=index, timing_images=6)
    where = f"{[layer.header() for layer in model.layers]}, folds {folds}"
    assert report.checked.mismatches == [] and report.timing.mismatches == [], where
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == [], where
    assert report.timing.intervals[-3:] == [report.ii_formula] * 3, (report.timing.intervals, report.ii_formula, where)
    if report.latency_exact:
        assert report.timing.latency == report.latency_formula, where


def test_low_bit_cnn_rtl_equals_golden(tmp_path):
    """uint2 and uint3 feature maps through sliding windows, padding (level 0) and max-pools."""
    from helpers import random_cnn

    rng = np.random.default_rng(710)
    convs = [dict(channels=4, kernel=3, stride=1, padding=1, weights="binary", output="multithreshold", act_bits=2,
                  pool=2),
             dict(channels=6, kernel=3, stride=1, padding=0, weights="ternary", output="multithreshold", act_bits=3)]
    model = random_cnn(rng, (9, 9, 1), convs, 3, "int2")
    folds = [Fold(2, 3), Fold(3, 4), Fold(3, 6)]
    simulator = NetworkSimulator(model, folds, tmp_path)
    report = simulator.verify(random_images(rng, 8, model.in_features), stall=0.3, seed=3, timing_images=5)
    where = f"{[layer.header() for layer in model.layers]}, folds {folds}"
    assert report.checked.mismatches == [] and report.timing.mismatches == [], where
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == [], where
    assert report.timing.intervals[-2:] == [report.ii_formula] * 2, (report.timing.intervals, report.ii_formula, where)
