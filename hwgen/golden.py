"""NumPy golden model of the integer model: every layer's integer output, vectorized.

XNOR-popcount layers and k-bit activations on binary, ternary or int2 weights use bit-packed words
(64 bits each) and popcounts; every other layer uses a float64 matrix product, which is exact
because every partial sum is an integer below 2**53 (accumulators fit int32). Requantization is done in int64 exactly as the contract writes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .ir import LOW_BIT_ACTIVATIONS, Conv2dLayer, DenseLayer, IntegerModel, MaxPool2dLayer

_CHUNK = 512  # images per block: bounds the (images x channels x words) XOR temporary
_PLANE_ROWS = 1 << 15  # input rows per block of bit planes (bitplane_dot)


@dataclass(frozen=True)
class GoldenResult:
    """Per-layer integer outputs for a batch of images.

    Attributes
    ----------
    outputs : list of numpy.ndarray
        One ``(images, out_features)`` array per layer: uint8 bits for threshold layers, int64
        values for requantized layers, int64 scores for the output layer.
    classes : numpy.ndarray
        The argmax of the scores, ties to the lowest index.
    """

    outputs: list[np.ndarray]
    classes: np.ndarray

    @property
    def scores(self) -> np.ndarray:
        return self.outputs[-1]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack the last axis of a 0/1 array into little-endian uint64 words (zero padded)."""
    packed = np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")
    pad = (-packed.shape[-1]) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(packed.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.uint64)


def _word_popcounts(x_words: np.ndarray, w_words: np.ndarray, combine) -> np.ndarray:
    """``popcount(combine(x, w))`` of packed words for every row pair: shape ``(rows of x, rows of w)``,
    ``_CHUNK`` rows of ``x`` at a time."""
    result = np.empty((len(x_words), len(w_words)), dtype=np.int64)
    for start in range(0, len(x_words), _CHUNK):
        block = combine(x_words[start:start + _CHUNK, None, :], w_words[None, :, :])
        result[start:start + _CHUNK] = np.bitwise_count(block).sum(axis=-1, dtype=np.int64)
    return result


