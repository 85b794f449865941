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
