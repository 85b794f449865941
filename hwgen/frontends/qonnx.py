"""QONNX import: a Brevitas/QONNX graph to hwgen's integer model, exact against the QONNX executor.

The graph is read as a chain: an input quantizer (``Quant`` or ``BipolarQuant``, optionally after
scalar ``Mul``/``Div``/``Add``/``Sub`` and reshapes), then layers of the form

    [Reshape | Flatten | Transpose]*  (MatMul | Gemm | Conv)  [Add | Sub | Mul | Div | BatchNormalization | Relu]*
    (Quant | BipolarQuant | MultiThreshold)  [MaxPool]

and a last layer whose element-wise tail reaches the graph output. Weights are the integer codes
of the ``Quant``/``BipolarQuant`` on each weight initializer.

How each layer's decisions are reproduced (FINN's streamlining, on hwgen's contract):

* the hardware accumulator ``acc`` is an exact integer; the float the executor's MatMul/Gemm/Conv
  produces is ``S_c * (gamma * acc + delta_c) + bias_c`` with ``S_c`` the product of the input
  and weight scales (``gamma``, ``delta`` undo the bipolar and zero-point encodings);
* a 1-bit output (``BipolarQuant``) becomes ``acc >= T_c``: ``T_c`` is found by bisection over
  the accumulator's whole range, evaluating the layer's *own* element-wise tail (BN, scales,
  biases, the quantizer) with qonnx's executor, so the threshold is where the source model flips;
* a 2-4-bit output (``Quant``, signed or not, after any BN, scales, biases, ReLU) becomes a
  multi-threshold layer: its k-bit level is the code minus the quantizer's least code, and each of
  the channel's ``2**k - 1`` thresholds is found by the same bisection with the executor;
* a 5-8-bit output (``Quant``) becomes hwgen's requantizer with ``rounding="half_even"`` (QONNX's
  ``ROUND``); its ``(M0, s)``, bias and clamp are accepted only after a proof that they give the
  source model's code at every accumulator of the range: both are monotone step functions, so
  agreeing at every step of the model and one below it is agreeing everywhere. Where no
  requantizer passes (a bias off the accumulator grid, BatchNorm before a 5-8-bit quantizer) the
  import is refused, naming the node;
* the last layer's tail must be one positive affine map for all classes (``OutputScale``), so
  raw integer scores rank the classes as the float outputs do.

The executor computes in float32. Where a model's scales are powers of two and its biases lie on
the accumulator grid, every float it computes before a quantizer is exact and the import agrees
with it on every code; with other scales its matrix products round, and it can differ from the
exact value (and so from hwgen) on an accumulator within float32 rounding of a threshold.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import golden
from ..errors import UserError
from .checks import require_finite
from ..ir import (ACC_LIMIT, INT8_WEIGHT_LIMIT, MULTIPLIER_RANGE, SHIFT_RANGE, Conv2dLayer, DenseLayer,
                  InputQuantizer, IntegerModel, MaxPool2dLayer, OutputScale, Requant, first_reached,
                  fold_multithreshold, fold_threshold, negate_rows, quantize_multiplier)

QUANTIZERS = ("Quant", "BipolarQuant", "MultiThreshold")
TAIL_OPS = ("Add", "Sub", "Mul", "Div", "BatchNormalization", "Relu")
REORDER_OPS = ("Reshape", "Flatten", "Transpose")
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
PREPROCESS_OPS = ("Mul", "Div", "Add", "Sub")
#: Activation quantizers of up to this many bits become multi-threshold units; wider ones requantizers.
MULTITHRESHOLD_MAX_BITS = 4
SUPPORTED = ("Quant (activations: 2-4 bits as multi-thresholds, 5-8 bits requantized, 1 bit signed; "
             "weights: 1-8 bits), BipolarQuant, MultiThreshold (one threshold), MatMul, Gemm, Conv, BatchNormalization, Relu, MaxPool, Flatten, Reshape, Transpose, and Add/Sub/Mul/Div "
             "by constants")


def import_model(path: Path | str) -> IntegerModel:
    """Read a QONNX model (as Brevitas's ``export_qonnx`` writes it) and return its integer model.

    Raises
    ------
    UserError
        The file cannot be read, or a node, attribute or shape is outside what hwgen supports; the
        message names the node, its op type and what is supported.
    """
    graph = _Graph(_load(Path(path)), Path(path))
    return _Importer(graph).run()


# --- reading the graph -------------------------------------------------------------------------

def _load(path: Path):
    import onnx
    from onnx import numpy_helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    if not path.is_file():
        raise UserError(f"{path}: ONNX model file not found")
    try:
        proto = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError, a missing external-data file, ...
        raise UserError(f"{path}: not a readable ONNX model ({type(error).__name__}: {error}); export it again "
                        "with brevitas.export.export_qonnx and keep its .onnx.data file beside it") from None
    _check_acyclic(proto.graph, path)
    require_finite(path, ((init.name, numpy_helper.to_array(init)) for init in proto.graph.initializer),
                   "initializer")
    constants = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in constants]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise UserError(f"{path}: the graph has {len(inputs)} inputs and {len(proto.graph.output)} "
                        "outputs; hwgen imports networks with one input and one output")
    try:
        return cleanup_model(ModelWrapper(proto))
    except Exception as error:
        raise UserError(f"{path}: qonnx could not clean up the graph ({type(error).__name__}: {error})") from None


def _check_acyclic(graph, path: Path) -> None:
    """Refuse a graph whose nodes cannot be ordered (a tensor that depends on itself)."""
    produced_by = {out: index for index, node in enumerate(graph.node) for out in node.output}
    state: dict[int, int] = {}     # 1: on the current path, 2: finished

    for root in range(len(graph.node)):
        if state.get(root):
            continue
        stack = [(root, iter(graph.node[root].input))]
        state[root] = 1
        while stack:
            index, inputs = stack[-1]
            for name in inputs:
                producer = produced_by.get(name)
                if producer is None:
                    continue
                if state.get(producer) == 1:
                    node = graph.node[producer]
                    raise UserError(f"{path}: the graph has a cycle through node {node.name or node.output[0]!r} "
                                    f"({node.op_type}); an ONNX graph must be acyclic")
                if not state.get(producer):
                    state[producer] = 1
                    stack.append((producer, iter(graph.node[producer].input)))
                    break
            else:
                state[index] = 2
                stack.pop()


class _Graph:
    """The cleaned-up model with the look-ups the importer needs."""

    def __init__(self, model, path: Path):
        self.model, self.path = model, path
        self.nodes = list(model.graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        constants = {init.name for init in model.graph.initializer}
        self.input_name = next(i.name for i in model.graph.input if i.name not in constants)
        self.output_name = model.graph.output[0].name

    def refuse(self, node, what: str) -> UserError:
        return UserError(f"{self.path}: node {node.name!r} ({node.op_type}): {what}")

    def const(self, name: str) -> np.ndarray | None:
        value = self.model.get_initializer(name)
        return None if value is None else np.asarray(value)

    def need_const(self, node, index: int, what: str) -> np.ndarray:
        value = self.const(node.input[index]) if index < len(node.input) else None
        if value is None:
            raise self.refuse(node, f"{what} (input {index}) must be a constant; hwgen imports fixed scales, "
                                    "weights and biases")
        return value

    def attr(self, node, name: str, default=None):
        from onnx import helper
        for attribute in node.attribute:
            if attribute.name == name:
                value = helper.get_attribute_value(attribute)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in self.model.get_tensor_shape(name))

    def next_node(self, tensor: str):
        """The one node reading ``tensor``, or None at the graph output; refuses a branch."""
        readers = self.consumers.get(tensor, [])
        if tensor == self.output_name and not readers:
            return None
        if len(readers) != 1:
            node = self.producer.get(tensor)
            where = f"node {node.name!r} ({node.op_type})" if node is not None else "the graph input"
            raise UserError(f"{self.path}: the output {tensor!r} of {where} is read by {len(readers)} nodes; "
                            "hwgen imports a chain of layers (no branches or skip connections)")
        return readers[0]

    def moving_input(self, node) -> int:
        """Index of the one non-constant input of an element-wise node."""
        moving = [i for i, name in enumerate(node.input) if self.const(name) is None]
        if len(moving) != 1:
            raise self.refuse(node, "needs exactly one non-constant input (the activation)")
        return moving[0]


@dataclass(frozen=True)
class _Quantizer:
    """An activation quantizer: its codes and what one code is worth."""

    node: object
    kind: str                  # "bipolar" (codes 0/1 for -1/+1) or "int"
    scale: float
    zero_point: int = 0
    bits: int = 1
    signed: bool = True
    narrow: bool = False
    thresholds: int = 0        # MultiThreshold only: thresholds per channel
    out_scale: float = 1.0
    out_bias: float = 0.0

    @property
    def code_range(self) -> tuple[int, int]:
        if self.kind == "bipolar":
            return (0, 1)
        if self.signed:
            return (-(1 << (self.bits - 1)) + int(self.narrow), (1 << (self.bits - 1)) - 1)
        return (0, (1 << self.bits) - 1 - int(self.narrow))

    def codes(self, outputs: np.ndarray) -> np.ndarray:
        """The integer codes behind the executor's float outputs of this node."""
        return codes_of(self.header(), outputs)

    def header(self) -> dict:
        return {"kind": self.kind, "scale": float(self.scale), "zero_point": int(self.zero_point),
                "op": self.node.op_type, "out_scale": float(self.out_scale), "out_bias": float(self.out_bias)}


def codes_of(quantizer: dict, outputs: np.ndarray) -> np.ndarray:
    """The integer codes behind a quantizer node's float outputs (``quantizer`` as recorded in the IR info)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if quantizer["op"] == "MultiThreshold":
        return np.rint((outputs - quantizer["out_bias"]) / quantizer["out_scale"]).astype(np.int64)
    if quantizer["kind"] == "bipolar":
        return (outputs > 0).astype(np.int64)
    return np.rint(outputs / quantizer["scale"] + quantizer["zero_point"]).astype(np.int64)


def _scalar(graph: _Graph, node, value: np.ndarray, what: str) -> float:
    if value.size != 1:
        raise graph.refuse(node, f"{what} has {value.size} values; hwgen needs one {what} for the whole tensor here "
                                 "(per-tensor activation quantization)")
    return float(value.reshape(-1)[0])


def _quantizer(graph: _Graph, node) -> _Quantizer:
    """Parse an activation quantizer node."""
    if node.op_type == "BipolarQuant":
        scale = _scalar(graph, node, graph.need_const(node, 1, "scale"), "scale")
        if not scale > 0:
            raise graph.refuse(node, f"scale {scale} must be positive")
        return _Quantizer(node, "bipolar", scale)
    if node.op_type == "MultiThreshold":
        thresholds = graph.need_const(node, 1, "thresholds")
        out_scale, out_bias = float(graph.attr(node, "out_scale", 1.0)), float(graph.attr(node, "out_bias", 0.0))
        if thresholds.ndim != 2 or thresholds.shape[1] != 1:
            raise graph.refuse(node, f"has {thresholds.shape[-1]} thresholds per channel; hwgen imports "
                                     "MultiThreshold with one threshold (a 1-bit activation)")
        if not (out_scale > 0 and np.isclose(out_bias, -out_scale / 2)):
            raise graph.refuse(node, f"out_scale {out_scale}, out_bias {out_bias}: hwgen imports a one-threshold "
                                     "MultiThreshold as a bipolar activation (out_bias = -out_scale / 2)")
        return _Quantizer(node, "bipolar", out_scale / 2, thresholds=1, out_scale=out_scale, out_bias=out_bias)
    scale = _scalar(graph, node, graph.need_const(node, 1, "scale"), "scale")
    zero_point = _scalar(graph, node, graph.need_const(node, 2, "zero point"), "zero point")
    bits = _scalar(graph, node, graph.need_const(node, 3, "bit width"), "bit width")
    signed, narrow = bool(graph.attr(node, "signed", 1)), bool(graph.attr(node, "narrow", 0))
    rounding = str(graph.attr(node, "rounding_mode", "ROUND")).upper()
    if not scale > 0:
        raise graph.refuse(node, f"scale {scale} must be positive")
    if bits != int(bits) or not 1 <= bits <= 8:
        raise graph.refuse(node, f"bit width {bits}: hwgen imports activations of 1 to 8 bits")
    if zero_point != int(zero_point):
        raise graph.refuse(node, f"zero point {zero_point} is not an integer")
    if rounding not in ("ROUND", "HALF_EVEN"):
        raise graph.refuse(node, f"rounding_mode {rounding}: hwgen imports ROUND (half to even)")
    if int(bits) == 1:
        if not signed:
            raise graph.refuse(node, "an unsigned 1-bit Quant is not supported; use BipolarQuant (-1/+1)")
        return _Quantizer(node, "bipolar", scale)
    return _Quantizer(node, "int", scale, int(zero_point), int(bits), signed, narrow)


@dataclass(frozen=True)
class _Act:
    """What the hardware carries between layers, and what its integers mean in the source model.

    The source value is ``scale * (mul * hw - offset)``: ``mul = 1, offset = code_offset + zp``
    for integer codes, ``mul = 2, offset = 1`` for bipolar bits carried as integers.
    """

    kind: str          # "bits", "uint8" or "int8"
    scale: float
    mul: int = 1
    offset: int = 0


def _canonical_layout(logical_shape: tuple[int, ...]) -> np.ndarray:
    """hwgen's flat index of every element of a logical tensor (C, H, W) or (N,)."""
    if len(logical_shape) == 3:
        channels, height, width = logical_shape
        return np.arange(height * width * channels).reshape(height, width, channels).transpose(2, 0, 1)
    return np.arange(int(np.prod(logical_shape))).reshape(logical_shape)


# --- the import ---------------------------------------------------------------------------------

class _Importer:
    def __init__(self, graph: _Graph):
        self.g = graph
        self.layers: list = []
        self.tensors: list[dict] = []      # quantized tensors shared with the executor
        self.counts = {"dense": 0, "conv": 0, "pool": 0}

    def name(self, kind: str) -> str:
        index = self.counts[kind]
        self.counts[kind] += 1
        return f"{kind}{index}"

    def run(self) -> IntegerModel:
        g = self.g
        quantizer_node, preprocess = self._walk_to_input_quantizer()
        quantizer = _quantizer(g, quantizer_node)
        tensor_shape = g.shape(quantizer_node.input[0])
        if tensor_shape[0] != 1 or len(tensor_shape) not in (2, 4):
            raise g.refuse(quantizer_node, f"input of shape {list(tensor_shape)}: hwgen imports (1, N) vectors or "
                                           "(1, C, H, W) images")
        logical = tensor_shape[1:]
        if quantizer.kind == "bipolar":
            input_quantizer = InputQuantizer(quantizer.scale, 0, 1, True, False, 0, tensor_shape, preprocess)
            act = _Act("uint8", quantizer.scale, mul=2, offset=1)
        else:
            code_offset = (1 << (quantizer.bits - 1)) if quantizer.signed else 0
            input_quantizer = InputQuantizer(quantizer.scale, quantizer.zero_point, quantizer.bits, quantizer.signed,
                                             quantizer.narrow, code_offset, tensor_shape, preprocess)
            act = _Act("uint8", quantizer.scale, 1, code_offset + quantizer.zero_point)
        input_shape = ((logical[1], logical[2]) if logical[0] == 1 else (logical[1], logical[2], logical[0])) \
            if len(logical) == 3 else (logical[0],)
        self.tensors.append({"layer": "input", "tensor": quantizer_node.output[0], "quantizer": quantizer.header(),
                             "layout": "nchw" if len(logical) == 3 else "flat"})
        layout = _canonical_layout(logical)
        tensor = quantizer_node.output[0]
        output_scale = None
        while True:
            node = g.next_node(tensor)
            if node is None:
                raise UserError(f"{g.path}: the graph ends after a quantizer; hwgen needs a last MatMul, Gemm or "
                                "Conv whose scores are the output")
            if node.op_type in REORDER_OPS:
                layout = self._reorder(node, layout)
                tensor = node.output[0]
                continue
            if node.op_type == "MaxPool":
                if not self.layers or not isinstance(self.layers[-1], (Conv2dLayer, MaxPool2dLayer)) \
                        or layout.ndim != 3:
                    raise g.refuse(node, "max-pool is supported on the quantized output of a convolution")
                layout, tensor = self._maxpool(node, layout, act)
                continue
            if node.op_type not in COMPUTE_OPS:
                raise g.refuse(node, f"is not supported where a layer should start; hwgen imports {SUPPORTED}")
            step = self._compute(node, layout, act)
            tail, end = self._tail(node)
            if end is None:
                output_scale = self._output_layer(step, tail)
                break
            quantizer = _quantizer(g, end)
            act, layout = self._hidden_layer(step, tail, end, quantizer)
            tensor = end.output[0]
        info = {"source": "qonnx", "qonnx": {"file": g.path.name, "output": g.output_name, "tensors": self.tensors}}
        return IntegerModel(input_shape, tuple(self.layers), info, input_quantizer, output_scale)

    # -- input ------------------------------------------------------------------------------------

    def _walk_to_input_quantizer(self):
        g = self.g
        preprocess: list[tuple[str, float]] = []
        tensor = g.input_name
        while True:
            node = g.next_node(tensor)
            if node is None:
                raise UserError(f"{g.path}: the graph has no quantizer; hwgen imports quantized (QONNX) networks")
            if node.op_type in ("Quant", "BipolarQuant"):
                return node, tuple(preprocess)
            if node.op_type in ("Reshape", "Flatten"):
                tensor = node.output[0]
                continue
            if node.op_type in PREPROCESS_OPS and g.moving_input(node) == 0:
                constant = g.need_const(node, 1, "the constant")
                preprocess.append((node.op_type, _scalar(g, node, constant, "constant")))
                tensor = node.output[0]
                continue
            raise g.refuse(node, "comes before the input quantizer; hwgen needs the graph's input to reach a Quant "
                                 "or BipolarQuant through reshapes and scalar Mul/Div/Add/Sub only")

    # -- shapes -----------------------------------------------------------------------------------

    def _reorder(self, node, layout: np.ndarray) -> np.ndarray:
        g = self.g
        out_shape = g.shape(node.output[0])
        if out_shape[0] != 1:
            raise g.refuse(node, f"changes the batch axis (output shape {list(out_shape)})")
        if node.op_type == "Transpose":
            perm = list(g.attr(node, "perm", []))
            if not perm or perm[0] != 0:
                raise g.refuse(node, f"perm {perm} moves the batch axis")
            return layout.transpose([p - 1 for p in perm[1:]])
        return layout.reshape(out_shape[1:])

    def _maxpool(self, node, layout: np.ndarray, act: _Act):
        g = self.g
        kernel = list(g.attr(node, "kernel_shape", []))
        strides = list(g.attr(node, "strides", kernel))
        pads = list(g.attr(node, "pads", [0, 0, 0, 0]))
        if len(kernel) != 2 or kernel[0] != kernel[1] or strides != kernel or any(pads) \
                or g.attr(node, "ceil_mode", 0) or any(d != 1 for d in g.attr(node, "dilations", [1, 1])):
            raise g.refuse(node, f"kernel {kernel}, strides {strides}, pads {pads}: hwgen pools K x K windows with "
                                 "stride K, no padding, floor mode")
        if not np.array_equal(layout, _canonical_layout(layout.shape)):
            raise g.refuse(node, "its input was reordered by a Transpose; hwgen pools maps in (H, W, C) order")
        channels, height, width = layout.shape
        pool = MaxPool2dLayer(self.name("pool"), (height, width, channels), int(kernel[0]), act.kind)
        self.layers.append(pool)
        self.tensors.append({"layer": pool.name, "tensor": node.output[0], "quantizer": self.tensors[-1]["quantizer"],
                             "layout": "nchw", "code_offset": self.tensors[-1].get("code_offset", 0)})
        out = pool.out_shape
        return _canonical_layout((out[2], out[0], out[1])), node.output[0]

    # -- layers -----------------------------------------------------------------------------------

    def _weights(self, node, index: int, out_axis: int):
        """Integer weight codes and their per-output-channel scale."""
        from qonnx.custom_op.general.quant import quant

        g = self.g
        name = node.input[index]
        source = g.producer.get(name)
        if source is None or source.op_type not in ("Quant", "BipolarQuant") or g.const(source.input[0]) is None:
            raise g.refuse(node, "its weights are not quantized by a Quant or BipolarQuant on a constant; "
                                 "hwgen imports quantized weights (Brevitas QuantLinear/QuantConv2d)")
        latent = g.const(source.input[0]).astype(np.float32)
        scale = g.need_const(source, 1, "weight scale").astype(np.float32)
        if source.op_type == "BipolarQuant" or (source.op_type == "Quant"
                                                 and float(g.need_const(source, 3, "bit width").reshape(-1)[0]) == 1):
            codes, kind = np.where(latent >= 0, 1, -1).astype(np.int64), "binary"
        else:
            zero_point = g.need_const(source, 2, "weight zero point")
            bit_width = g.need_const(source, 3, "bit width")
            bits = float(bit_width.reshape(-1)[0])
            if np.any(zero_point != 0) or not g.attr(source, "signed", 1):
                raise g.refuse(source, "weights need a signed quantizer with zero point 0 (symmetric)")
            if bits > 8 or bits != int(bits):
                raise g.refuse(source, f"weights of {bits} bits: hwgen imports weights of 1 to 8 bits")
            dequantized = quant(latent, scale, zero_point, bit_width, 1, g.attr(source, "narrow", 0),
                                g.attr(source, "rounding_mode", "ROUND"))
            codes = np.rint(dequantized / np.broadcast_to(scale, latent.shape)).astype(np.int64)
            # 2-bit codes are ternary (narrow range, Brevitas's default) or int2 {-2, ..., 1}.
            kind = ("ternary" if codes.min() >= -1 else "int2") if bits == 2 else "int8"
            if codes.min() < -INT8_WEIGHT_LIMIT:
                raise g.refuse(source, f"a weight code is {codes.min()}; hwgen's int8 weights are symmetric "
                                       "[-127, 127]: quantize with narrow_range=True")
        full = np.broadcast_to(scale, latent.shape)
        per_channel = np.moveaxis(full, out_axis, 0).reshape(full.shape[out_axis], -1)
        if not np.all(per_channel == per_channel[:, :1]):
            raise g.refuse(source, "the weight scale varies along an input axis; hwgen supports per-tensor or "
                                   "per-output-channel weight scales")
        if not np.all(per_channel[:, 0] > 0):
            raise g.refuse(source, "weight scales must be positive")
        return codes, per_channel[:, 0].astype(np.float64), kind

    def _bias(self, node, index: int, channels: int) -> np.ndarray:
        from qonnx.custom_op.general.quant import quant

        g = self.g
        if len(node.input) <= index or not node.input[index]:
            return np.zeros(channels)
        name = node.input[index]
        value = g.const(name)
        if value is None:
            source = g.producer.get(name)
            if source is None or source.op_type != "Quant" or g.const(source.input[0]) is None:
                raise g.refuse(node, "its bias must be a constant or a Quant of a constant")
            value = quant(g.const(source.input[0]).astype(np.float32),
                          *(g.need_const(source, i, "bias quantizer parameter") for i in (1, 2, 3)),
                          g.attr(source, "signed", 1), g.attr(source, "narrow", 0), g.attr(source, "rounding_mode", "ROUND"))
        value = np.broadcast_to(np.asarray(value, dtype=np.float32).reshape(-1), (channels,))
        return value.astype(np.float64)

    def _compute(self, node, layout: np.ndarray, act: _Act) -> dict:
        """The raw layer of a MatMul/Gemm/Conv: weights in hwgen order, accumulator encoding, scales."""
        g = self.g
        if node.op_type == "Conv":
            if layout.ndim != 3 or not np.array_equal(layout, _canonical_layout(layout.shape)):
                raise g.refuse(node, "its input is not a (C, H, W) map in streaming order")
            kernel = list(g.attr(node, "kernel_shape", []))
            strides = list(g.attr(node, "strides", [1, 1]))
            pads = list(g.attr(node, "pads", [0, 0, 0, 0]))
            dilations = list(g.attr(node, "dilations", [1, 1]))
            group = int(g.attr(node, "group", 1))
            if group != 1:
                raise g.refuse(node, f"group {group}: hwgen supports ordinary convolutions (group 1)")
            if any(d != 1 for d in dilations):
                raise g.refuse(node, f"dilations {dilations}: hwgen supports dilation 1")
            if len(kernel) != 2 or kernel[0] != kernel[1] or len(set(strides)) != 1 or len(set(pads)) != 1:
                raise g.refuse(node, f"kernel {kernel}, strides {strides}, pads {pads}: hwgen supports square "
                                     "kernels with one stride and the same padding on every side")
            codes, w_scale, weight_kind = self._weights(node, 1, 0)
            c_out, c_in = codes.shape[:2]
            channels, height, width = layout.shape
            if c_in != channels:
                raise g.refuse(node, f"weights expect {c_in} input channels, the map has {channels}")
            padding = int(pads[0])
            if padding and (act.kind == "bits" or act.offset or act.mul != 1):
                raise g.refuse(node, f"pads {pads}: the source model pads with 0, which hwgen's integer codes of "
                                     "this input cannot hold (bipolar values, or a zero point); use padding 0")
            matrix = codes.transpose(0, 2, 3, 1).reshape(c_out, -1)
            bias = self._bias(node, 2, c_out)
            geometry = ((height, width, channels), int(kernel[0]), int(strides[0]), padding)
            name = self.name("conv")
        else:
            if layout.ndim != 1:
                raise g.refuse(node, f"its input has shape {list(layout.shape)}; flatten it first")
            if node.op_type == "Gemm":
                if g.attr(node, "transA", 0) or g.attr(node, "alpha", 1.0) != 1.0 or g.attr(node, "beta", 1.0) != 1.0:
                    raise g.refuse(node, "transA, alpha and beta must be 0, 1 and 1")
                trans_b = int(g.attr(node, "transB", 0))
            else:
                trans_b = 0
            codes, w_scale, weight_kind = self._weights(node, 1, 0 if trans_b else 1)
            logical = codes if trans_b else codes.T
            if logical.shape[1] != layout.size:
                raise g.refuse(node, f"weights expect {logical.shape[1]} inputs, the tensor has {layout.size}")
            matrix = np.empty_like(logical)
            matrix[:, layout.reshape(-1)] = logical
            bias = self._bias(node, 2, logical.shape[0]) if node.op_type == "Gemm" else np.zeros(logical.shape[0])
            geometry = None
            name = self.name("dense")
        weights = (matrix > 0).astype(np.uint8) if weight_kind == "binary" else matrix.astype(np.int8)
        raw = DenseLayer(name, act.kind, "scores", weights, None, weight_kind)
        rows = raw.weight_values.sum(axis=1)
        if raw.is_popcount:
            gamma, delta, hw_bias = 2, np.full(raw.out_features, -raw.in_features, np.int64), None
        elif act.kind == "bits" or act.mul == 1:
            gamma, delta = 1, np.zeros(raw.out_features, np.int64)
            hw_bias = None if act.kind == "bits" or not act.offset else -act.offset * rows
        else:
            gamma, delta, hw_bias = act.mul, -act.offset * rows, None
        scale = act.scale * w_scale
        # A bias on the accumulator grid goes into the accumulator; any other stays with the tail.
        # Brevitas's Int32Bias is an integer times the float32 product of the scales, so "on the grid"
        # allows float32's relative error (far below half a step for any int32 bias).
        grid = bias / scale
        on_grid = np.abs(grid - np.rint(grid)) <= 1e-6 * np.abs(grid)
        if not raw.is_popcount and np.all(on_grid) and np.all(np.abs(grid) < 2**30) and gamma == 1:
            hw_bias = (0 if hw_bias is None else hw_bias) + np.rint(grid).astype(np.int64)
            bias = np.zeros_like(bias)
        if hw_bias is not None and np.any(hw_bias):
            raw = DenseLayer(name, act.kind, "scores", weights, None, weight_kind, hw_bias.astype(np.int64))
        if not (-ACC_LIMIT <= raw.acc_min and raw.acc_max < ACC_LIMIT):
            raise g.refuse(node, f"its accumulator range [{raw.acc_min}, {raw.acc_max}] exceeds int32")
        return {"node": node, "raw": raw, "geometry": geometry, "scale": scale, "gamma": gamma, "delta": delta,
                "bias": bias}

    def _tail(self, compute_node):
        """The element-wise nodes after a layer, up to its quantizer (returned apart) or the graph output."""
        g = self.g
        tail, tensor = [], compute_node.output[0]
        while True:
            node = g.next_node(tensor)
            if node is None:
                return tail, None
            if node.op_type in QUANTIZERS:
                return tail, node
            if node.op_type not in TAIL_OPS:
                raise g.refuse(node, f"follows layer node {compute_node.name!r} before its quantizer; supported "
                                     f"there: {', '.join(TAIL_OPS)}")
            if node.op_type in ("BatchNormalization", "Relu"):
                if g.const(node.input[0]) is not None:
                    raise g.refuse(node, "its data input must be the activation")
            else:
                g.moving_input(node)
            tail.append(node)
            tensor = node.output[0]

    def _x(self, step: dict, acc: np.ndarray) -> np.ndarray:
        """The float32 value the source model's matrix product gives for hardware accumulators ``acc``."""
        return (step["scale"] * (step["gamma"] * acc + step["delta"]) + step["bias"]).astype(np.float32)

    def _affine(self, tail: list, channels: int):
        """Per-channel ``a * x + b`` of a tail of Add/Sub/Mul/Div/BatchNormalization (float64); Relu refused."""
        g = self.g
        a, b = np.ones(channels), np.zeros(channels)
        for node in tail:
            if node.op_type == "Relu":
                raise g.refuse(node, "a Relu is supported only directly before a quantizer")
            if node.op_type == "BatchNormalization":
                gamma, beta, mean, var = (np.broadcast_to(g.need_const(node, i, "BN parameter").astype(np.float64)
                                                          .reshape(-1), (channels,)) for i in (1, 2, 3, 4))
                k = gamma / np.sqrt(var + float(g.attr(node, "epsilon", 1e-5)))
                a, b = a * k, (b - mean) * k + beta
                continue
            moving = g.moving_input(node)
            constant = g.const(node.input[1 - moving]).astype(np.float64)
            squeezed = np.squeeze(constant)
            if squeezed.size not in (1, channels):
                raise g.refuse(node, f"constant of shape {list(constant.shape)}: hwgen needs one value or one per channel")
            c = np.broadcast_to(squeezed.reshape(-1), (channels,))
            if node.op_type == "Add":
                b = b + c
            elif node.op_type == "Sub":
                a, b = (a, b - c) if moving == 0 else (-a, c - b)
            elif node.op_type == "Mul":
                a, b = a * c, b * c
            elif moving == 0:
                a, b = a / c, b / c
            else:
                raise g.refuse(node, "divides a constant by the activation")
        return a, b

    def _output_layer(self, step: dict, tail: list) -> OutputScale:
        g, raw = self.g, step["raw"]
        a, b = self._affine(tail, raw.out_features)
        scale = a * step["scale"] * step["gamma"]
        offset = a * (step["scale"] * step["delta"] + step["bias"]) + b
        node = tail[-1] if tail else step["node"]
        if not np.allclose(scale, scale[0], rtol=1e-6, atol=0) or scale[0] == 0:
            raise g.refuse(node, "the scale from the last layer's integer scores to the outputs differs between "
                                 "classes (per-channel weight scales or a BatchNorm after the last layer); the raw "
                                 "scores would then not rank the classes: quantize the last layer's weights per tensor")
        if scale[0] < 0:   # negate every row: the scores' order is the outputs' again
            raw = negate_rows(raw, np.ones(raw.out_features, bool))
            if raw.is_popcount:
                offset = offset + scale * raw.in_features
            scale = -scale
        steps = (offset - offset[0]) / scale[0]
        if not np.allclose(steps, 0, atol=1e-6 * max(1.0, float(np.abs(offset).max()))):
            if raw.is_popcount or not np.all(np.abs(steps - np.rint(steps)) <= 1e-6 * np.abs(steps)):
                raise g.refuse(node, "the last layer's outputs have a per-class offset that is not a whole number of "
                                     "score units; integer scores would not rank the classes as the outputs do")
            raw = DenseLayer(raw.name, raw.input_kind, "scores", raw.weights, None, raw.weight_kind,
                             raw.bias_values + np.rint(steps).astype(np.int64))
        self._append(step, raw)
        return OutputScale(float(scale[0]), float(offset[0]))

    def _append(self, step: dict, layer: DenseLayer) -> None:
        if step["geometry"] is None:
            self.layers.append(layer)
        else:
            in_shape, kernel, stride, padding = step["geometry"]
            self.layers.append(Conv2dLayer(layer, in_shape, kernel, stride, padding))

    def _hidden_layer(self, step: dict, tail: list, end, quantizer: _Quantizer):
        g, raw = self.g, step["raw"]
        code_offset = 0
        if quantizer.kind == "bipolar":
            runner = _TailRunner(g, tail + [end], step["node"].output[0], raw.out_features,
                                 step["geometry"] is not None)

            def positive(acc: np.ndarray) -> np.ndarray:
                return quantizer.codes(runner(self._x(step, acc[None, :])))[0] > 0

            lo, hi = raw.channel_acc_bounds
            layer = fold_threshold(raw, positive, positive(lo) & ~positive(hi))
            next_act = _Act("bits", quantizer.scale)
        elif quantizer.bits <= MULTITHRESHOLD_MAX_BITS:
            layer, code_offset = self._multithreshold_layer(step, tail, end, quantizer)
            next_act = _Act(f"uint{quantizer.bits}", quantizer.scale, 1, quantizer.zero_point - code_offset)
        else:
            layer = self._requant_layer(step, tail, end, quantizer)
            next_act = _Act("int8" if quantizer.signed else "uint8", quantizer.scale, 1, quantizer.zero_point)
        self._append(step, layer)
        self.tensors.append({"layer": layer.name, "tensor": end.output[0], "quantizer": quantizer.header(),
                             "layout": "flat" if step["geometry"] is None else "nchw",
                             "code_offset": code_offset})
        out = self.layers[-1]
        new_layout = _canonical_layout((out.out_shape[2], out.out_shape[0], out.out_shape[1])) \
            if step["geometry"] is not None else np.arange(out.out_features)
        return next_act, new_layout

    def _multithreshold_layer(self, step: dict, tail: list, end, quantizer: _Quantizer) -> tuple[DenseLayer, int]:
        """A 2-4-bit quantizer after any monotone tail (BN, scales, biases, ReLU) as a multi-threshold
        layer, and the code its level 0 stands for.

        The level is the code minus the quantizer's least code (a signed 2-bit narrow quantizer's
        -1, 0, +1 become levels 0, 1, 2; level 3 is never reached). Each threshold is where the
        source model's code, computed by qonnx's executor on the layer's own tail, first reaches
        that level: bisection over the whole accumulator range, exact like the 1-bit threshold.
        """
        g, raw = self.g, step["raw"]
        code_offset = quantizer.code_range[0]
        runner = _TailRunner(g, tail + [end], step["node"].output[0], raw.out_features, step["geometry"] is not None)

        def level(acc: np.ndarray) -> np.ndarray:
            return quantizer.codes(runner(self._x(step, np.asarray(acc)[None, :])))[0] - code_offset

        lo, hi = raw.channel_acc_bounds
        try:
            layer = fold_multithreshold(raw, level, level(lo) > level(hi), quantizer.bits)
        except ValueError as error:
            raise g.refuse(end, str(error)) from None
        return layer, code_offset

    def _requant_layer(self, step: dict, tail: list, end, quantizer: _Quantizer) -> DenseLayer:
        """A 2-8-bit quantizer after an affine tail as a half-even requantizer, proved at every step.

        The source model's code is ``clamp(round_half_even(m * acc + k), lo, hi)``, evaluated in
        float64 from its float32 constants (exact for power-of-two scales; elsewhere the real value
        to about 1e-16, where the executor's float32 can stray near a tie).
        """
        g, raw = self.g, step["raw"]
        if end.op_type != "Quant":
            raise g.refuse(end, "a multi-bit MultiThreshold is not supported; use a Quant node")
        relu = bool(tail) and tail[-1].op_type == "Relu"
        a, b = self._affine(tail[:-1] if relu else tail, raw.out_features)
        q_min, q_max = quantizer.code_range
        lo_code = max(q_min, quantizer.zero_point) if relu else q_min
        if np.any(a == 0):
            raise g.refuse(end, "a channel's output does not depend on its input (a zero scale); hwgen cannot "
                                "requantize a constant channel")
        m_raw = a * step["scale"] * step["gamma"] / quantizer.scale
        k_raw = (a * (step["scale"] * step["delta"] + step["bias"]) + b) / quantizer.scale + quantizer.zero_point
        # decreasing channels are negated: the raw accumulator is -acc (or N - acc on a popcount layer)
        decreasing = m_raw < 0
        layer = negate_rows(raw, decreasing)
        m = np.abs(m_raw)
        k = k_raw + np.where(decreasing & raw.is_popcount, m_raw * raw.in_features, 0.0)
        lo, hi = layer.channel_acc_bounds

        def model_codes(acc: np.ndarray) -> np.ndarray:
            return np.clip(np.round(m * acc.astype(np.float64) + k), lo_code, q_max).astype(np.int64)

        levels = np.arange(q_min + 1, q_max + 1)[:, None]
        steps = first_reached(np.broadcast_to(lo, (len(levels), len(lo))), np.broadcast_to(hi, (len(levels), len(lo))),
                              lambda acc: model_codes(acc) >= levels)
        probes = np.clip(np.concatenate([steps - 1, steps, lo[None, :], hi[None, :]]), lo, hi)
        want = model_codes(probes)
        base_bias = layer.bias_values
        base_m0, shift = np.zeros(len(m), np.int64), np.zeros(len(m), np.int64)
        for c, real in enumerate(m):
            try:
                base_m0[c], shift[c] = quantize_multiplier(float(real))
            except ValueError:
                raise g.refuse(end, f"requantization multiplier {real:.3g} is outside the range hwgen's "
                                    "requantizer represents") from None
        chosen_m0 = np.zeros(len(m), np.int64)
        chosen_shift = np.zeros(len(m), np.int64)
        chosen_bias = np.zeros(len(m), np.int64)
        done = np.zeros(len(m), bool)
        ideal_bias = (k - quantizer.zero_point) / m
        for bias_candidate in (np.rint(ideal_bias), np.floor(ideal_bias), np.ceil(ideal_bias)):
            for nudge in (0, 1, -1, 2, -2):
                m0 = np.clip(base_m0 + nudge, MULTIPLIER_RANGE[0], MULTIPLIER_RANGE[1] - 1)
                extra = bias_candidate.astype(np.int64)
                got = golden.requantize(probes + extra[None, :], m0[None, :], shift[None, :], quantizer.zero_point,
                                        lo_code, q_max, "half_even")
                ok = np.all(got == want, axis=0) & ~done
                chosen_m0[ok], chosen_shift[ok], chosen_bias[ok] = m0[ok], shift[ok], extra[ok]
                done |= ok
                if done.all():
                    break
            if done.all():
                break
        if not done.all():
            channel = int(np.argmin(done))
            raise g.refuse(end, f"channel {channel}: no requantizer (M0, shift, integer bias, half-even rounding) "
                                f"gives this {quantizer.bits}-bit quantizer's codes on the whole accumulator range "
                                "(a bias off the accumulator grid, or BatchNorm before a 5-8-bit quantizer); "
                                "quantize the bias with Int32Bias, or use an activation of at most "
                                f"{MULTITHRESHOLD_MAX_BITS} bits after BatchNorm")
        bias = base_bias + chosen_bias
        if np.any(np.abs(bias) >= 2**31) or not SHIFT_RANGE[0] <= chosen_shift.min() <= chosen_shift.max() <= SHIFT_RANGE[1]:
            raise g.refuse(end, "the requantizer's bias or shift is out of range")
        out_kind = "int8" if quantizer.signed else "uint8"
        requant = Requant(chosen_m0, chosen_shift, quantizer.zero_point, out_kind, lo_code, q_max, "half_even")
        return DenseLayer(raw.name, raw.input_kind, "requant", layer.weights, None, raw.weight_kind,
                          bias.astype(np.int64) if np.any(bias) else None, requant)


class _TailRunner:
    """A layer's element-wise tail as its own small QONNX model, run by qonnx's executor."""

    def __init__(self, graph: _Graph, nodes: list, input_name: str, channels: int, spatial: bool):
        self.graph, self.nodes, self.input_name = graph, nodes, input_name
        self.channels, self.spatial = channels, spatial
        self.models: dict[int, object] = {}

    def _model(self, batch: int):
        from onnx import TensorProto, helper
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes

        if batch not in self.models:
            source = self.graph.model
            shape = [batch, self.channels] + ([1, 1] if self.spatial else [])
            names = {name for node in self.nodes for name in node.input}
            initializers = [copy.deepcopy(init) for init in source.graph.initializer if init.name in names]
            graph = helper.make_graph(
                [copy.deepcopy(node) for node in self.nodes], "tail",
                [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, shape)],
                [helper.make_tensor_value_info(self.nodes[-1].output[0], TensorProto.FLOAT, None)],
                initializers)
            model = helper.make_model(graph, opset_imports=list(source.model.opset_import))
            self.models[batch] = ModelWrapper(model).transform(InferShapes())
        return self.models[batch]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from qonnx.core.onnx_exec import execute_onnx

        x = np.asarray(x, dtype=np.float32)
        batch = x.shape[0]
        feed = x.reshape(batch, self.channels, 1, 1) if self.spatial else x
        out = execute_onnx(self._model(batch), {self.input_name: feed})[self.nodes[-1].output[0]]
        return np.asarray(out).reshape(batch, self.channels)


