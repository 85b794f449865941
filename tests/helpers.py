"""Random integer models for tests (no torch)."""
from __future__ import annotations

import numpy as np

from hwgen.ir import DenseLayer, IntegerModel, Requant


def random_layer(rng: np.random.Generator, name: str, input_kind: str, output_kind: str,
                 n_in: int, n_out: int, weight_kind: str = "binary", act_bits: int = 2) -> DenseLayer:
    """Random weights; thresholds over the whole legal range (both ends included); requantization
    with random per-channel M0 and shifts scaled so outputs spread over the range and saturate;
    ``2**act_bits - 1`` thresholds per channel for a multi-threshold layer."""
    if weight_kind == "binary":
        weights, bias = rng.integers(0, 2, (n_out, n_in)).astype(np.uint8), None
    elif weight_kind in ("ternary", "int2"):
        low = -1 if weight_kind == "ternary" else -2
        weights = rng.integers(low, 2, (n_out, n_in)).astype(np.int8)
        weights[0, :] = 0 if n_out > 1 else weights[0, :]      # an all-zero row
        bias = rng.integers(-20, 21, n_out).astype(np.int64)
    else:
        weights = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
        weights[0, :] = 127 * (1 if n_out % 2 else -1)        # an extreme row
        bias = rng.integers(-5000, 5000, n_out).astype(np.int64)
    layer = DenseLayer(name, input_kind, output_kind, weights, None, weight_kind, bias)
    if output_kind == "scores":
        return layer
    if output_kind == "requant":
        lo, hi = layer.channel_acc_bounds
        spread = np.maximum(hi - lo, 1).astype(np.float64)
        # Map roughly a quarter of the accumulator range onto the output range: values saturate too.
        real = 255.0 * 4 / spread * rng.uniform(0.5, 2.0, n_out)
        frac, exp = np.frexp(real)
        multiplier = np.minimum(np.round(frac * 2.0**31), 2**31 - 1).astype(np.int64)
        out_kind = "uint8" if rng.random() < 0.5 else "int8"
        zero_point = int(rng.integers(-20, 21)) + (128 if out_kind == "uint8" else 0)
        q_lo, q_hi = (0, 255) if out_kind == "uint8" else (-128, 127)
        lo_clamp = zero_point if rng.random() < 0.5 else q_lo     # ReLU half the time
        requant = Requant(multiplier, exp.astype(np.int64), zero_point, out_kind, lo_clamp, q_hi)
        return DenseLayer(name, input_kind, output_kind, weights, None, weight_kind, bias, requant)
    lo, hi = layer.channel_acc_bounds
    if output_kind == "multithreshold":
        # Sorted rows of 2**k - 1 thresholds near the centre, with whole rows and single thresholds
        # at the clip ends.
        levels = (1 << act_bits) - 1
        rows = np.sort(np.stack([centred_thresholds(layer, rng) for _ in range(levels)], axis=1), axis=1)
        ends = rng.random(n_out)
        rows = np.where(ends[:, None] < 0.08, lo[:, None], np.where(ends[:, None] > 0.92, hi[:, None] + 1, rows))
        rows[:, 0] = np.where(rng.random(n_out) < 0.2, lo, rows[:, 0])
        rows[:, -1] = np.where(rng.random(n_out) < 0.2, hi + 1, rows[:, -1])
        return DenseLayer(name, input_kind, output_kind, weights, rows.astype(np.int64), weight_kind, bias)
    # Most thresholds sit where random inputs land, so outputs vary; some sit at the clip ends.
    thresholds = centred_thresholds(layer, rng)
    ends = rng.random(n_out)
    thresholds = np.where(ends < 0.08, lo, np.where(ends > 0.92, hi + 1, thresholds))
    return DenseLayer(name, input_kind, output_kind, weights, thresholds.astype(np.int64), weight_kind, bias)


