"""The integer model (IR): integers only, a versioned file format, and the BN+sign fold.

Everything downstream (golden model, RTL, simulation, board builds) reads this and
nothing else; nothing here imports torch.

File format ``hwgen-ir`` version 4 (versions 1 to 3 still load)
---------------------------------------------------------------
A NumPy ``.npz`` archive, loaded with ``allow_pickle=False``:

``meta``
    uint8 array holding UTF-8 JSON::

        {"format": "hwgen-ir", "version": 4,
         "input": {"shape": [28, 28], "dtype": "uint8", "quantizer": {...}},   # quantizer: optional
         "output": {"scale": 0.5, "offset": -392.0},                           # optional
         "layers": [{"name": "dense0", "kind": "dense", "weights": "int8", "input": "uint8",
                     "output": "requant", "in_features": 784, "out_features": 256,
                     "acc_min": -3178496, "acc_max": 3229127,
                     "requant": {"zero_point": 0, "out": "uint8", "lo": 0, "hi": 255}}, ...],
         "info": {...free-form provenance: dataset, accuracies...}}

``<layer>.weights``
    shape ``(out_features, in_features)``: uint8 bits (1 is +1, 0 is -1) for ``"weights": "binary"``,
    int8 in ``[-127, 127]`` for ``"weights": "int8"``, in ``[-1, 1]`` for ``"ternary"``, in
    ``[-2, 1]`` for ``"int2"``.
``<layer>.bias``
    int64 per output channel (int8 layers; absent means zero). Input zero points are folded in.
``<layer>.thresholds``
    int64 per output channel for ``output == "threshold"``; int64 ``(out_features, 2**k - 1)``,
    each row non-decreasing, for ``output == "multithreshold"``.
``<layer>.multiplier``, ``<layer>.shift``
    int64 per output channel; only for ``output == "requant"``: ``M0`` in ``[2**30, 2**31)``,
    ``s`` in ``[-31, 30]``.

Layer semantics (the integer contract of DESIGN.md):

* input ``"bits"`` are bipolar values (bit 1 is +1, bit 0 is -1); ``"uint8"``/``"int8"`` are plain
  integers (zero points live in the bias).
* binary weights on bit inputs accumulate ``p = popcount(XNOR(x, w))`` in ``[0, N]``; every other
  combination accumulates ``acc = sum(x_i * w_i) + bias`` in a signed accumulator.
* output ``"threshold"``: bit ``acc >= T_c``. ``"requant"``: TFLite's single rounding,
  ``clamp(((acc * M0) + 2**(30 - s)) >> (31 - s) + z_out, lo, hi)``, ReLU being ``lo = z_out``.
  ``"scores"``: the raw accumulator per class; the class is the argmax, ties to the lowest index.

Version 4 adds what lies between 1 and 8 bits: ``"uint2"`` to ``"uint4"`` inputs (k-bit unsigned
activations), ``"ternary"`` and ``"int2"`` weights, and ``"multithreshold"`` outputs with
``"out": "uintk"``: the output is ``sum_j [acc >= T_cj]`` over the channel's ``2**k - 1``
thresholds (FINN's MultiThreshold). A k-bit input ``x`` on ternary or int2 weights accumulates
``sum(x_i * w_i) + bias`` like any non-popcount layer (the golden model computes it from
bit-plane popcounts, the hardware from selected and complemented inputs; both exactly). Weights
are stored as int8 values; ternary rows hold -1, 0, +1, int2 rows -2 to 1.

Version 3 adds ``requant.rounding`` (``"half_up"``, TFLite's and the default, or ``"half_even"``,
QONNX's ``ROUND``), and the host-side records of imported models: ``input.quantizer`` (the float
-> code rule of the source model's input quantizer, :class:`InputQuantizer`) and ``output`` (the
float value of one unit of score, :class:`OutputScale`). Neither is used by the golden model or
the RTL, which see integers only.

``acc_min``/``acc_max`` are the accumulator's bounds over every possible input, computed from the
weights and bias; they size the hardware accumulators, must fit int32, and are checked on load.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT_NAME = "hwgen-ir"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ROUNDING_MODES = ("half_up", "half_even")
#: Unsigned activations of fewer than 8 bits (version 4): the output of a multi-threshold layer.
LOW_BIT_ACTIVATIONS = {f"uint{bits}": bits for bits in (2, 3, 4)}
INPUT_KINDS = ("uint8", "int8", "bits", *LOW_BIT_ACTIVATIONS)
WEIGHT_KINDS = ("binary", "int8", "ternary", "int2")
OUTPUT_KINDS = ("threshold", "requant", "scores", "multithreshold")
#: Value range of each input kind; bits are the bipolar values they stand for.
INPUT_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "bits": (-1, 1),
                **{kind: (0, (1 << bits) - 1) for kind, bits in LOW_BIT_ACTIVATIONS.items()}}
#: Value range of each weight kind stored as int8 values (binary weights are stored as bits).
WEIGHT_RANGES = {"int8": (-127, 127), "ternary": (-1, 1), "int2": (-2, 1)}
#: Bits of one weight in hardware: a sign bit, int8's byte, and two bit-planes for ternary
#: (nonzero mask, sign) and int2 (two's complement).
WEIGHT_BITS = {"binary": 1, "int8": 8, "ternary": 2, "int2": 2}
QUANT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
INT8_WEIGHT_LIMIT = 127
SHIFT_RANGE = (-31, 30)
MULTIPLIER_RANGE = (1 << 30, 1 << 31)
ACC_LIMIT = 1 << 31


@dataclass(frozen=True, eq=False)
class Requant:
    """Per-channel requantization to int8/uint8 (TFLite single rounding).

    Parameters
    ----------
    multiplier : numpy.ndarray
        int64 ``M0`` per channel in ``[2**30, 2**31)``.
    shift : numpy.ndarray
        int64 ``s`` per channel in ``[-31, 30]``; the right shift is ``31 - s``.
    zero_point : int
        Output zero point ``z_out``.
    out_kind : str
        ``"uint8"`` or ``"int8"``.
    lo, hi : int
        Clamp bounds inside the output type's range; ReLU is ``lo = zero_point``.
    rounding : str
        ``"half_up"`` (TFLite: ``+ 2**(30 - s)`` then an arithmetic shift) or ``"half_even"``
        (an exact tie goes to the even neighbour, as QONNX's ``ROUND`` and NumPy's ``round``).
    """

    multiplier: np.ndarray
    shift: np.ndarray
    zero_point: int
    out_kind: str
    lo: int
    hi: int
    rounding: str = "half_up"

    def header(self) -> dict:
        return {"zero_point": int(self.zero_point), "out": self.out_kind, "lo": int(self.lo), "hi": int(self.hi),
                "rounding": self.rounding}


@dataclass(frozen=True)
class InputQuantizer:
    """How a host turns the source model's float inputs into the uint8 codes the hardware takes.

    The float input, reshaped to ``tensor_shape`` (the quantizer's input, batch axis first), passes
    ``preprocess`` (``(op, constant)`` pairs, ``op`` one of ``Mul``, ``Div``, ``Add``, ``Sub``, each
    in float32 as the source graph computes it), then the source quantizer:
    ``q = clip(round_half_even(x / scale + zero_point), q_min, q_max)`` (``bits == 1``: bipolar,
    ``q = x >= 0``). The hardware code is ``q + code_offset`` (so that signed codes are uint8),
    laid out channels innermost: NCHW tensors become ``(H, W, C)``.
    """

    scale: float
    zero_point: int
    bits: int
    signed: bool
    narrow: bool
    code_offset: int
    tensor_shape: tuple[int, ...]
    preprocess: tuple[tuple[str, float], ...] = ()

    @property
    def code_range(self) -> tuple[int, int]:
        """The source quantizer's integer range ``(q_min, q_max)``."""
        if self.bits == 1:
            return (0, 1)
        if self.signed:
            return (-(1 << (self.bits - 1)) + int(self.narrow), (1 << (self.bits - 1)) - 1)
        return (0, (1 << self.bits) - 1 - int(self.narrow))

    def codes(self, inputs: np.ndarray) -> np.ndarray:
        """uint8 hardware codes, ``(images, features)``, of float inputs ``(images, ...)``."""
        x = np.asarray(inputs, dtype=np.float32)
        per_image = int(np.prod(self.tensor_shape[1:]))
        if x.size % per_image or x.ndim < 1:
            raise UserError(f"float inputs of shape {list(x.shape)} do not divide into the model's input "
                            f"{list(self.tensor_shape[1:])}")
        x = x.reshape(-1, *self.tensor_shape[1:])
        for op, constant in self.preprocess:
            c = np.float32(constant)
            x = {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](x, c)
        if self.bits == 1:
            q = (x >= 0).astype(np.int64)
        else:
            q_min, q_max = self.code_range
            y = np.clip(x / np.float32(self.scale) + np.float32(self.zero_point), q_min, q_max)
            q = np.round(y).astype(np.int64)
        if q.ndim == 4:
            q = q.transpose(0, 2, 3, 1)
        return (q + self.code_offset).reshape(len(q), -1).astype(np.uint8)

    def header(self) -> dict:
        return {"scale": float(self.scale), "zero_point": int(self.zero_point), "bits": int(self.bits),
                "signed": bool(self.signed), "narrow": bool(self.narrow), "code_offset": int(self.code_offset),
                "tensor_shape": [int(v) for v in self.tensor_shape],
                "preprocess": [[op, float(c)] for op, c in self.preprocess]}

    @classmethod
    def from_header(cls, fields: dict) -> "InputQuantizer":
        return cls(float(fields["scale"]), int(fields["zero_point"]), int(fields["bits"]), bool(fields["signed"]),
                   bool(fields["narrow"]), int(fields["code_offset"]), tuple(int(v) for v in fields["tensor_shape"]),
                   tuple((str(op), float(c)) for op, c in fields["preprocess"]))


@dataclass(frozen=True)
class OutputScale:
    """The source model's float outputs from the integer scores: ``scale * score + offset``.

    ``scale`` is positive, one for all classes, so the scores rank the classes as the floats do.
    """

    scale: float
    offset: float

    def floats(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) * self.scale + self.offset

    def header(self) -> dict:
        return {"scale": float(self.scale), "offset": float(self.offset)}


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Split a positive real multiplier into ``(M0, s)`` with ``real ≈ M0 * 2**(s - 31)``.

    ``M0`` lies in ``[2**30, 2**31)``; raises ``ValueError`` when ``s`` would leave ``[-31, 30]``.
    """
    if not real > 0 or not math.isfinite(real):
        raise ValueError(f"requantization multiplier must be positive and finite, not {real!r}")
    mantissa, exponent = math.frexp(real)          # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    multiplier = round(mantissa * (1 << 31))
    if multiplier == 1 << 31:
        multiplier, exponent = 1 << 30, exponent + 1
    if not SHIFT_RANGE[0] <= exponent <= SHIFT_RANGE[1]:
        raise ValueError(f"requantization multiplier {real!r} needs shift {exponent}, outside {list(SHIFT_RANGE)}")
    return multiplier, exponent


def element_bits(kind: str) -> int:
    """Width in hardware of one activation of ``kind``: 1 for bits, k for ``uintk``, 8 for bytes."""
    return 1 if kind == "bits" else LOW_BIT_ACTIVATIONS.get(kind, 8)


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """A fully connected layer: binary (±1), ternary, int2 or int8 weights; threshold, multi-threshold,
    requant or scores output.

    Parameters
    ----------
    name : str
        Unique layer name; used in file keys, error messages and mismatch reports.
    input_kind : str
        ``"uint8"``, ``"int8"``, ``"bits"`` (bipolar activations stored as bits) or ``"uint2"`` to
        ``"uint4"`` (k-bit unsigned activations).
    output_kind : str
        ``"threshold"`` (one bit per channel), ``"multithreshold"`` (a k-bit unsigned value per
        channel: how many of its ``2**k - 1`` thresholds the accumulator reaches), ``"requant"``
        (int8/uint8) or ``"scores"``.
    weights : numpy.ndarray
        Shape ``(out_features, in_features)``: uint8 bits (binary) or int8 values (int8, ternary
        in ``[-1, 1]``, int2 in ``[-2, 1]``).
    thresholds : numpy.ndarray or None
        int64: one per output channel for ``"threshold"``; shape ``(out_features, 2**k - 1)``, each
        row non-decreasing, for ``"multithreshold"``.
    weight_kind : str
        ``"binary"``, ``"ternary"``, ``"int2"`` or ``"int8"``.
    bias : numpy.ndarray or None
        int64 per output channel, added to the accumulator (non-popcount layers).
    requant : Requant or None
        For ``output_kind == "requant"``.
    """

    name: str
    input_kind: str
    output_kind: str
    weights: np.ndarray
    thresholds: np.ndarray | None = None
    weight_kind: str = "binary"
    bias: np.ndarray | None = None
    requant: Requant | None = None

    @property
    def in_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def is_popcount(self) -> bool:
        """Binary weights on bit inputs: the XNOR-popcount datapath."""
        return self.weight_kind == "binary" and self.input_kind == "bits"

    @property
    def input_bits(self) -> int:
        """Width of one input element in hardware."""
        return element_bits(self.input_kind)

    @property
    def weight_bits(self) -> int:
        """Width of one weight in hardware."""
        return WEIGHT_BITS[self.weight_kind]

    @property
    def weight_values(self) -> np.ndarray:
        """The weights as int64 values: ±1 for binary, the int8 values otherwise."""
        if self.weight_kind == "binary":
            return self.weights.astype(np.int64) * 2 - 1
        return self.weights.astype(np.int64)

    @property
    def bias_values(self) -> np.ndarray:
        return np.zeros(self.out_features, np.int64) if self.bias is None else self.bias.astype(np.int64)

    @cached_property
    def channel_acc_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per output channel, the smallest and largest accumulator any input can produce."""
        if self.is_popcount:
            n = np.full(self.out_features, self.in_features, dtype=np.int64)
            return np.zeros_like(n), n
        x_lo, x_hi = INPUT_RANGES[self.input_kind]
        w = self.weight_values
        lo = np.minimum(x_lo * w, x_hi * w).sum(axis=1) + self.bias_values
        hi = np.maximum(x_lo * w, x_hi * w).sum(axis=1) + self.bias_values
        return lo, hi

    @property
    def acc_min(self) -> int:
        return int(self.channel_acc_bounds[0].min())

    @property
    def acc_max(self) -> int:
        return int(self.channel_acc_bounds[1].max())

    @property
    def output_type(self) -> str | None:
        """What the next layer receives: ``"bits"``, ``"uint8"``, ``"int8"``, or ``None`` for scores."""
        if self.output_kind == "threshold":
            return "bits"
        if self.output_kind == "multithreshold":
            return f"uint{self.output_bits}"
        if self.output_kind == "requant":
            return self.requant.out_kind
        return None

    @property
    def output_bits(self) -> int:
        """Width of one output element in hardware: a bit, k bits, a byte, or a two's-complement score."""
        if self.output_kind == "threshold":
            return 1
        if self.output_kind == "multithreshold":
            return int(self.thresholds.shape[1] + 1).bit_length() - 1
        if self.output_kind == "requant":
            return 8
        return signed_width(self.acc_min, self.acc_max)

    def header(self) -> dict:
        header = {"name": self.name, "kind": "dense", "weights": self.weight_kind, "input": self.input_kind,
                  "output": self.output_kind, "in_features": self.in_features, "out_features": self.out_features,
                  "acc_min": self.acc_min, "acc_max": self.acc_max}
        if self.output_kind == "multithreshold":
            header["out"] = self.output_type
        if self.requant is not None:
            header["requant"] = self.requant.header()
        return header

    def arrays(self) -> dict[str, np.ndarray]:
        """The layer's arrays as stored in the file."""
        arrays = {"weights": self.weights.astype(np.uint8 if self.weight_kind == "binary" else np.int8)}
        if self.bias is not None:
            arrays["bias"] = self.bias.astype(np.int64)
        if self.thresholds is not None:
            arrays["thresholds"] = self.thresholds.astype(np.int64)
        if self.requant is not None:
            arrays["multiplier"] = self.requant.multiplier.astype(np.int64)
            arrays["shift"] = self.requant.shift.astype(np.int64)
        return arrays


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (torch's rule)."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True, eq=False)
class Conv2dLayer:
    """A 2-D convolution: the same dense layer applied to every K×K window of an (H, W, C) map.

    Feature maps stream pixel by pixel in raster order with channels innermost, so flattening is
    ``(y, x, c)``. ``dense.weights`` has shape ``(C_out, K*K*C_in)`` in ``(ky, kx, c)`` order.
    Padding is the integer 0 of the input kind: bit 0, i.e. -1, for binary activations (so a padded
    binary input never agrees "for free"), and 0 for uint8/int8 inputs, the real zero for hwgen's
    zero-point-0 activations.

    Parameters
    ----------
    dense : DenseLayer
        The per-window computation; its name is the layer's name.
    in_shape : tuple
        ``(H, W, C_in)``.
    kernel, stride, padding : int
    """

    dense: DenseLayer
    in_shape: tuple[int, int, int]
    kernel: int
    stride: int = 1
    padding: int = 0

    def __getattr__(self, attribute: str):
        # Precision, outputs and accumulator bounds are those of the per-window dense layer.
        if attribute in ("name", "input_kind", "output_kind", "weight_kind", "output_type", "is_popcount",
                         "input_bits", "weight_bits", "acc_min", "acc_max", "channel_acc_bounds", "output_bits",
                         "weights", "thresholds", "bias", "requant", "weight_values", "bias_values"):
            return getattr(self.dense, attribute)
        raise AttributeError(attribute)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        height, width, _ = self.in_shape
        return (conv_output_size(height, self.kernel, self.stride, self.padding),
                conv_output_size(width, self.kernel, self.stride, self.padding), self.dense.out_features)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.out_shape))

    def header(self) -> dict:
        header = self.dense.header()
        header.update(kind="conv2d", in_shape=list(self.in_shape), channels=self.dense.out_features,
                      kernel=self.kernel, stride=self.stride, padding=self.padding,
                      in_features=self.in_features, out_features=self.out_features)
        return header

    def arrays(self) -> dict[str, np.ndarray]:
        return self.dense.arrays()


