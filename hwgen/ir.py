"""The integer model (IR): integers only, a versioned file format, and the BN+sign fold.

Everything downstream (golden model, RTL, simulation, board builds) reads this and
nothing else; nothing here imports torch.

File format ``hwgen-ir`` version 1
----------------------------------
A NumPy ``.npz`` archive, loaded with ``allow_pickle=False``:

``meta``
    uint8 array holding UTF-8 JSON::

        {"format": "hwgen-ir", "version": 1,
         "input": {"shape": [28, 28], "dtype": "uint8"},
         "layers": [{"name": "dense0", "kind": "dense", "input": "uint8",
                     "output": "threshold", "in_features": 784, "out_features": 256,
                     "acc_min": -199920, "acc_max": 199920}, ...],
         "info": {...free-form provenance: dataset, accuracies...}}

``<layer>.weights``
    uint8, shape ``(out_features, in_features)``, one bit per weight: 1 is +1, 0 is -1.
``<layer>.thresholds``
    int64, shape ``(out_features,)``; only for ``output == "threshold"``.

Layer semantics (the integer contract of DESIGN.md):

* ``input == "bits"``: the accumulator is the popcount ``p = popcount(XNOR(x, w))`` in ``[0, N]``.
* ``input == "uint8"``: the accumulator is ``acc = sum(x_i * w_i)`` with ``w_i`` in ``{-1, +1}``.
* ``output == "threshold"``: output bit ``acc >= T_c``; ``output == "scores"``: the raw
  accumulator per class, and the class is the argmax with ties to the lowest index.

``acc_min``/``acc_max`` are the accumulator's bounds over every possible input, computed from the
weights; they size the hardware accumulators and are checked on load.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT_NAME = "hwgen-ir"
FORMAT_VERSION = 1
INPUT_KINDS = ("uint8", "bits")
OUTPUT_KINDS = ("threshold", "scores")
UINT8_MAX = 255


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """A fully connected layer with binary (±1) weights.

    Parameters
    ----------
    name : str
        Unique layer name; used in file keys, error messages and mismatch reports.
    input_kind : str
        ``"uint8"`` (pixels) or ``"bits"`` (bipolar activations stored as bits).
    output_kind : str
        ``"threshold"`` (one output bit per channel) or ``"scores"`` (raw accumulators).
    weights : numpy.ndarray
        uint8 bits, shape ``(out_features, in_features)``; 1 is +1.
    thresholds : numpy.ndarray or None
        int64 per output channel, for ``output_kind == "threshold"``.
    """

    name: str
    input_kind: str
    output_kind: str
    weights: np.ndarray
    thresholds: np.ndarray | None = None

    @property
    def in_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def input_bits(self) -> int:
        """Width of one input element in hardware."""
        return 8 if self.input_kind == "uint8" else 1

    @property
    def channel_acc_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per output channel, the smallest and largest accumulator any input can produce."""
        if self.input_kind == "bits":
            n = np.full(self.out_features, self.in_features, dtype=np.int64)
            return np.zeros_like(n), n
        plus = self.weights.astype(np.int64).sum(axis=1)
        return -UINT8_MAX * (self.in_features - plus), UINT8_MAX * plus

    @property
    def acc_min(self) -> int:
        return int(self.channel_acc_bounds[0].min())

    @property
    def acc_max(self) -> int:
        return int(self.channel_acc_bounds[1].max())

    @property
    def output_bits(self) -> int:
        """Width of one output element in hardware: a bit, or a two's-complement score."""
        if self.output_kind == "threshold":
            return 1
        return signed_width(self.acc_min, self.acc_max)

    def header(self) -> dict:
        return {"name": self.name, "kind": "dense", "input": self.input_kind, "output": self.output_kind,
                "in_features": self.in_features, "out_features": self.out_features,
                "acc_min": self.acc_min, "acc_max": self.acc_max}


