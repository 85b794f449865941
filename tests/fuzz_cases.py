"""Hypothesis strategies for the RTL fuzz: whole networks described by a small JSON-able case.

A :class:`FuzzCase` names every structural choice (layer kinds, sizes, folds, which extremes the
weights, thresholds and requantizer shifts take, the images and the stall pattern); the bulk
values (random weights, pixels) come from its seed. Hypothesis shrinks the structure, and a
shrunk failure is kept as a regression by pasting its ``to_json()`` into ``REGRESSIONS`` of
tests/test_fuzz.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from helpers import centred_thresholds, random_images, random_layer
from hwgen.ir import MULTIPLIER_RANGE, SHIFT_RANGE, Conv2dLayer, DenseLayer, IntegerModel, MaxPool2dLayer
from hwgen.rtl.arith import divisors
from hwgen.rtl.network import Fold

#: (weights, output) of a hidden layer the RTL builds; the last layer gives scores.
HIDDEN_KINDS = (("binary", "threshold"), ("int8", "threshold"), ("int8", "requant"))
#: ... with k-bit activations and ternary or 2-bit weights (the head's weights come from the same draw).
LOW_BIT_KINDS = (("binary", "multithreshold"), ("ternary", "multithreshold"), ("int2", "multithreshold"),
                 ("ternary", "threshold"), ("int2", "threshold"))
WEIGHT_PATTERNS = ("random", "plus", "minus", "extreme")
#: Ternary and 2-bit weights may also be all zero (every row zero: the accumulator is the bias).
LOW_BIT_WEIGHT_PATTERNS = WEIGHT_PATTERNS + ("zero",)
THRESHOLD_PATTERNS = ("random", "low", "high", "ends")
SHIFT_PATTERNS = ("random", "low", "high")
IMAGE_PATTERNS = ("random", "zeros", "full")


@dataclass(frozen=True)
class LayerSpec:
    """One dense or convolution layer (a convolution may be followed by a 2x2 max-pool).

    A requantizing layer rounds half up (TFLite) or half to even (QONNX), and ``narrow`` clamps
    its output to 16 codes, as an imported 4-bit activation does. A multi-threshold layer gives
    ``act_bits``-bit levels.

    ``pe`` and ``simd`` index the layer's legal choices (taken modulo their number), so that
    every drawn case is buildable and shrinking goes towards the most folded layer.
    """

    width: int
    weights: str = "binary"
    output: str = "threshold"
    weight_pattern: str = "random"
    threshold_pattern: str = "random"
    shift_pattern: str = "random"
    rounding: str = "half_up"
    narrow: bool = False
    pe: int = 0
    simd: int = 0
    conv: bool = False
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    pool: bool = False
    act_bits: int = 2


@dataclass(frozen=True)
class FuzzCase:
    """A network, its folds, the images through it and the stall probabilities of both ends."""

    input_shape: tuple[int, ...]
    layers: tuple[LayerSpec, ...]
    images: int = 4
    image_pattern: str = "random"
    stall_in: float = 0.0
    stall_out: float = 0.0
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FuzzCase:
        fields = json.loads(text)
        return cls(**dict(fields, input_shape=tuple(fields["input_shape"]),
                          layers=tuple(LayerSpec(**layer) for layer in fields["layers"])))


def _with_weights(layer: DenseLayer, pattern: str, rng: np.random.Generator) -> DenseLayer:
    """All +1 / all −1 (binary) or all ±127 (int8), or int8 at ±127 with random signs; ternary and
    2-bit weights at +1, at their least value, at both with random signs, or all 0."""
    if pattern == "random" or (pattern == "extreme" and layer.weight_kind == "binary"):
        return layer
    shape = layer.weights.shape
    if layer.weight_kind == "binary":
        weights = np.full(shape, 1 if pattern == "plus" else 0, np.uint8)
    else:
        high = {"ternary": 1, "int2": 1}.get(layer.weight_kind, 127)
        low = {"ternary": -1, "int2": -2}.get(layer.weight_kind, -127)
        if pattern == "extreme":
            weights = np.where(rng.random(shape) < 0.5, high, low)
        else:
            weights = np.full(shape, {"plus": high, "minus": low, "zero": 0}[pattern])
        weights = weights.astype(np.int8)
    return dataclasses.replace(layer, weights=weights)


def _with_thresholds(layer: DenseLayer, pattern: str, rng: np.random.Generator) -> DenseLayer:
    """Thresholds where inputs land, at the accumulator's low end (always reached), one past its
    high end (never reached), or each at one end or the other; a multi-threshold layer's rows
    sorted."""
    lo, hi = layer.channel_acc_bounds
    shape = layer.thresholds.shape
    lo, hi = (lo[:, None], hi[:, None]) if len(shape) == 2 else (lo, hi)
    if pattern == "random":
        return layer
    if pattern == "low":
        thresholds = np.broadcast_to(lo, shape)
    elif pattern == "high":
        thresholds = np.broadcast_to(hi + 1, shape)
    else:
        thresholds = np.sort(np.where(rng.random(shape) < 0.5, lo, hi + 1), axis=-1)
    return dataclasses.replace(layer, thresholds=np.array(thresholds, np.int64))


def _with_shift(layer: DenseLayer, pattern: str) -> DenseLayer:
    """The requantizer's shift at its ends: the smallest scale (every output the zero point) or the
    largest multiplier and shift (every nonzero accumulator saturates)."""
    if pattern == "random":
        return layer
    channels = layer.out_features
    if pattern == "low":
        multiplier, shift = np.full(channels, MULTIPLIER_RANGE[0]), np.full(channels, SHIFT_RANGE[0])
    else:
        multiplier, shift = np.full(channels, MULTIPLIER_RANGE[1] - 1), np.full(channels, SHIFT_RANGE[1])
    requant = dataclasses.replace(layer.requant, multiplier=multiplier.astype(np.int64), shift=shift.astype(np.int64))
    return dataclasses.replace(layer, requant=requant)


def _dense(spec: LayerSpec, name: str, input_kind: str, n_in: int, rng: np.random.Generator) -> DenseLayer:
    layer = random_layer(rng, name, input_kind, spec.output, n_in, spec.width, spec.weights, spec.act_bits)
    layer = _with_weights(layer, spec.weight_pattern, rng)
    if spec.output in ("threshold", "multithreshold"):
        layer = _with_thresholds(layer, spec.threshold_pattern, rng)
    elif spec.output == "requant":
        layer = _with_shift(layer, spec.shift_pattern)
        requant = dataclasses.replace(layer.requant, rounding=spec.rounding)
        if spec.narrow:
            # An imported 4-bit activation: codes clamped to 16 values (signed: -8..7).
            low = 0 if requant.out_kind == "uint8" else -8
            requant = dataclasses.replace(requant, zero_point=low, lo=low, hi=low + 15)
        layer = dataclasses.replace(layer, requant=requant)
    return layer


def build_case(case: FuzzCase) -> tuple[IntegerModel, list[Fold], np.ndarray]:
    """The model, folds and uint8 images a case describes (deterministic in the case)."""
    rng = np.random.default_rng(case.seed)
    layers: list = []
    folds: list[Fold] = []
    shape, kind, incoming = case.input_shape, "uint8", None
    for index, spec in enumerate(case.layers):
        if spec.conv:
            dense = _dense(spec, f"conv{index}", kind, spec.kernel ** 2 * shape[2], rng)
            layer = Conv2dLayer(dense, shape, spec.kernel, spec.stride, spec.padding)
            receives = shape[2]
        else:
            dense = _dense(spec, f"dense{index}", kind, int(np.prod(shape)), rng)
            layer, receives = dense, incoming
        simd_choices = divisors(dense.in_features)
        if receives is not None:
            simd_choices = [d for d in simd_choices if d % receives == 0 or receives % d == 0]
        pe_choices = divisors(dense.out_features)
        folds.append(Fold(pe_choices[spec.pe % len(pe_choices)], simd_choices[spec.simd % len(simd_choices)]))
        layers.append(layer)
        kind, incoming = layer.output_type, 1 if spec.output in ("requant", "multithreshold") else folds[-1].pe
        shape = layer.out_shape if spec.conv else (layer.out_features,)
        if spec.pool:
            pool = MaxPool2dLayer(f"pool{index}", shape, 2, kind)
            layers.append(pool)
            shape, incoming = pool.out_shape, shape[2]
    images = random_images(rng, case.images, int(np.prod(case.input_shape)))
    if case.image_pattern != "random":
        images[:] = 0 if case.image_pattern == "zeros" else 255
    return IntegerModel(case.input_shape, tuple(layers)), folds, images


def _hidden_kind(draw, allow_int8: bool, low_bit: bool = False) -> tuple[str, str]:
    if low_bit:
        return draw(st.sampled_from(LOW_BIT_KINDS))
    return draw(st.sampled_from(HIDDEN_KINDS if allow_int8 else HIDDEN_KINDS[:1]))


def _head_weights(draw, mixed: bool, low_bit: bool) -> str:
    return draw(st.sampled_from(["binary", "ternary", "int2"] if low_bit else ["binary", "int8"] if mixed else ["binary"]))


def _layer_spec(draw, width: int, kinds: tuple[str, str], **geometry) -> LayerSpec:
    weights, output = kinds
    low_bit = weights in ("ternary", "int2") or output == "multithreshold"
    if low_bit:
        geometry["act_bits"] = draw(st.integers(2, 4))
    return LayerSpec(width=width, weights=weights, output=output,
                     weight_pattern=draw(st.sampled_from(LOW_BIT_WEIGHT_PATTERNS if low_bit else WEIGHT_PATTERNS)),
                     threshold_pattern=draw(st.sampled_from(THRESHOLD_PATTERNS)),
                     shift_pattern=draw(st.sampled_from(SHIFT_PATTERNS)),
                     rounding=draw(st.sampled_from(["half_up", "half_even"])), narrow=draw(st.booleans()),
                     pe=draw(st.integers(0, 11)), simd=draw(st.integers(0, 11)), **geometry)


def _run_spec(draw) -> dict:
    return dict(images=draw(st.integers(1, 10)), image_pattern=draw(st.sampled_from(IMAGE_PATTERNS)),
                stall_in=draw(st.sampled_from([0.0, 0.3, 0.7, 0.9])),
                stall_out=draw(st.sampled_from([0.0, 0.3, 0.7, 0.9])),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


@st.composite
def dense_cases(draw, mixed: bool, low_bit: bool = False) -> FuzzCase:
    """1–3 dense layers of odd and prime sizes; ``mixed``: int8 layers and requantizers too;
    ``low_bit``: k-bit activations from multi-threshold units, ternary and 2-bit weights."""
    depth = draw(st.integers(1, 3))
    n_in = draw(st.integers(1, 90))
    specs = [_layer_spec(draw, draw(st.integers(1, 40)), _hidden_kind(draw, mixed, low_bit)) for _ in range(depth - 1)]
    specs.append(_layer_spec(draw, draw(st.integers(2, 10)), (_head_weights(draw, mixed, low_bit), "scores")))
    return FuzzCase((n_in,), tuple(specs), **_run_spec(draw))


@st.composite
def conv_cases(draw, low_bit: bool = False) -> FuzzCase:
    """1–2 convolutions (kernel 1/2/3, stride 1/2, padding 0/1, a max-pool or not), then a dense head."""
    height, width, channels = draw(st.integers(3, 9)), draw(st.integers(3, 9)), draw(st.integers(1, 3))
    specs, shape = [], (height, width)
    for _ in range(draw(st.integers(1, 2))):
        kernel = draw(st.sampled_from([k for k in (1, 2, 3) if k <= min(shape)]))
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from([p for p in (0, 1) if p < kernel]))
        shape = tuple((size + 2 * padding - kernel) // stride + 1 for size in shape)
        pool = min(shape) >= 2 and draw(st.booleans())
        if pool:
            shape = tuple(size // 2 for size in shape)
        specs.append(_layer_spec(draw, draw(st.integers(1, 6)), _hidden_kind(draw, True, low_bit), conv=True,
                                 kernel=kernel, stride=stride, padding=padding, pool=pool))
    specs.append(_layer_spec(draw, draw(st.integers(2, 6)), (_head_weights(draw, True, low_bit), "scores")))
    return FuzzCase((height, width, channels), tuple(specs), **_run_spec(draw))
