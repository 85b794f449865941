"""Golden model against a plain per-image evaluation of the integer contract."""
from __future__ import annotations

import numpy as np
import pytest

from hwgen import golden
from hwgen.errors import UserError
from helpers import random_images, random_model


def naive_run(model, images):
    outputs, x = [], images.astype(np.int64)
    for layer in model.layers:
        w = layer.weights.astype(np.int64)
        if layer.input_kind == "bits":
            acc = np.array([[int(np.sum(1 - (xi ^ wr))) for wr in w] for xi in x])
        else:
            acc = np.array([[int(np.sum(xi * (2 * wr - 1))) for wr in w] for xi in x])
        x = (acc >= layer.thresholds).astype(np.int64) if layer.output_kind == "threshold" else acc
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("widths", [[64, 32, 10], [65, 70, 129, 7], [8, 1, 3], [200, 3]])
def test_golden_equals_naive(widths):
    rng = np.random.default_rng(sum(widths))
    model = random_model(rng, widths)
    images = random_images(rng, 40, widths[0])
    result = golden.run(model, images)
    for got, want in zip(result.outputs, naive_run(model, images)):
        assert np.array_equal(got, want)
    assert np.array_equal(result.classes, np.argmax(naive_run(model, images)[-1], axis=1))


def test_popcount_crosses_word_boundaries():
    rng = np.random.default_rng(1)
    for n in (1, 63, 64, 65, 127, 128, 200):
        x = rng.integers(0, 2, (5, n)).astype(np.uint8)
        w = rng.integers(0, 2, (3, n)).astype(np.uint8)
        want = (x[:, None, :] == w[None, :, :]).sum(axis=2)
        assert np.array_equal(golden.popcount_xnor(x, w), want)


def test_argmax_ties_go_to_lowest_index():
    scores = np.array([[3, 5, 5, 1], [7, 7, 7, 7], [-2, -1, -1, -3]])
    assert golden.argmax_lowest(scores).tolist() == [1, 0, 1]


def test_bad_images_are_refused():
    model = random_model(np.random.default_rng(0), [16, 4, 2])
    with pytest.raises(UserError, match="images have 15 pixels, the model expects 16"):
        golden.run(model, np.zeros((2, 15), np.uint8))
    with pytest.raises(UserError, match="images must be uint8"):
        golden.run(model, np.zeros((2, 16), np.float32))


def naive_conv(maps, weights, kernel, stride, padding, pad_value=0):
    """Direct loops over output pixels: weights (C_out, K*K*C) in (ky, kx, c) order."""
    images, height, width, channels = maps.shape
    padded = np.full((images, height + 2 * padding, width + 2 * padding, channels), pad_value, np.int64)
    padded[:, padding:padding + height, padding:padding + width] = maps
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    out = np.zeros((images, out_h, out_w, len(weights)), np.int64)
    for y in range(out_h):
        for x in range(out_w):
            patch = padded[:, y * stride:y * stride + kernel, x * stride:x * stride + kernel, :].reshape(images, -1)
            out[:, y, x] = patch @ weights.T
    return out


@pytest.mark.parametrize("kernel, stride, padding, size", [(3, 1, 1, 7), (5, 2, 0, 9), (1, 1, 0, 4), (3, 2, 1, 8)])
def test_conv_and_pool_equal_direct_loops(kernel, stride, padding, size):
    from hwgen.ir import Conv2dLayer, DenseLayer, IntegerModel, MaxPool2dLayer

    rng = np.random.default_rng(kernel * 10 + stride)
    c_in, c_out = 3, 4
    w_int8 = rng.integers(-127, 128, (c_out, kernel * kernel * c_in)).astype(np.int8)
    conv0 = Conv2dLayer(DenseLayer("c0", "uint8", "threshold", w_int8,
                                   np.zeros(c_out, np.int64), "int8"), (size, size, c_in), kernel, stride, padding)
    h, w, _ = conv0.out_shape
    w_bits = rng.integers(0, 2, (5, 9 * c_out)).astype(np.uint8)
    conv1 = Conv2dLayer(DenseLayer("c1", "bits", "threshold", w_bits,
                                   np.full(5, 9 * c_out // 2, np.int64)), (h, w, c_out), 3, 1, 1)
    pool = MaxPool2dLayer("p", conv1.out_shape, 2, "bits")
    head = DenseLayer("d", "bits", "scores", rng.integers(0, 2, (3, pool.out_features)).astype(np.uint8))
    model = IntegerModel((size, size, c_in), (conv0, conv1, pool, head))
    images = rng.integers(0, 256, (6, size, size, c_in)).astype(np.uint8)
    result = golden.run(model, images)
    acc0 = naive_conv(images.astype(np.int64), w_int8.astype(np.int64), kernel, stride, padding)
    bits0 = (acc0 >= 0).astype(np.int64)
    assert np.array_equal(result.outputs[0], bits0.reshape(6, -1))
    # Binary conv: padding is bit 0 = -1; the bipolar sum gives popcount = (z + N) / 2.
    z1 = naive_conv(2 * bits0 - 1, 2 * w_bits.astype(np.int64) - 1, 3, 1, 1, pad_value=-1)
    bits1 = ((z1 + 9 * c_out) // 2 >= 9 * c_out // 2).astype(np.int64)
    assert np.array_equal(result.outputs[1], bits1.reshape(6, -1))
    ph, pw = bits1.shape[1] // 2, bits1.shape[2] // 2
    pooled = np.zeros((6, ph, pw, 5), np.int64)
    for y in range(ph):
        for x in range(pw):
            pooled[:, y, x] = bits1[:, 2 * y:2 * y + 2, 2 * x:2 * x + 2].max(axis=(1, 2))
    assert np.array_equal(result.outputs[2], pooled.reshape(6, -1))
