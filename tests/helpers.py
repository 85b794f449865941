"""Random integer models for tests (no torch)."""
from __future__ import annotations

import numpy as np

from hwgen.ir import DenseLayer, IntegerModel


def random_layer(rng: np.random.Generator, name: str, input_kind: str, output_kind: str,
                 n_in: int, n_out: int) -> DenseLayer:
    """Random ±1 weights; thresholds drawn over the whole legal range, both ends included."""
    weights = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8)
    layer = DenseLayer(name, input_kind, output_kind, weights)
    if output_kind == "scores":
        return layer
    lo, hi = layer.channel_acc_bounds
    # Most thresholds sit where random inputs land, so outputs vary; some sit at the clip ends.
    if input_kind == "bits":
        centre, spread = np.full(n_out, n_in // 2), max(1, n_in // 4)
    else:
        centre = 127 * (2 * weights.sum(axis=1).astype(np.int64) - n_in)
        spread = int(256 * np.sqrt(n_in))
    thresholds = np.clip(centre + rng.integers(-spread, spread + 1, n_out), lo, hi + 1)
    ends = rng.random(n_out)
    thresholds = np.where(ends < 0.08, lo, np.where(ends > 0.92, hi + 1, thresholds))
    return DenseLayer(name, input_kind, output_kind, weights, thresholds.astype(np.int64))


def random_model(rng: np.random.Generator, widths: list[int], input_kind: str = "uint8") -> IntegerModel:
    """A model with the given widths (input first): threshold layers, then a scores layer."""
    layers = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = index == len(widths) - 2
        layers.append(random_layer(rng, f"dense{index}", input_kind if index == 0 else "bits",
                                   "scores" if last else "threshold", n_in, n_out))
    return IntegerModel((widths[0],), tuple(layers))


def random_images(rng: np.random.Generator, count: int, features: int) -> np.ndarray:
    """uint8 images mixing uniform noise with saturated 0/255 pixels (the extremes matter)."""
    images = rng.integers(0, 256, (count, features)).astype(np.uint8)
    extremes = rng.random((count, features))
    images[extremes < 0.15] = 0
    images[extremes > 0.85] = 255
    return images