# --- checking against the executor ---------------------------------------------------------------

@dataclass
class Agreement:
    """golden against qonnx's executor on a batch of inputs."""

    images: int
    tensors: list[tuple[str, str, int, int]] = field(default_factory=list)   # layer, tensor, elements, mismatches
    max_output_error: float = 0.0
    output_tolerance: float = 0.0
    classes_equal: int = 0
    classes_tied: int = 0       # executor's class differs, but golden scores tie it with golden's class
    first_mismatch: str | None = None

    @property
    def ok(self) -> bool:
        return (all(bad == 0 for *_, bad in self.tensors) and self.classes_equal + self.classes_tied == self.images
                and self.max_output_error <= self.output_tolerance)

    def summary(self) -> str:
        total = sum(n for _, _, n, _ in self.tensors)
        bad = sum(b for *_, b in self.tensors)
        lines = [f"golden vs qonnx execute_onnx on {self.images} inputs: {total - bad}/{total} quantized codes equal "
                 f"over {len(self.tensors)} tensors; classes equal on {self.classes_equal}/{self.images}"
                 + (f" (+{self.classes_tied} exact score ties that float32 broke otherwise)" if self.classes_tied else "")
                 + "; "
                 f"float outputs within {self.max_output_error:.3g} (tolerance {self.output_tolerance:.3g})"]
        lines += [f"  {layer:>8} {tensor}: {n - b}/{n}" for layer, tensor, n, b in self.tensors if b]
        if self.first_mismatch:
            lines.append(f"  first mismatch: {self.first_mismatch}")
        return "\n".join(lines)


