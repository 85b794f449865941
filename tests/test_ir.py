"""The integer model: BN+sign folding against direct float evaluation, and the file format."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwgen.errors import UserError
from hwgen.ir import DenseLayer, IntegerModel, batchnorm_reference, signed_width
from hwgen.ir import fold_batchnorm_sign as fold_layer
from helpers import meta_edit as _meta_edit, random_model
from helpers import rewrite_model_file as _rewrite

EPS = 1e-5


def fold_batchnorm_sign(weights, input_kind, mean, var, eps, gamma, beta):
    folded = fold_layer(DenseLayer("t", input_kind, "threshold", np.asarray(weights, np.uint8)),
                        mean, var, eps, gamma, beta)
    return folded.weights, folded.thresholds


def direct_bits(weights, input_kind, x, mean, var, gamma, beta):
    """Reference: the bipolar dot product through float64 BN, then sign with sign(0) = +1."""
    w = weights.astype(np.float64) * 2 - 1
    xv = x.astype(np.float64) * 2 - 1 if input_kind == "bits" else x.astype(np.float64)
    z = xv @ w.T
    return (batchnorm_reference(z, mean, var, EPS, gamma, beta) >= 0).astype(np.uint8)


def folded_bits(weights, thresholds, input_kind, x):
    layer = DenseLayer("t", input_kind, "threshold", weights, thresholds)
    if input_kind == "bits":
        acc = (x[:, None, :] == weights[None, :, :]).sum(axis=2)
    else:
        acc = x.astype(np.int64) @ (weights.astype(np.int64) * 2 - 1).T
    return (acc >= layer.thresholds).astype(np.uint8)


def every_popcount_input(n: int) -> np.ndarray:
    """For weights of all ones, inputs with p = 0..N ones: every accumulator value once."""
    return np.tril(np.ones((n + 1, n), dtype=np.uint8), -1)[:, ::-1].copy()


def test_gamma_negative_inverts_row_and_matches_float():
    n = 12
    weights = np.ones((1, n), np.uint8)
    mean, var, gamma, beta = [np.array([v]) for v in (1.0, 4.0, -2.0, 0.5)]
    out_w, t = fold_batchnorm_sign(weights, "bits", mean, var, EPS, gamma, beta)
    assert out_w.tolist() == [[0] * n]          # row inverted, so hardware only compares >=
    x = every_popcount_input(n)
    assert folded_bits(out_w, t, "bits", x).tolist() == direct_bits(weights, "bits", x, mean, var, gamma, beta).tolist()
    # BN = -2 (z - 1)/sqrt(4+eps) + 0.5 >= 0  <=>  z <= 1.5  <=>  z in {.., 0} (z = 2p - 12, even)
    # <=> p <= 6 <=> p' = 12 - p >= 6
    assert t.tolist() == [6]


@pytest.mark.parametrize("beta, expected", [(0.0, 0), (3.0, 0), (-1e-9, 13), (-3.0, 13)])
def test_gamma_zero_is_constant(beta, expected):
    n = 12
    weights = np.ones((1, n), np.uint8)
    out_w, t = fold_batchnorm_sign(weights, "bits", [5.0], [1.0], EPS, [0.0], [beta])
    assert t.tolist() == [expected]             # T = 0: always 1; T = N + 1: always 0
    assert out_w.tolist() == weights.tolist()   # gamma = 0 is not inverted


def test_exact_tie_goes_to_plus_one():
    n = 10
    weights = np.ones((1, n), np.uint8)
    # mean = 2 hits z = 2p - 10 exactly at p = 6, where BN is exactly 0: sign(0) = +1.
    mean, var, gamma, beta = [np.array([v]) for v in (2.0, 1.0 - EPS, 3.0, 0.0)]
    x = every_popcount_input(n)
    z = 2 * np.arange(n + 1) - n
    assert batchnorm_reference(z.astype(float), mean, var, EPS, gamma, beta)[6] == 0.0
    out_w, t = fold_batchnorm_sign(weights, "bits", mean, var, EPS, gamma, beta)
    assert t.tolist() == [6]
    assert folded_bits(out_w, t, "bits", x)[6, 0] == 1
    assert folded_bits(out_w, t, "bits", x).tolist() == direct_bits(weights, "bits", x, mean, var, gamma, beta).tolist()


def test_exact_tie_with_negative_gamma():
    n = 10
    weights = np.ones((1, n), np.uint8)
    mean, var, gamma, beta = [np.array([v]) for v in (2.0, 1.0 - EPS, -3.0, 0.0)]
    x = every_popcount_input(n)
    out_w, t = fold_batchnorm_sign(weights, "bits", mean, var, EPS, gamma, beta)
    # BN >= 0 <=> z <= 2 <=> p <= 6 (tie at p = 6 counts as +1) <=> p' >= 4
    assert t.tolist() == [4]
    assert folded_bits(out_w, t, "bits", x).tolist() == direct_bits(weights, "bits", x, mean, var, gamma, beta).tolist()


@pytest.mark.parametrize("beta, gamma, expected", [
    (1e6, 1.0, 0), (-1e6, 1.0, 17), (1e6, -1.0, 0), (-1e6, -1.0, 17)])
def test_thresholds_clip_to_zero_and_n_plus_one(beta, gamma, expected):
    n = 16
    weights = np.ones((1, n), np.uint8)
    _, t = fold_batchnorm_sign(weights, "bits", [0.0], [1.0], EPS, [gamma], [beta])
    assert t.tolist() == [expected]


def test_uint8_input_thresholds_match_float_on_extremes_and_ties():
    rng = np.random.default_rng(3)
    n, channels = 9, 64
    weights = rng.integers(0, 2, (channels, n)).astype(np.uint8)
    mean = rng.integers(-1500, 1500, channels).astype(np.float64)   # integer means: exact ties occur
    var = np.full(channels, 1.0 - EPS)
    gamma = rng.choice([-2.0, -0.5, 0.0, 0.5, 2.0], channels)
    beta = np.where(rng.random(channels) < 0.5, 0.0, rng.normal(0, 3, channels))
    out_w, t = fold_batchnorm_sign(weights, "uint8", mean, var, EPS, gamma, beta)
    x = np.concatenate([rng.integers(0, 256, (4000, n)), np.zeros((1, n)), np.full((1, n), 255)]).astype(np.uint8)
    lo, hi = DenseLayer("t", "uint8", "threshold", out_w).channel_acc_bounds
    assert np.all((t >= lo) & (t <= hi + 1))
    assert np.array_equal(folded_bits(out_w, t, "uint8", x), direct_bits(weights, "uint8", x, mean, var, gamma, beta))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), mean=st.floats(-50, 50), var=st.floats(1e-4, 100),
       gamma=st.sampled_from([-3.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0]) | st.floats(-5, 5),
       beta=st.floats(-20, 20), seed=st.integers(0, 2**16))
def test_fold_equals_float_bn_sign_for_every_popcount(n, mean, var, gamma, beta, seed):
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 2, (1, n)).astype(np.uint8)
    params = [np.array([v]) for v in (mean, var, gamma, beta)]
    out_w, t = fold_batchnorm_sign(weights, "bits", params[0], params[1], EPS, params[2], params[3])
    assert 0 <= t[0] <= n + 1
    # Inputs that agree with the weights in exactly p places, for every p.
    x = np.array([np.where(np.arange(n) < p, weights[0], 1 - weights[0]) for p in range(n + 1)], np.uint8)
    assert np.array_equal(folded_bits(out_w, t, "bits", x), direct_bits(weights, "bits", x, *params))


def test_signed_width():
    assert [signed_width(0, 1), signed_width(-1, 0), signed_width(0, 255), signed_width(-256, 255),
            signed_width(-257, 0)] == [2, 1, 9, 9, 10]


def test_accumulator_bounds_come_from_the_weights():
    weights = np.array([[1, 1, 0], [0, 0, 0]], np.uint8)
    layer = DenseLayer("d", "uint8", "scores", weights)
    lo, hi = layer.channel_acc_bounds
    assert lo.tolist() == [-255, -765] and hi.tolist() == [510, 0]
    assert (layer.acc_min, layer.acc_max, layer.output_bits) == (-765, 510, 11)


# --- file format -----------------------------------------------------------------------------

@pytest.fixture
def model():
    return random_model(np.random.default_rng(0), [20, 8, 6, 3])


def test_round_trip(tmp_path, model):
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = IntegerModel.load(path)
    assert loaded.input_shape == model.input_shape
    for a, b in zip(loaded.layers, model.layers):
        assert (a.name, a.input_kind, a.output_kind) == (b.name, b.input_kind, b.output_kind)
        assert np.array_equal(a.weights, b.weights)
        assert (a.thresholds is None and b.thresholds is None) or np.array_equal(a.thresholds, b.thresholds)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("dense1.weights"), "array 'dense1.weights' is missing"),
    (lambda a: a.__setitem__("dense0.weights", a["dense0.weights"][:, :5]), "array 'dense0.weights' has shape (8, 5), expected (8, 20)"),
    (lambda a: a.__setitem__("dense0.weights", a["dense0.weights"] * 2), "array 'dense0.weights' must be uint8 bits"),
    (lambda a: a.__setitem__("dense1.thresholds", a["dense1.thresholds"] + 100), "array 'dense1.thresholds' lies outside"),
    (lambda a: a.__setitem__("meta", np.frombuffer(b"{not json", np.uint8)), "field 'meta' is not JSON"),
    (_meta_edit(lambda m: m.__setitem__("version", 99)), "field 'meta.version' is 99; this hwgen reads versions 1, 2"),
    (_meta_edit(lambda m: m.__setitem__("format", "onnx")), "field 'meta.format' is not 'hwgen-ir'"),
    (_meta_edit(lambda m: m["layers"][1].__setitem__("kind", "conv2d")), "field 'meta.layers[1].kind' is 'conv2d'"),
    (_meta_edit(lambda m: m["layers"][1].__setitem__("acc_max", 3)), "field 'meta.layers[1].acc_min/acc_max' disagree"),
    (_meta_edit(lambda m: m["layers"][2].__setitem__("in_features", 7)), "field 'meta.layers[2].in_features' is 7"),
    # Sizes are checked before an array is read: its stored size against its shape, its shape against memory.
    (lambda a: a.__setitem__("dense0.weights", np.zeros((4000, 4000), np.uint8)),
     "array 'dense0.weights' declares 16,000,128 bytes uncompressed, more than its shape allows (66,816)"),
    (_meta_edit(lambda m: m["layers"][0].__setitem__("out_features", 10 ** 12)),
     "array 'dense0.weights' would have shape (1000000000000, 20) (160,000,000,000,000 bytes), more than half"),
])
def test_bad_fields_are_named(tmp_path, model, mutate, message):
    path = tmp_path / "m.npz"
    _rewrite(path, model, mutate)
    with pytest.raises(UserError) as info:
        IntegerModel.load(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_version_1_files_still_load(tmp_path, model):
    """Version 1 (binary layers only) had no 'weights' field; such files keep loading."""
    def downgrade(meta):
        meta["version"] = 1
        for layer in meta["layers"]:
            del layer["weights"]
    path = tmp_path / "m.npz"
    _rewrite(path, model, _meta_edit(downgrade))
    loaded = IntegerModel.load(path)
    assert [layer.weight_kind for layer in loaded.layers] == ["binary"] * 3


def test_corrupt_and_truncated_files(tmp_path, model):
    path = tmp_path / "m.npz"
    model.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 10)
    for name in ("cut.npz", "junk.npz"):
        with pytest.raises(UserError, match=f"{name}: not a readable hwgen-ir file|{name}: corrupt archive"):
            IntegerModel.load(tmp_path / name)
    with pytest.raises(UserError, match="model file not found"):
        IntegerModel.load(tmp_path / "missing.npz")


def test_pickled_arrays_are_refused(tmp_path, model):
    path = tmp_path / "m.npz"
    _rewrite(path, model, lambda a: a.__setitem__("dense0.weights", np.array([object()], dtype=object)))
    with pytest.raises(UserError, match="dense0.weights"):
        IntegerModel.load(path)
    assert zipfile.is_zipfile(path)


def test_conv_and_pool_round_trip_and_geometry_errors(tmp_path):
    from hwgen.ir import Conv2dLayer, MaxPool2dLayer

    rng = np.random.default_rng(4)
    conv = Conv2dLayer(DenseLayer("c0", "uint8", "threshold", rng.integers(0, 2, (4, 9)).astype(np.uint8),
                                  np.zeros(4, np.int64)), (6, 6, 1), 3, 1, 1)
    pool = MaxPool2dLayer("p0", conv.out_shape, 2, "bits")
    head = DenseLayer("d0", "bits", "scores", rng.integers(0, 2, (3, pool.out_features)).astype(np.uint8))
    model = IntegerModel((6, 6), (conv, pool, head))
    path = tmp_path / "cnn.npz"
    model.save(path)
    loaded = IntegerModel.load(path)
    assert [type(layer).__name__ for layer in loaded.layers] == ["Conv2dLayer", "MaxPool2dLayer", "DenseLayer"]
    assert loaded.layers[0].out_shape == (6, 6, 4) and loaded.layers[1].out_shape == (3, 3, 4)
    assert np.array_equal(loaded.layers[0].weights, conv.weights)
    _rewrite(path, model, _meta_edit(lambda m: m["layers"][1].__setitem__("in_shape", [5, 6, 4])))
    with pytest.raises(UserError, match=r"field 'meta.layers\[1\].in_shape' is \[5, 6, 4\], the previous stage gives \[6, 6, 4\]"):
        IntegerModel.load(path)