@dataclass(frozen=True, eq=False)
class MaxPool2dLayer:
    """K×K max-pooling with stride K (rows and columns past the last full window are dropped).

    On bits it is an OR (bit 1 is +1, the larger value); on integers a max.
    """

    name: str
    in_shape: tuple[int, int, int]
    kernel: int
    input_kind: str

    output_kind = "pool"

    @property
    def output_type(self) -> str:
        return self.input_kind

    @property
    def input_bits(self) -> int:
        return element_bits(self.input_kind)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.in_shape
        return (height // self.kernel, width // self.kernel, channels)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def out_features(self) -> int:
        return int(np.prod(self.out_shape))

    def header(self) -> dict:
        return {"name": self.name, "kind": "maxpool2d", "input": self.input_kind, "in_shape": list(self.in_shape),
                "kernel": self.kernel, "in_features": self.in_features, "out_features": self.out_features}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}


Layer = DenseLayer | Conv2dLayer | MaxPool2dLayer


@dataclass(frozen=True, eq=False)
class IntegerModel:
    """A chain of integer layers from uint8 images to class scores.

    ``input_quantizer`` and ``output_scale`` are set by importers of float-interfaced models
    (QONNX): the host's conversions from float inputs and to float outputs.
    """

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    info: dict = field(default_factory=dict)
    input_quantizer: InputQuantizer | None = None
    output_scale: OutputScale | None = None

    @property
    def input_map_shape(self) -> tuple[int, int, int]:
        """The input as an (H, W, C) map: a 2-D image has one channel."""
        shape = tuple(self.input_shape)
        return shape + (1,) if len(shape) == 2 else shape if len(shape) == 3 else (1, 1, int(np.prod(shape)))

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def classes(self) -> int:
        return self.layers[-1].out_features

    def header(self) -> dict:
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                  "input": {"shape": list(self.input_shape), "dtype": "uint8"},
                  "layers": [layer.header() for layer in self.layers], "info": self.info}
        if self.input_quantizer is not None:
            header["input"]["quantizer"] = self.input_quantizer.header()
        if self.output_scale is not None:
            header["output"] = self.output_scale.header()
        return header

    def digest(self) -> bytes:
        """SHA-256 of the model's header and integer arrays: what a board reports to name its network."""
        sha = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        for layer in self.layers:
            for key, value in sorted(layer.arrays().items()):
                sha.update(key.encode())
                sha.update(np.ascontiguousarray(value).tobytes())
        return sha.digest()

    def save(self, path: Path | str) -> None:
        """Write the model atomically (temporary file, then rename)."""
        path = Path(path)
        arrays = {"meta": np.frombuffer(json.dumps(self.header(), sort_keys=True).encode(), dtype=np.uint8)}
        for layer in self.layers:
            arrays.update({f"{layer.name}.{key}": value for key, value in layer.arrays().items()})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path | str) -> "IntegerModel":
        """Read and validate a model file; any defect raises :class:`UserError` naming the field."""
        return _load(Path(path))