def _batched(model, batch: int):
    """A copy of ``model`` whose batch axis is ``batch`` (reshape targets adjusted)."""
    from onnx import numpy_helper
    from qonnx.transformation.infer_shapes import InferShapes

    batched = copy.deepcopy(model)
    constants = {init.name for init in batched.graph.initializer}
    name = next(i.name for i in batched.graph.input if i.name not in constants)
    batched.set_tensor_shape(name, [batch] + list(batched.get_tensor_shape(name))[1:])
    del batched.graph.value_info[:]
    for output in batched.graph.output:
        output.type.tensor_type.ClearField("shape")
    for node in batched.graph.node:
        if node.op_type == "Reshape":
            target = batched.get_initializer(node.input[1])
            if target is not None and target.size and target[0] == 1:
                target = target.copy()
                target[0] = batch
                new_name = f"{node.input[1]}_batch{batch}_{node.name}"
                batched.graph.initializer.append(numpy_helper.from_array(target.astype(np.int64), new_name))
                node.input[1] = new_name
    return batched.transform(InferShapes())


def executor_outputs(path: Path | str, float_inputs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run qonnx's ``execute_onnx`` on the cleaned-up model for a batch; the named tensors."""
    from qonnx.core.onnx_exec import execute_onnx

    graph = _Graph(_load(Path(path)), Path(path))
    shape = graph.shape(graph.input_name)
    x = np.asarray(float_inputs, dtype=np.float32).reshape(-1, *shape[1:])
    context = execute_onnx(_batched(graph.model, len(x)), {graph.input_name: x}, return_full_exec_context=True)
    return {name: np.asarray(context[name]) for name in names}


def _hwgen_order(values: np.ndarray, layout: str) -> np.ndarray:
    values = np.asarray(values)
    if layout == "nchw":
        values = values.transpose(0, 2, 3, 1)
    return values.reshape(len(values), -1)


def float_inputs_for(model: IntegerModel, codes: np.ndarray) -> np.ndarray:
    """Float inputs (the quantizer's input tensor shape) whose quantized codes are ``codes`` (uint8, hwgen order).

    Valid when the input quantizer has no preprocessing: each code maps to its own dequantized value.
    """
    quantizer = model.input_quantizer
    if quantizer is None or quantizer.preprocess:
        raise UserError("codes can be turned back into float inputs only for an imported model whose input "
                        "quantizer has no preprocessing; pass --float-inputs FILE.npy")
    shape = quantizer.tensor_shape
    q = codes.astype(np.int64) - quantizer.code_offset
    if quantizer.bits == 1:
        values = (2 * q - 1) * quantizer.scale
    else:
        values = (q - quantizer.zero_point) * quantizer.scale
    values = values.astype(np.float32)
    if len(shape) == 4:
        _, channels, height, width = shape
        values = values.reshape(-1, height, width, channels).transpose(0, 3, 1, 2)
    return values.reshape(-1, *shape[1:])


def check_against_executor(path: Path | str, model: IntegerModel, float_inputs: np.ndarray) -> Agreement:
    """golden == ``execute_onnx`` on every quantized tensor the two share, and on the outputs.

    Codes are compared exactly; the float outputs as ``golden scores * scale + offset`` against the
    executor's, to float32 rounding; the class index exactly.
    """
    record = model.info.get("qonnx")
    if not record or model.input_quantizer is None or model.output_scale is None:
        raise UserError("this model was not imported from QONNX; there is no executor to check it against")
    x = np.asarray(float_inputs, dtype=np.float32)
    codes = model.input_quantizer.codes(x)
    result = golden.run(model, codes)
    names = [entry["tensor"] for entry in record["tensors"]] + [record["output"]]
    context = executor_outputs(path, x, names)
    by_layer = {layer.name: output for layer, output in zip(model.layers, result.outputs)}
    by_layer["input"] = codes.astype(np.int64) - model.input_quantizer.code_offset
    agreement = Agreement(len(codes))
    for entry in record["tensors"]:
        theirs = _hwgen_order(codes_of(entry["quantizer"], context[entry["tensor"]]), entry["layout"])
        ours = np.asarray(by_layer[entry["layer"]], dtype=np.int64) + entry.get("code_offset", 0)
        differ = theirs != ours
        agreement.tensors.append((entry["layer"], entry["tensor"], int(differ.size), int(differ.sum())))
        if differ.any() and agreement.first_mismatch is None:
            image, index = np.argwhere(differ)[0]
            agreement.first_mismatch = (f"input {image}, layer {entry['layer']} (tensor {entry['tensor']}), index "
                                        f"{index}: executor {theirs[image, index]}, golden {ours[image, index]}")
    theirs = context[record["output"]].reshape(len(codes), -1).astype(np.float64)
    ours = model.output_scale.floats(result.scores)
    agreement.max_output_error = float(np.abs(theirs - ours).max())
    agreement.output_tolerance = float(4e-6 * max(1.0, np.abs(theirs).max()))
    their_classes = np.argmax(theirs, axis=1)
    equal = their_classes == result.classes
    tied = ~equal & (result.scores[np.arange(len(codes)), their_classes] == result.scores.max(axis=1))
    agreement.classes_equal, agreement.classes_tied = int(equal.sum()), int(tied.sum())
    return agreement
