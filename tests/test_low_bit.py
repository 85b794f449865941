"""Between 1 and 8 bits: k-bit activations, ternary and int2 weights, multi-threshold outputs.

The integer contract (model file version 4) against plain integer arithmetic: bit-plane popcounts
against a matrix product, multi-threshold folding against float64 BN + the uniform quantizer on
every accumulator of the range, the file format, and the templates' three-way agreement.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwgen import golden
from hwgen.data import load_dataset
from hwgen.errors import UserError
from hwgen.ir import (WEIGHT_RANGES, DenseLayer, IntegerModel, batchnorm_reference, fold_batchnorm_levels,
                      uniform_levels_reference)
from helpers import meta_edit, rewrite_model_file

EPS = 1e-5


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def random_weights(rng, kind: str, shape: tuple[int, int]) -> np.ndarray:
    if kind == "binary":
        return rng.integers(0, 2, shape).astype(np.uint8)
    lo, hi = WEIGHT_RANGES[kind]
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


@pytest.mark.parametrize("weight_kind", ["binary", "ternary", "int2"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n_in", [1, 63, 64, 65, 200])
def test_bitplane_popcounts_equal_integer_matmul(weight_kind, bits, n_in):
    rng = np.random.default_rng(n_in * 10 + bits)
    layer = DenseLayer("t", f"uint{bits}", "scores", random_weights(rng, weight_kind, (7, n_in)), None, weight_kind)
    x = rng.integers(0, 1 << bits, (33, n_in))
    x[0], x[1] = 0, (1 << bits) - 1          # both ends of the input range
    assert np.array_equal(golden.accumulate(layer, x), x @ layer.weight_values.T)


def test_all_zero_ternary_rows_accumulate_zero():
    layer = DenseLayer("t", "uint2", "scores", np.zeros((3, 70), np.int8), None, "ternary")
    x = np.random.default_rng(0).integers(0, 4, (5, 70))
    assert np.array_equal(golden.accumulate(layer, x), np.zeros((5, 3), np.int64))
    assert (layer.acc_min, layer.acc_max) == (0, 0)


def test_multithreshold_counts_thresholds_reached():
    acc = np.array([[-5, 0, 7], [3, 3, 100]])
    thresholds = np.array([[-5, -5, 0], [1, 4, 4], [7, 8, 9]])
    assert golden.multithreshold(acc, thresholds).tolist() == [[2, 0, 1], [3, 1, 3]]


def levels_direct(layer: DenseLayer, acc: np.ndarray, bn, bits: int) -> np.ndarray:
    return uniform_levels_reference(batchnorm_reference(acc.astype(np.float64), *bn[:2], EPS, *bn[2:]),
                                    (1 << bits) - 1).astype(np.int64)


def every_accumulator(layer: DenseLayer) -> np.ndarray:
    """Inputs of a one-input layer reaching every accumulator value its weight allows."""
    lo, hi = (0, (1 << layer.input_bits) - 1)
    return np.arange(lo, hi + 1).reshape(-1, 1)


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), weight_kind=st.sampled_from(["binary", "ternary"]),
       n_in=st.integers(1, 30), mean=st.floats(-40, 40), var=st.floats(1e-3, 200),
       gamma=st.floats(-3, 3), beta=st.floats(-2, 2), seed=st.integers(0, 2 ** 16))
def test_fold_levels_equals_float_bn_quantizer_on_every_accumulator(bits, weight_kind, n_in, mean, var, gamma, beta,
                                                                      seed):
    """Thresholds reproduce round(clamp(BN(acc), 0, 1) * (2**k - 1)) at every reachable accumulator,
    for rising, falling (gamma < 0) and constant (gamma = 0) channels."""
    rng = np.random.default_rng(seed)
    layer = DenseLayer("t", f"uint{bits}", "threshold", random_weights(rng, weight_kind, (3, n_in)), None, weight_kind)
    bn = (np.full(3, mean), np.full(3, var), np.array([gamma, -gamma, 0.0]), np.full(3, beta))
    folded = fold_batchnorm_levels(layer, *bn[:2], EPS, *bn[2:], bits)
    x = rng.integers(0, 1 << bits, (300, n_in))
    x[0], x[1] = 0, (1 << bits) - 1
    got = golden.layer_output(folded, golden.accumulate(folded, x))
    want = levels_direct(layer, x @ layer.weight_values.T, bn, bits)
    assert np.array_equal(got, want)
    assert np.all(np.diff(folded.thresholds, axis=1) >= 0)
    lo, hi = folded.channel_acc_bounds
    assert np.all(folded.thresholds >= lo[:, None]) and np.all(folded.thresholds <= hi[:, None] + 1)


def test_thresholds_at_both_ends_of_the_range():
    """A channel always at the top level has every threshold at acc_min; one always at 0 at acc_max + 1."""
    layer = DenseLayer("t", "uint2", "threshold", np.ones((2, 4), np.uint8))
    folded = fold_batchnorm_levels(layer, np.zeros(2), np.ones(2), EPS, np.zeros(2), np.array([5.0, -5.0]), 2)
    lo, hi = folded.channel_acc_bounds
    assert folded.thresholds.tolist() == [[lo[0]] * 3, [hi[1] + 1] * 3]


def low_bit_model() -> IntegerModel:
    rng = np.random.default_rng(3)
    first = fold_batchnorm_levels(DenseLayer("dense0", "uint8", "threshold", random_weights(rng, "binary", (9, 20))),
                                  np.zeros(9), np.full(9, 4e4), EPS, rng.normal(0, 1, 9), rng.normal(0.5, 0.3, 9), 2)
    second = fold_batchnorm_levels(DenseLayer("dense1", "uint2", "threshold", random_weights(rng, "ternary", (6, 9)),
                                              None, "ternary"),
                                   np.zeros(6), np.full(6, 4.0), EPS, rng.normal(0, 1, 6), rng.normal(0.5, 0.3, 6), 3)
    last = DenseLayer("dense2", "uint3", "scores", random_weights(rng, "int2", (4, 6)), None, "int2")
    return IntegerModel((20,), (first, second, last))


def test_version_4_round_trip(tmp_path):
    model = low_bit_model()
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = IntegerModel.load(path)
    assert [(layer.input_kind, layer.weight_kind, layer.output_kind, layer.output_type) for layer in loaded.layers] == [
        ("uint8", "binary", "multithreshold", "uint2"), ("uint2", "ternary", "multithreshold", "uint3"),
        ("uint3", "int2", "scores", None)]
    images = np.random.default_rng(4).integers(0, 256, (50, 20)).astype(np.uint8)
    for got, want in zip(golden.run(loaded, images).outputs, golden.run(model, images).outputs):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.__setitem__("dense1.weights", a["dense1.weights"] * 2),
     "array 'dense1.weights' must be int8 in [-1, 1] (ternary weights)"),
    (lambda a: a.__setitem__("dense2.weights", np.full_like(a["dense2.weights"], 2)),
     "array 'dense2.weights' must be int8 in [-2, 1] (int2 weights)"),
    (lambda a: a.__setitem__("dense0.thresholds", a["dense0.thresholds"][:, ::-1] + np.array([0, 0, 1])),
     "array 'dense0.thresholds' must be non-decreasing"),
    (lambda a: a.__setitem__("dense0.thresholds", a["dense0.thresholds"][:, :2]),
     "array 'dense0.thresholds' has shape (9, 2), expected (9, 3)"),
    (meta_edit(lambda m: m["layers"][0].__setitem__("out", "uint9")), "field 'meta.layers[0].out' is 'uint9'"),
    (meta_edit(lambda m: m["layers"][0].__setitem__("out", "uint3")),
     "array 'dense0.thresholds' has shape (9, 3), expected (9, 7)"),
])
def test_bad_low_bit_fields_are_named(tmp_path, mutate, message):
    path = tmp_path / "m.npz"
    rewrite_model_file(path, low_bit_model(), mutate)
    with pytest.raises(UserError) as info:
        IntegerModel.load(path)
    assert message in str(info.value)


@pytest.mark.parametrize("weights, act_bits, conv", [
    ("binary", 2, ()), ("ternary", 2, ()), ("ternary", 1, ()), ("binary", 4, ()),
    ("binary", 2, ("8c3", "m2")), ("ternary", 3, ("6c3", "m2", "8c3s2p1")), ("int2", 2, ()),
    ("int2", 2, ("6c3", "m2"))])
def test_templates_torch_equals_golden(digits, weights, act_bits, conv):
    """Fake-quant torch == golden on every integer output of every test image, after training."""
    from hwgen.frontends import templates
    arch = templates.Architecture(digits.image_shape, (24,), digits.classes, "binary", conv, weights, act_bits)
    model = templates.build_model(arch, seed=1)
    accuracy = templates.train(model, digits, epochs=2, seed=1, progress=False)
    integer_model = templates.export(model)
    hidden = [layer for layer in integer_model.layers if layer.output_kind not in ("scores", "pool")]
    assert {layer.output_kind for layer in hidden} == {"threshold" if act_bits == 1 else "multithreshold"}
    assert {layer.weight_kind for layer in hidden} == {weights}
    result = golden.run(integer_model, digits.test_x)
    torch_outputs = templates.integer_forward(model, digits.test_x)
    assert len(torch_outputs) == len(result.outputs)
    for got, want in zip(result.outputs, torch_outputs):
        assert np.array_equal(got, want)
    assert np.mean(result.classes == digits.test_y) == pytest.approx(accuracy)
    if weights == "int2":
        # every 2-bit value in use, and no BN scale below 0 (so no row needed negating)
        assert set(np.unique(hidden[0].weights).tolist()) == {-2, -1, 0, 1}
        assert all((norm.weight >= 0).all() for norm in [*model.conv_norms, *model.norms])


def test_precision_needs_a_binary_template():
    from hwgen.frontends import templates
    with pytest.raises(UserError, match="--weights ternary --act-bits 2 apply to --kind binary, not int8"):
        templates.Architecture((8, 8), (16,), 10, "int8", (), "ternary", 2)
    with pytest.raises(UserError, match="activation bits 5: choose one of 1, 2, 3, 4"):
        templates.Architecture((8, 8), (16,), 10, "binary", (), "binary", 5)