def signed_width(lo: int, hi: int) -> int:
    """Bits of a two's-complement number holding every integer in ``[lo, hi]``."""
    width = 1
    while not (-(1 << (width - 1)) <= lo and hi < (1 << (width - 1))):
        width += 1
    return width


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so no half file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load(path: Path) -> IntegerModel:
    def fail(what: str) -> UserError:
        return UserError(f"{path}: {what}; re-export it with `hwgen export`")

    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise fail(f"not a readable {FORMAT_NAME} file ({error})") from None
    with archive:
        try:
            names = set(archive.files)
            if "meta" not in names:
                raise fail("field 'meta' is missing")
            _check_member_size(archive, "meta", META_LIMIT, fail)
            try:
                meta = json.loads(bytes(archive["meta"]).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise fail(f"field 'meta' is not JSON ({error})") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
                raise fail(f"field 'meta.format' is not {FORMAT_NAME!r}")
            if meta.get("version") not in READABLE_VERSIONS:
                raise fail(f"field 'meta.version' is {meta.get('version')!r}; this hwgen reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
            model = _model_from_meta(meta, archive, names, fail)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            if isinstance(error, UserError):
                raise
            raise fail(f"corrupt archive ({error})") from None
    return model


def _model_from_meta(meta: dict, archive, names: set[str], fail) -> IntegerModel:
    try:
        shape = tuple(int(s) for s in meta["input"]["shape"])
        headers = list(meta["layers"])
    except (KeyError, TypeError, ValueError):
        raise fail("field 'meta.input.shape' or 'meta.layers' is missing or malformed") from None
    if not headers:
        raise fail("field 'meta.layers' is empty")
    layers: list[Layer] = []
    expected_in, expected_kind = int(np.prod(shape)), "uint8"
    expected_shape = IntegerModel(shape, ()).input_map_shape
    for index, header in enumerate(headers):
        where = f"meta.layers[{index}]"
        declared = header.get("in_features") if isinstance(header, dict) else None
        if declared != expected_in:
            raise fail(f"field '{where}.in_features' is {declared!r}, but the previous stage gives {expected_in}")
        kind = header.get("kind")
        if kind in ("conv2d", "maxpool2d"):
            if expected_shape is None:
                raise fail(f"field '{where}.kind' is {kind!r}, but a dense layer before it has no spatial shape")
            try:
                in_shape = tuple(int(v) for v in header["in_shape"])
                kernel = int(header["kernel"])
            except (KeyError, TypeError, ValueError):
                raise fail(f"field '{where}' needs in_shape [H, W, C] and kernel") from None
            if in_shape != expected_shape:
                raise fail(f"field '{where}.in_shape' is {list(in_shape)}, the previous stage gives {list(expected_shape)}")
            if kernel < 1 or kernel > min(in_shape[:2]) + 2 * int(header.get("padding", 0)):
                raise fail(f"field '{where}.kernel' is {kernel}, which does not fit the {in_shape[0]}x{in_shape[1]} map")
        if kind == "maxpool2d":
            if header.get("input") not in INPUT_KINDS:
                raise fail(f"field '{where}.input' is {header.get('input')!r}; expected one of {', '.join(INPUT_KINDS)}")
            layer = MaxPool2dLayer(str(header.get("name")), in_shape, kernel, header["input"])
        elif kind == "conv2d":
            try:
                channels, stride, padding = int(header["channels"]), int(header["stride"]), int(header["padding"])
            except (KeyError, TypeError, ValueError):
                raise fail(f"field '{where}' needs channels, stride and padding") from None
            if stride < 1 or padding < 0 or channels < 1:
                raise fail(f"field '{where}': stride must be >= 1, padding >= 0, channels >= 1")
            dense = _layer_from_header(where, dict(header, kind="dense", in_features=kernel * kernel * in_shape[2],
                                                   out_features=channels), archive, names, fail)
            layer = Conv2dLayer(dense, in_shape, kernel, stride, padding)
            if layer.out_features != header.get("out_features"):
                raise fail(f"field '{where}.out_features' is {header.get('out_features')!r}; the geometry gives "
                           f"{layer.out_features}")
        else:
            layer = _layer_from_header(where, header, archive, names, fail)
        if layer.input_kind != expected_kind:
            raise fail(f"field '{where}.input' is {layer.input_kind!r}, but the previous stage gives {expected_kind!r}")
        last = index == len(headers) - 1
        if last != (layer.output_kind == "scores"):
            raise fail(f"field '{where}.output' is {layer.output_kind!r}; the output layer, and only it, "
                       "gives 'scores'")
        layers.append(layer)
        expected_in, expected_kind = layer.out_features, layer.output_type
        expected_shape = getattr(layer, "out_shape", None)
    if len({layer.name for layer in layers}) != len(layers):
        raise fail("layer names in 'meta.layers' are not unique")
    input_quantizer = output_scale = None
    try:
        if "quantizer" in meta["input"]:
            input_quantizer = InputQuantizer.from_header(meta["input"]["quantizer"])
            if int(np.prod(input_quantizer.tensor_shape[1:])) != int(np.prod(shape)):
                raise ValueError("tensor_shape")
        if "output" in meta:
            output_scale = OutputScale(float(meta["output"]["scale"]), float(meta["output"]["offset"]))
    except (KeyError, TypeError, ValueError):
        raise fail("field 'meta.input.quantizer' or 'meta.output' is malformed") from None
    return IntegerModel(shape, tuple(layers), dict(meta.get("info", {})), input_quantizer, output_scale)


def _layer_from_header(where: str, header: dict, archive, names: set[str], fail) -> DenseLayer:
    try:
        name, kind = str(header["name"]), header["kind"]
        weight_kind = header.get("weights", "binary")   # version 1 had binary weights only
        input_kind, output_kind = header["input"], header["output"]
        n_in, n_out = int(header["in_features"]), int(header["out_features"])
    except (KeyError, TypeError, ValueError) as error:
        raise fail(f"field '{where}' lacks {error}") from None
    if kind != "dense":
        raise fail(f"field '{where}.kind' is {kind!r}; this hwgen supports 'dense'")
    for field_name, value, allowed in (("weights", weight_kind, WEIGHT_KINDS), ("input", input_kind, INPUT_KINDS),
                                       ("output", output_kind, OUTPUT_KINDS)):
        if value not in allowed:
            raise fail(f"field '{where}.{field_name}' is {value!r}; expected one of {', '.join(allowed)}")
    weights = _array(archive, names, f"{name}.weights", (n_out, n_in), fail)
    if weight_kind == "binary" and (weights.dtype != np.uint8 or weights.size and weights.max() > 1):
        raise fail(f"array '{name}.weights' must be uint8 bits (0 or 1)")
    if weight_kind in WEIGHT_RANGES:
        w_lo, w_hi = WEIGHT_RANGES[weight_kind]
        if weights.dtype != np.int8 or weights.size and (weights.min() < w_lo or weights.max() > w_hi):
            raise fail(f"array '{name}.weights' must be int8 in [{w_lo}, {w_hi}] ({weight_kind} weights)")
    bias = _array(archive, names, f"{name}.bias", (n_out,), fail, np.int64) if f"{name}.bias" in names else None
    if bias is not None and weight_kind == "binary" and input_kind == "bits":
        raise fail(f"array '{name}.bias' is not allowed on an XNOR-popcount layer (fold it into thresholds)")
    thresholds = requant = None
    if output_kind == "threshold":
        thresholds = _array(archive, names, f"{name}.thresholds", (n_out,), fail, np.int64)
    if output_kind == "multithreshold":
        out_kind = header.get("out")
        if out_kind not in LOW_BIT_ACTIVATIONS:
            raise fail(f"field '{where}.out' is {out_kind!r}; expected one of {', '.join(LOW_BIT_ACTIVATIONS)}")
        levels = (1 << LOW_BIT_ACTIVATIONS[out_kind]) - 1
        thresholds = _array(archive, names, f"{name}.thresholds", (n_out, levels), fail, np.int64)
        if np.any(np.diff(thresholds, axis=1) < 0):
            raise fail(f"array '{name}.thresholds' must be non-decreasing along each channel's row")
    if output_kind == "requant":
        try:
            fields = header["requant"]
            zero_point, out_kind, lo, hi = (int(fields["zero_point"]), fields["out"], int(fields["lo"]), int(fields["hi"]))
        except (KeyError, TypeError, ValueError):
            raise fail(f"field '{where}.requant' is missing or malformed (zero_point, out, lo, hi)") from None
        if out_kind not in QUANT_RANGES:
            raise fail(f"field '{where}.requant.out' is {out_kind!r}; expected uint8 or int8")
        q_lo, q_hi = QUANT_RANGES[out_kind]
        if not q_lo <= lo <= hi <= q_hi or not q_lo <= zero_point <= q_hi:
            raise fail(f"field '{where}.requant' needs {q_lo} <= lo <= hi <= {q_hi} and zero_point in range")
        rounding = fields.get("rounding", "half_up")
        if rounding not in ROUNDING_MODES:
            raise fail(f"field '{where}.requant.rounding' is {rounding!r}; expected one of {', '.join(ROUNDING_MODES)}")
        multiplier = _array(archive, names, f"{name}.multiplier", (n_out,), fail, np.int64)
        shift = _array(archive, names, f"{name}.shift", (n_out,), fail, np.int64)
        if np.any(multiplier < MULTIPLIER_RANGE[0]) or np.any(multiplier >= MULTIPLIER_RANGE[1]):
            raise fail(f"array '{name}.multiplier' must lie in [2**30, 2**31)")
        if np.any(shift < SHIFT_RANGE[0]) or np.any(shift > SHIFT_RANGE[1]):
            raise fail(f"array '{name}.shift' must lie in {list(SHIFT_RANGE)}")
        requant = Requant(multiplier, shift, zero_point, out_kind, lo, hi, rounding)
    layer = DenseLayer(name, input_kind, output_kind, weights, thresholds, weight_kind, bias, requant)
    if (header.get("acc_min"), header.get("acc_max")) != (layer.acc_min, layer.acc_max):
        raise fail(f"field '{where}.acc_min/acc_max' disagree with the weights ({layer.acc_min}, {layer.acc_max})")
    if not (-ACC_LIMIT <= layer.acc_min and layer.acc_max < ACC_LIMIT):
        raise fail(f"field '{where}': the accumulator range [{layer.acc_min}, {layer.acc_max}] exceeds int32")
    if thresholds is not None:
        lo_c, hi_c = (bound.reshape(n_out, *([1] * (thresholds.ndim - 1))) for bound in layer.channel_acc_bounds)
        if np.any(thresholds < lo_c) or np.any(thresholds > hi_c + 1):
            raise fail(f"array '{name}.thresholds' lies outside the accumulator range [acc_min, acc_max + 1]")
    return layer


#: Bytes an array's ``.npy`` member may take beyond its data (the header).
NPY_HEADER_ALLOWANCE = 65536
#: Bytes the ``meta`` member (JSON) may take.
META_LIMIT = 16 * 2 ** 20


def _memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_member_size(archive, key: str, limit: int, fail) -> None:
    """Refuse a member whose declared uncompressed size exceeds ``limit`` before reading it: a small
    compressed archive can declare gigabytes."""
    try:
        declared = archive.zip.getinfo(f"{key}.npy").file_size
    except KeyError:
        return      # np.load names it without the suffix; reading it raises a clear error below
    if declared > limit:
        raise fail(f"array '{key}' declares {declared:,} bytes uncompressed, more than its shape allows "
                   f"({limit:,}); the file is corrupt or not a model")


def _array(archive, names: set[str], key: str, shape: tuple[int, ...], fail, dtype=None) -> np.ndarray:
    if key not in names:
        raise fail(f"array '{key}' is missing")
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
    data_bytes = math.prod(shape) * itemsize
    if data_bytes > _memory_bytes() // 2:
        raise fail(f"array '{key}' would have shape {shape} ({data_bytes:,} bytes), more than half this "
                   "machine's memory; the file is corrupt or not a model")
    _check_member_size(archive, key, data_bytes + NPY_HEADER_ALLOWANCE, fail)
    try:
        array = archive[key]
    except ValueError as error:  # e.g. an object array, which would need unpickling
        raise fail(f"array '{key}' cannot be read without pickle ({error})") from None
    if array.shape != shape:
        raise fail(f"array '{key}' has shape {array.shape}, expected {shape}")
    if dtype is not None and array.dtype != dtype:
        raise fail(f"array '{key}' must be {np.dtype(dtype).name}, not {array.dtype}")
    return array


# --- Batch-norm + sign folded into thresholds ------------------------------------------------

def batchnorm_reference(z: np.ndarray, mean, var, eps: float, gamma, beta) -> np.ndarray:
    """BatchNorm in float64, in the operation order the torch integer path uses too.

    Every step is a correctly rounded IEEE operation, so torch and NumPy give identical results.
    """
    return ((z - mean) / np.sqrt(var + eps)) * gamma + beta


def first_reached(lo: np.ndarray, hi: np.ndarray, reached) -> np.ndarray:
    """Elementwise, the smallest integer ``a`` in ``[lo, hi + 1]`` with ``reached(a)``; ``hi + 1`` if none.

    ``reached`` maps an integer array shaped like ``lo`` to booleans and must be monotone in each
    element (once true, true for every larger ``a``): bisection then finds the exact boundary.
    """
    left, right = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64) + 1
    while np.any(left < right):
        mid = (left + right) // 2
        hit = np.asarray(reached(mid), dtype=bool)
        open_ = left < right
        right = np.where(hit & open_, mid, right)
        left = np.where(~hit & open_, mid + 1, left)
    return left


def fold_threshold(layer: DenseLayer, positive, decreasing: np.ndarray) -> DenseLayer:
    """Turn a monotone per-channel decision ``positive(acc)`` into ``acc >= T`` thresholds.

    ``positive`` maps a per-channel accumulator array (shape ``(out_features,)``) to booleans: the
    output bit each channel emits at that accumulator. It must be non-decreasing in ``acc`` where
    ``decreasing`` is false and non-increasing where it is true. Decreasing channels get their
    weight row (and bias) negated so the hardware only compares ``>=``; thresholds are the exact
    integer boundaries (bisection over the accumulator's range), clipped to ``[acc_min, acc_max + 1]``
    of the layer as folded.
    """
    decreasing = np.asarray(decreasing, dtype=bool)
    n_in = layer.in_features
    lo, hi = layer.channel_acc_bounds
    # For decreasing channels find the first acc where the bit is 0; every acc below it gives 1.
    left = first_reached(lo, hi, lambda acc: np.asarray(positive(acc), dtype=bool) != decreasing)
    last_positive = left - 1
    # Negated row: the accumulator becomes N - p (popcount) or -acc, and "acc <= last_positive"
    # becomes "acc' >= N - last_positive" (or "-last_positive").
    negated_t = (n_in if layer.is_popcount else 0) - last_positive
    thresholds = np.where(decreasing, negated_t, left)
    folded = negate_rows(layer, decreasing)
    out_lo, out_hi = folded.channel_acc_bounds
    return DenseLayer(layer.name, layer.input_kind, "threshold", folded.weights,
                      np.clip(thresholds, out_lo, out_hi + 1).astype(np.int64), layer.weight_kind, folded.bias)


def uniform_levels_reference(y: np.ndarray, levels: int) -> np.ndarray:
    """A k-bit unsigned activation of ``y``: ``round(clamp(y, 0, 1) * levels)`` in float64, ties to even.

    The templates' activation quantizer (a uniform quantizer on the fixed clip range [0, 1] that
    BN ahead of it scales into) computes the same operations in this order, so torch and NumPy
    agree on every value.
    """
    return np.round(np.clip(y, 0.0, 1.0) * levels)


def fold_multithreshold(layer: DenseLayer, level, decreasing: np.ndarray, bits: int) -> DenseLayer:
    """Turn a monotone per-channel k-bit activation ``level(acc)`` into ``2**bits - 1`` thresholds.

    ``level`` maps a per-channel accumulator array (shape ``(out_features,)``) to integers in
    ``[0, 2**bits - 1]``, non-decreasing in ``acc`` where ``decreasing`` is false and non-increasing
    where it is true. Decreasing channels get their weight row (and bias) negated first, so the
    hardware only compares ``>=``. Threshold ``j`` of a channel is the smallest accumulator of the
    folded layer whose level is at least ``j`` (bisection, exact), ``acc_max + 1`` where none is:
    the output is the number of thresholds reached.
    """
    decreasing = np.asarray(decreasing, dtype=bool)
    folded = negate_rows(layer, decreasing)
    lo, hi = folded.channel_acc_bounds
    # The folded accumulator is -acc, or N - p on a popcount layer.
    offset = layer.in_features if layer.is_popcount else 0

    def original(acc: np.ndarray) -> np.ndarray:
        return np.where(decreasing, offset - acc, acc)

    thresholds = np.stack([first_reached(lo, hi, lambda acc, j=j: np.asarray(level(original(acc))) >= j)
                           for j in range(1, 1 << bits)], axis=1)
    return DenseLayer(layer.name, layer.input_kind, "multithreshold", folded.weights, thresholds.astype(np.int64),
                      layer.weight_kind, folded.bias)


def fold_batchnorm_levels(layer: DenseLayer, mean, var, eps: float, gamma, beta, bits: int) -> DenseLayer:
    """Fold ``uniform_levels(BN(acc))`` (:func:`uniform_levels_reference`, k = ``bits``) into
    per-channel multi-thresholds (:func:`fold_multithreshold`).

    ``z`` is the accumulator itself (``2p - N`` on an XNOR-popcount layer), BN in float64 as
    :func:`batchnorm_reference`; channels with ``gamma < 0`` are negated; ``gamma == 0`` makes the
    level constant, so every threshold is ``acc_min`` or ``acc_max + 1``.
    """
    mean, var, gamma, beta = (np.asarray(p, dtype=np.float64) for p in (mean, var, gamma, beta))
    n_in, levels = layer.in_features, (1 << bits) - 1

    def level(acc: np.ndarray) -> np.ndarray:
        z = (2 * acc - n_in).astype(np.float64) if layer.is_popcount else acc.astype(np.float64)
        return uniform_levels_reference(batchnorm_reference(z, mean, var, eps, gamma, beta), levels)

    return fold_multithreshold(layer, level, gamma < 0, bits)


def negate_rows(layer: DenseLayer, rows: np.ndarray) -> DenseLayer:
    """``layer`` with the weight rows (and bias entries) of the selected output channels negated.

    A binary row is inverted bit by bit; on an XNOR-popcount layer that turns ``p`` into ``N - p``.
    """
    rows = np.asarray(rows, dtype=bool)
    if layer.weight_kind == "binary":
        weights = np.where(rows[:, None], 1 - layer.weights, layer.weights).astype(np.uint8)
    elif layer.weight_kind == "int2" and np.any(rows[:, None] & (layer.weights == -2)):
        raise ValueError(f"{layer.name}: an int2 row holding -2 has no int2 negation")
    else:
        weights = np.where(rows[:, None], -layer.weights.astype(np.int16), layer.weights).astype(np.int8)
    bias = None if layer.bias is None else np.where(rows, -layer.bias, layer.bias).astype(np.int64)
    return DenseLayer(layer.name, layer.input_kind, layer.output_kind, weights, layer.thresholds,
                      layer.weight_kind, bias, layer.requant)


def fold_batchnorm_sign(layer: DenseLayer, mean, var, eps: float, gamma, beta, z_scale=None) -> DenseLayer:
    """Fold ``sign(BN(z))`` (``sign(0) = +1``) into per-channel ``acc >= T`` thresholds.

    ``z`` is the pre-BN value the torch layer computes from the integer accumulator: ``2p - N``
    for XNOR-popcount layers, ``acc * z_scale[c]`` otherwise (``z_scale`` defaults to 1; int8
    layers pass their per-channel weight scale). BN is evaluated in float64
    (:func:`batchnorm_reference`), and ``T`` is the exact integer boundary of that evaluation
    (:func:`fold_threshold`). Channels with ``gamma < 0`` get their weight row (and bias) negated
    so the hardware only compares ``>=``; ``gamma == 0`` makes BN constant, so the search ends at
    ``T = acc_min`` (always 1) or ``acc_max + 1`` (always 0).
    """
    mean, var, gamma, beta = (np.asarray(p, dtype=np.float64) for p in (mean, var, gamma, beta))
    scale = np.ones(layer.out_features) if z_scale is None else np.asarray(z_scale, dtype=np.float64)
    n_in = layer.in_features

    def positive(acc: np.ndarray) -> np.ndarray:
        z = (2 * acc - n_in).astype(np.float64) if layer.is_popcount else acc.astype(np.float64) * scale
        return batchnorm_reference(z, mean, var, eps, gamma, beta) >= 0

    return fold_threshold(layer, positive, gamma < 0)