@dataclass(frozen=True, eq=False)
class IntegerModel:
    """A chain of integer layers from uint8 images to class scores."""

    input_shape: tuple[int, ...]
    layers: tuple[DenseLayer, ...]
    info: dict = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def classes(self) -> int:
        return self.layers[-1].out_features

    def header(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "input": {"shape": list(self.input_shape), "dtype": "uint8"},
                "layers": [layer.header() for layer in self.layers], "info": self.info}

    def save(self, path: Path | str) -> None:
        """Write the model atomically (temporary file, then rename)."""
        path = Path(path)
        arrays = {"meta": np.frombuffer(json.dumps(self.header(), sort_keys=True).encode(), dtype=np.uint8)}
        for layer in self.layers:
            arrays[f"{layer.name}.weights"] = layer.weights.astype(np.uint8)
            if layer.thresholds is not None:
                arrays[f"{layer.name}.thresholds"] = layer.thresholds.astype(np.int64)
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
            try:
                meta = json.loads(bytes(archive["meta"]).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise fail(f"field 'meta' is not JSON ({error})") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
                raise fail(f"field 'meta.format' is not {FORMAT_NAME!r}")
            if meta.get("version") != FORMAT_VERSION:
                raise fail(f"field 'meta.version' is {meta.get('version')!r}; this hwgen reads version {FORMAT_VERSION}")
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
    layers = []
    expected_in = int(np.prod(shape))
    for index, header in enumerate(headers):
        where = f"meta.layers[{index}]"
        try:
            name, kind = str(header["name"]), header["kind"]
            input_kind, output_kind = header["input"], header["output"]
            n_in, n_out = int(header["in_features"]), int(header["out_features"])
        except (KeyError, TypeError, ValueError) as error:
            raise fail(f"field '{where}' lacks {error}") from None
        if kind != "dense":
            raise fail(f"field '{where}.kind' is {kind!r}; this hwgen supports 'dense'")
        if input_kind not in INPUT_KINDS or output_kind not in OUTPUT_KINDS:
            raise fail(f"field '{where}' has input {input_kind!r}/output {output_kind!r}; "
                       f"expected one of {INPUT_KINDS}/{OUTPUT_KINDS}")
        if n_in != expected_in:
            raise fail(f"field '{where}.in_features' is {n_in}, but the previous stage gives {expected_in}")
        weights = _array(archive, names, f"{name}.weights", (n_out, n_in), fail)
        if weights.dtype != np.uint8 or weights.size and weights.max() > 1:
            raise fail(f"array '{name}.weights' must be uint8 bits (0 or 1)")
        thresholds = None
        if output_kind == "threshold":
            thresholds = _array(archive, names, f"{name}.thresholds", (n_out,), fail)
            if thresholds.dtype != np.int64:
                raise fail(f"array '{name}.thresholds' must be int64")
        layer = DenseLayer(name, input_kind, output_kind, weights, thresholds)
        if (header.get("acc_min"), header.get("acc_max")) != (layer.acc_min, layer.acc_max):
            raise fail(f"field '{where}.acc_min/acc_max' disagree with the weights "
                       f"({layer.acc_min}, {layer.acc_max})")
        if thresholds is not None:
            lo, hi = layer.channel_acc_bounds
            if np.any(thresholds < lo) or np.any(thresholds > hi + 1):
                raise fail(f"array '{name}.thresholds' lies outside the accumulator range [acc_min, acc_max + 1]")
        if index < len(headers) - 1 and output_kind != "threshold":
            raise fail(f"field '{where}.output' must be 'threshold' for a hidden layer")
        if index == len(headers) - 1 and output_kind != "scores":
            raise fail(f"field '{where}.output' must be 'scores' for the output layer")
        if index > 0 and input_kind != "bits":
            raise fail(f"field '{where}.input' must be 'bits' after a threshold layer")
        layers.append(layer)
        expected_in = n_out
    if len({layer.name for layer in layers}) != len(layers):
        raise fail("layer names in 'meta.layers' are not unique")
    return IntegerModel(shape, tuple(layers), dict(meta.get("info", {})))


def _array(archive, names: set[str], key: str, shape: tuple[int, ...], fail) -> np.ndarray:
    if key not in names:
        raise fail(f"array '{key}' is missing")
    try:
        array = archive[key]
    except ValueError as error:  # e.g. an object array, which would need unpickling
        raise fail(f"array '{key}' cannot be read without pickle ({error})") from None
    if array.shape != shape:
        raise fail(f"array '{key}' has shape {array.shape}, expected {shape}")
    return array


# --- Batch-norm + sign folded into thresholds ------------------------------------------------

def batchnorm_reference(z: np.ndarray, mean, var, eps: float, gamma, beta) -> np.ndarray:
    """BatchNorm in float64, in the operation order the torch integer path uses too.

    Every step is a correctly rounded IEEE operation, so torch and NumPy give identical results.
    """
    return ((z - mean) / np.sqrt(var + eps)) * gamma + beta


def fold_batchnorm_sign(weights: np.ndarray, input_kind: str, mean, var, eps: float, gamma, beta
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``sign(BN(z))`` (``sign(0) = +1``) into per-channel ``acc >= T`` thresholds.

    ``z`` is the bipolar dot product the torch layer computes: ``2p - N`` for bit inputs,
    ``acc`` for uint8 inputs. BN is evaluated in float64 (:func:`batchnorm_reference`), and ``T``
    is the exact integer boundary of that evaluation, found by bisection over the accumulator's
    range. Channels with ``gamma < 0`` get their weight row inverted so the hardware only compares
    ``>=``; ``gamma == 0`` makes BN constant, so the search ends at ``T = acc_min`` (always 1) or
    ``acc_max + 1`` (always 0).

    Returns
    -------
    (weights, thresholds)
        The (possibly row-inverted) uint8 weight bits and the int64 thresholds.
    """
    weights = np.asarray(weights, dtype=np.uint8)
    params = [np.asarray(p, dtype=np.float64) for p in (mean, var, gamma, beta)]
    mean, var, gamma, beta = params
    n_in = weights.shape[1]
    layer = DenseLayer("fold", input_kind, "threshold", weights)
    lo, hi = layer.channel_acc_bounds

    def to_z(acc: np.ndarray) -> np.ndarray:
        return (2 * acc - n_in if input_kind == "bits" else acc).astype(np.float64)

    def positive(acc: np.ndarray) -> np.ndarray:
        return batchnorm_reference(to_z(acc), mean, var, eps, gamma, beta) >= 0

    # Monotone per channel: for gamma > 0 find the first acc with BN >= 0, for gamma < 0 the
    # first acc with BN < 0; rounding is monotone, so bisection finds the exact boundary.
    decreasing = gamma < 0
    left, right = lo.copy(), hi + 1
    while np.any(left < right):
        mid = (left + right) // 2
        hit = positive(mid) != decreasing
        right = np.where(hit & (left < right), mid, right)
        left = np.where(~hit & (left < right), mid + 1, left)
    first = left
    inverted = 1 - weights
    if input_kind == "bits":
        inverted_t = n_in - (first - 1)
    else:
        inverted_t = -(first - 1)
    thresholds = np.where(decreasing, inverted_t, first)
    out_weights = np.where(decreasing[:, None], inverted, weights).astype(np.uint8)
    out_lo, out_hi = DenseLayer("fold", input_kind, "threshold", out_weights).channel_acc_bounds
    return out_weights, np.clip(thresholds, out_lo, out_hi + 1).astype(np.int64)