def centred_thresholds(layer: DenseLayer, rng: np.random.Generator) -> np.ndarray:
    """Random thresholds near where random inputs put each channel's accumulator, within
    ``[lo, hi + 1]``."""
    lo, hi = layer.channel_acc_bounds
    if layer.is_popcount:
        centre, spread = np.full(layer.out_features, layer.in_features // 2), max(1, layer.in_features // 4)
    elif layer.input_kind.startswith("uint") and layer.weight_kind != "int8":
        # Low-bit layers: random inputs put the accumulator near the middle of the bounds only for
        # ±1 weights; the mean input times the weight sum is closer for any weights.
        mean_input = ((1 << layer.input_bits) - 1) / 2
        centre = np.round(mean_input * layer.weight_values.sum(axis=1)).astype(np.int64) + layer.bias_values
        spread = np.maximum((hi - lo) // 8, 1)
    else:
        centre, spread = (lo + hi) // 2, np.maximum((hi - lo) // 8, 1)
    return np.clip(centre + rng.integers(-spread, spread + 1, layer.out_features), lo, hi + 1)


def rewrite_model_file(path, model: IntegerModel, mutate, compressed: bool = False) -> None:
    """Save ``model``, then rewrite the archive with its entries changed by ``mutate(dict)``."""
    model.save(path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    mutate(arrays)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def meta_edit(edit):
    """A ``mutate`` for :func:`rewrite_model_file` that applies ``edit(dict)`` to the JSON ``meta``."""
    import json

    def mutate(arrays):
        meta = json.loads(bytes(arrays["meta"]).decode())
        edit(meta)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return mutate


def random_model(rng: np.random.Generator, widths: list[int], input_kind: str = "uint8",
                 kinds: list[tuple] | None = None) -> IntegerModel:
    """A model with the given widths (input first).

    ``kinds`` gives ``(weight_kind, output_kind)`` or ``(weight_kind, "multithreshold", act_bits)``
    per layer; by default binary threshold layers and a binary scores layer. Each layer's input
    kind follows from the previous layer's output.
    """
    count = len(widths) - 1
    kinds = kinds or [("binary", "threshold")] * (count - 1) + [("binary", "scores")]
    layers: list[DenseLayer] = []
    for index, ((n_in, n_out), (weight_kind, output_kind, *act_bits)) in enumerate(
            zip(zip(widths[:-1], widths[1:]), kinds)):
        kind_in = input_kind if index == 0 else layers[-1].output_type
        layers.append(random_layer(rng, f"dense{index}", kind_in, output_kind, n_in, n_out, weight_kind, *act_bits))
    return IntegerModel((widths[0],), tuple(layers))


def random_images(rng: np.random.Generator, count: int, features: int) -> np.ndarray:
    """uint8 images mixing uniform noise with saturated 0/255 pixels (the extremes matter)."""
    images = rng.integers(0, 256, (count, features)).astype(np.uint8)
    extremes = rng.random((count, features))
    images[extremes < 0.15] = 0
    images[extremes > 0.85] = 255
    return images


def random_cnn(rng: np.random.Generator, size: tuple[int, int, int], convs: list[dict], classes: int,
               head_kind: str = "binary") -> IntegerModel:
    """A convolutional model: ``convs`` items are ``dict(channels, kernel, stride, padding, weights,
    output, pool)`` and for a multi-threshold output ``act_bits``; a dense scores head of
    ``head_kind`` weights follows."""
    from hwgen.ir import Conv2dLayer, MaxPool2dLayer

    layers: list = []
    shape, kind = size, "uint8"
    for index, spec in enumerate(convs):
        n_in = spec["kernel"] ** 2 * shape[2]
        dense = random_layer(rng, f"conv{index}", kind, spec["output"], n_in, spec["channels"], spec["weights"],
                             spec.get("act_bits", 2))
        conv = Conv2dLayer(dense, shape, spec["kernel"], spec["stride"], spec["padding"])
        layers.append(conv)
        shape, kind = conv.out_shape, conv.output_type
        if spec.get("pool"):
            pool = MaxPool2dLayer(f"pool{index}", shape, spec["pool"], kind)
            layers.append(pool)
            shape = pool.out_shape
    layers.append(random_layer(rng, "head", kind, "scores", int(np.prod(shape)), classes, head_kind))
    return IntegerModel(size, tuple(layers))


def reference_shapes() -> dict:
    """Random weights in the shapes of the bench's four reference networks."""
    rng = np.random.default_rng(0)
    spec = dict(kernel=3, stride=1, padding=1, weights="binary", output="threshold", pool=2)
    return {
        "mlp-binary": random_model(rng, [784, 256, 256, 10]),
        "mlp-int8": random_model(rng, [784, 256, 256, 10],
                                 kinds=[("int8", "requant"), ("int8", "requant"), ("int8", "scores")]),
        "mlp-mixed": random_model(rng, [784, 256, 256, 10],
                                  kinds=[("binary", "threshold"), ("int8", "requant"), ("int8", "scores")]),
        "cnn-binary": random_cnn(rng, (28, 28, 1), [dict(spec, channels=32), dict(spec, channels=64)], 10),
    }