def popcount_xnor(x_bits: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
    """``popcount(XNOR(x, w))`` for every image and weight row: shape ``(images, rows)``.

    Padding bits are zero in both operands, so they never count as mismatches, and the popcount
    is ``N - popcount(x XOR w)``.
    """
    return x_bits.shape[1] - _word_popcounts(pack_bits(x_bits), pack_bits(w_bits), np.bitwise_xor)


def weight_planes(layer: DenseLayer) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The weights as ``sum(c * plane) + c0``: ``([(c, 0/1 plane), ...], c0)``.

    Binary ``w = 2b - 1``; ternary ``w = [w > 0] - [w < 0]`` (a nonzero mask and a sign, as the
    hardware stores them, give the same two planes); int2 two's complement ``w = b0 - 2 b1``.
    """
    if layer.weight_kind == "binary":
        return [(2, layer.weights.astype(np.uint8))], -1
    w = layer.weights.astype(np.int64)
    if layer.weight_kind == "ternary":
        return [(1, (w > 0).astype(np.uint8)), (-1, (w < 0).astype(np.uint8))], 0
    if layer.weight_kind == "int2":
        return [(1, (w & 1).astype(np.uint8)), (-2, ((w >> 1) & 1).astype(np.uint8))], 0
    raise ValueError(f"{layer.name}: {layer.weight_kind} weights have no bit-plane form")


def bitplane_dot(layer: DenseLayer, x: np.ndarray) -> np.ndarray:
    """``sum(x * w)`` for k-bit unsigned inputs by bit-plane popcounts, as the hardware lanes do.

    ``sum_i x_i w_i = sum_b 2**b (sum_p c_p popcount(x_b AND plane_p) + c0 popcount(x_b))`` with the
    planes of :func:`weight_planes`; ``popcount(x_b)`` is shared by every output channel.
    """
    planes, constant = weight_planes(layer)
    packed_planes = [(coefficient, pack_bits(plane)) for coefficient, plane in planes]
    acc = np.zeros((len(x), layer.out_features), dtype=np.int64)
    # Rows (images, or a convolution's windows of every image) a block at a time: the planes of a
    # whole test set's windows would not fit in memory (a 10,000-image CNN took 21 GB at once).
    for start in range(0, len(x), _PLANE_ROWS):
        rows = np.asarray(x[start:start + _PLANE_ROWS]).astype(np.uint8)
        block = acc[start:start + _PLANE_ROWS]
        for bit in range(layer.input_bits):
            x_plane = (rows >> bit) & 1
            x_words = pack_bits(x_plane)
            terms = sum(coefficient * _word_popcounts(x_words, words, np.bitwise_and)
                        for coefficient, words in packed_planes)
            if constant:
                terms = terms + constant * x_plane.sum(axis=1, dtype=np.int64)[:, None]
            block += terms << bit
    return acc


def accumulate(layer: DenseLayer, x: np.ndarray) -> np.ndarray:
    """The layer's integer accumulator for each image: popcount, or ``sum(x * w) + bias``.

    k-bit inputs (``uint2`` to ``uint4``) on binary, ternary or int2 weights go through bit-plane
    popcounts (:func:`bitplane_dot`); other combinations through an exact float64 product.
    """
    if layer.is_popcount:
        return popcount_xnor(x, layer.weights)
    if layer.input_kind in LOW_BIT_ACTIVATIONS and layer.weight_kind != "int8":
        return bitplane_dot(layer, x) + layer.bias_values
    values = x.astype(np.float64) * 2 - 1 if layer.input_kind == "bits" else x.astype(np.float64)
    return np.rint(values @ layer.weight_values.T.astype(np.float64)).astype(np.int64) + layer.bias_values


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, zero_point: int,
               lo: int, hi: int, rounding: str = "half_up") -> np.ndarray:
    """``clamp(round(acc * M0 / 2**(31 - s)) + z_out, lo, hi)`` in int64, per channel.

    ``rounding="half_up"`` is TFLite's ``((acc * M0) + 2**(30 - s)) >> (31 - s)``; ``"half_even"``
    sends an exact tie to the even neighbour (QONNX ``ROUND``). ``acc`` fits int32 and
    ``M0 < 2**31``, so ``acc * M0`` and the rounding term fit int64; ``>>`` on int64 is an
    arithmetic (floor) shift.
    """
    right = (31 - np.asarray(shift, dtype=np.int64))
    product = np.asarray(acc, dtype=np.int64) * np.asarray(multiplier, dtype=np.int64)
    half = np.int64(1) << (right - 1)
    floor = product >> right
    remainder = product - (floor << right)
    if rounding == "half_even":
        up = (remainder > half) | ((remainder == half) & (floor & 1 == 1))
    else:
        up = remainder >= half
    return np.clip(floor + up + zero_point, lo, hi)


def layer_output(layer: DenseLayer, acc: np.ndarray) -> np.ndarray:
    """What a layer passes on, given its accumulators: bits, requantized bytes, or the scores."""
    if layer.output_kind == "threshold":
        return (acc >= layer.thresholds[None, :]).astype(np.uint8)
    if layer.output_kind == "multithreshold":
        return multithreshold(acc, layer.thresholds)
    if layer.output_kind == "requant":
        q = layer.requant
        return requantize(acc, q.multiplier[None, :], q.shift[None, :], q.zero_point, q.lo, q.hi, q.rounding)
    return acc


def multithreshold(acc: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per channel, how many of its ascending thresholds ``acc`` reaches: ``(images, channels)`` int64.

    ``thresholds`` is ``(channels, levels)``; the count is ``sum_j [acc >= T_cj]``, FINN's
    MultiThreshold with output scale 1 and bias 0.
    """
    counts = np.zeros(acc.shape, dtype=np.int64)
    for level in range(thresholds.shape[1]):
        counts += acc >= thresholds[None, :, level]
    return counts


def argmax_lowest(scores: np.ndarray) -> np.ndarray:
    """Class index per row; ``np.argmax`` returns the first maximum, i.e. ties go to the lowest index."""
    return np.argmax(scores, axis=1)


def windows(maps: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """Every K×K window of ``(images, H, W, C)`` maps, padded with 0: ``(images, Ho, Wo, K*K*C)``.

    Window elements are in ``(ky, kx, c)`` order, the order the conv weights use.
    """
    padded = np.pad(maps, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    view = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(1, 2))
    view = view[:, ::stride, ::stride]                       # (images, Ho, Wo, C, K, K)
    return np.ascontiguousarray(view.transpose(0, 1, 2, 4, 5, 3)).reshape(*view.shape[:3], -1)


def _layer(layer, x: np.ndarray) -> np.ndarray:
    """One layer on flattened inputs ``(images, in_features)``; returns flattened outputs."""
    if isinstance(layer, DenseLayer):
        return layer_output(layer, accumulate(layer, x))
    maps = x.reshape(len(x), *layer.in_shape)
    if isinstance(layer, MaxPool2dLayer):
        k = layer.kernel
        height, width, channels = layer.out_shape
        cropped = maps[:, :height * k, :width * k]
        return cropped.reshape(len(x), height, k, width, k, channels).max(axis=(2, 4)).reshape(len(x), -1)
    patches = windows(maps, layer.kernel, layer.stride, layer.padding)
    flat = patches.reshape(-1, patches.shape[-1])
    return layer_output(layer.dense, accumulate(layer.dense, flat)).reshape(len(x), -1)


def run(model: IntegerModel, images: np.ndarray) -> GoldenResult:
    """Run uint8 images (``(images, features)`` or ``(images, *input_shape)``) through the model."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {x.dtype}")
    x = x.reshape(len(x), -1)
    if x.shape[1] != model.in_features:
        raise UserError(f"images have {x.shape[1]} pixels, the model expects {model.in_features} "
                        f"(input shape {list(model.input_shape)})")
    outputs = []
    for layer in model.layers:
        x = _layer(layer, x)
        outputs.append(x)
    return GoldenResult(outputs, argmax_lowest(outputs[-1]))
