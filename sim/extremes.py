"""Worst-case accumulators: inputs that drive a layer's accumulator to its declared bounds.

A layer inside a network sees only what the layers before it can produce, so its extremes are
reached in a *probe network*: the layer itself, in its own role (threshold, requantizer or
scores) and with its own fold, behind an identity stage that turns uint8 pixels into exactly the
inputs it needs (bits through thresholds at 128, int8 through a requantizer of scale 1), and
followed by a two-class head if it is not the output layer. A convolution is probed on a
K×K×C map, one window, so its real window and datapath are used.

For every output channel there are two images: one gives that channel's largest accumulator,
the other its smallest. A threshold layer's accumulator counts from ``-T``, so the bound it must
hold is ``acc_max - T_min`` and ``acc_min - T_max``: the channel with the smallest (largest)
threshold at its largest (smallest) accumulator, which these images include. A wrap at either
end flips the threshold bit or the requantizer's saturation, and the probed outputs show it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hwgen import golden
from hwgen.ir import Conv2dLayer, DenseLayer, IntegerModel, MULTIPLIER_RANGE, Requant
from hwgen.rtl.arith import divisors
from hwgen.rtl.network import Fold, compute_layers

#: The identity stage's threshold: pixels 0 and 255 become bits 0 and 1.
BIT_THRESHOLD = 128


def extreme_inputs(layer: DenseLayer) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the input values giving its largest and its smallest accumulator:
    two ``(out_features, in_features)`` arrays (bits as 0/1 for bit inputs)."""
    if layer.input_kind == "bits":
        ones = layer.weights.astype(np.int64) if layer.is_popcount else (layer.weight_values > 0).astype(np.int64)
        return ones, 1 - ones
    low, high = {"uint8": (0, 255), "int8": (-128, 127)}[layer.input_kind]
    positive = layer.weight_values > 0
    return np.where(positive, high, low), np.where(positive, low, high)


def _identity(name: str, input_kind: str, size: int) -> DenseLayer:
    """uint8 pixels to ``input_kind`` values, element for element."""
    weights = np.eye(size, dtype=np.int8)
    if input_kind == "bits":
        return DenseLayer(name, "uint8", "threshold", weights, np.full(size, BIT_THRESHOLD, np.int64), "int8")
    # acc = pixel - 128; a multiplier of 2**30 with shift 1 scales by exactly 1.
    requant = Requant(np.full(size, MULTIPLIER_RANGE[0], np.int64), np.ones(size, np.int64), 0, "int8", -128, 127)
    return DenseLayer(name, "uint8", "requant", weights, None, "int8", np.full(size, -128, np.int64), requant)


def _pixels(values: np.ndarray, input_kind: str) -> np.ndarray:
    if input_kind == "bits":
        return (values * 255).astype(np.uint8)
    return (values + (128 if input_kind == "int8" else 0)).astype(np.uint8)


def _largest_divisor(n: int, limit: int, compatible_with: int | None = None) -> int:
    choices = [d for d in divisors(n) if d <= limit
               and (compatible_with is None or d % compatible_with == 0 or compatible_with % d == 0)]
    return max(choices or [1])


@dataclasses.dataclass(frozen=True)
class AccumulatorProbe:
    """A probe network for one layer, its folds, its images (per channel: largest, then smallest)
    and the accumulator values golden gives on them."""

    layer: str
    model: IntegerModel
    folds: list[Fold]
    images: np.ndarray
    accumulators: np.ndarray

    def reaches_bounds(self, layer: DenseLayer) -> bool:
        """Whether every channel reached both of its declared accumulator bounds."""
        lo, hi = layer.channel_acc_bounds
        channels = np.arange(layer.out_features)
        return bool(np.array_equal(self.accumulators[0::2][channels, channels], hi)
                    and np.array_equal(self.accumulators[1::2][channels, channels], lo))


def accumulator_probe(model: IntegerModel, folds: list[Fold], name: str) -> AccumulatorProbe:
    """The probe network and worst-case images for the dense or convolution layer ``name``."""
    layers = compute_layers(model)
    position = [layer.name for layer in layers].index(name)
    target, fold = layers[position], folds[position]
    conv = isinstance(target, Conv2dLayer)
    dense = target.dense if conv else target
    high, low = extreme_inputs(dense)
    values = np.stack([high, low], axis=1).reshape(2 * dense.out_features, dense.in_features)
    pixels = _pixels(values, dense.input_kind)
    if conv:
        shape = (target.kernel, target.kernel, target.in_shape[2])
        tested = Conv2dLayer(dense, shape, target.kernel, 1, 0)
    else:
        # A dense layer's input arrives as a column of one-channel pixels, so that the identity
        # stage is a 1x1 convolution of one weight, whatever the layer's width.
        shape, tested = (dense.in_features, 1, 1), dense
    probe_layers, probe_folds = [], []
    needs_identity = dense.input_kind != "uint8"
    if needs_identity:
        channels = shape[2]
        identity = _identity("probe_identity", dense.input_kind, channels)
        probe_layers.append(Conv2dLayer(identity, shape, 1, 1, 0))
        probe_folds.append(Fold(_largest_divisor(channels, 32), _largest_divisor(channels, 32)))
    probe_layers.append(tested)
    probe_folds.append(fold)
    if target.output_kind != "scores":
        rng = np.random.default_rng(0)
        head = DenseLayer("probe_head", target.output_type, "scores",
                          rng.integers(0, 2, (2, dense.out_features)).astype(np.uint8), None, "binary")
        probe_layers.append(head)
        probe_folds.append(Fold(2, _largest_divisor(dense.out_features, 32, fold.pe)))
    probe = IntegerModel(shape if conv or needs_identity else (dense.in_features,), tuple(probe_layers))
    index = len(probe_layers) - (2 if target.output_kind != "scores" else 1)
    result = golden.run(probe, pixels)
    before = pixels if index == 0 else result.outputs[index - 1]
    accumulators = golden.accumulate(dense, np.asarray(before).reshape(len(pixels), -1))
    return AccumulatorProbe(name, probe, probe_folds, pixels, accumulators)
