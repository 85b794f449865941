"""hwgen's own network templates: quantization-aware training in torch and export to the integer model.

One front end among several (see ``hwgen/frontends/``); with the QONNX importer, the only code that imports torch. Four kinds of MLP (``Architecture.kind``):

* ``float``: the reference (ReLU + BN), and the starting point of post-training int8 quantization;
* ``int8``: BN folded into weights and bias, int8 weights (symmetric, per output channel, the
  output layer per tensor so that raw scores keep the argmax), uint8 activations with zero point 0
  after ReLU, int32 bias, requantization with per-channel ``(M0, s)``; calibrated from a float
  model, optionally fine-tuned with fake quantization (STE);
* ``mixed``: an int8 first layer on uint8 pixels, binary hidden layers, an int8 output layer;
* ``binary``, below.

A binary MLP here is:

* a first layer taking uint8 pixels (as exact float integers) with ±1 weights,
* hidden layers with ±1 weights on ±1 activations (XNOR-popcount in hardware),
* BatchNorm + sign after every layer but the last (folded to thresholds on export),
* an output layer whose integer scores are the bipolar dot products; a positive learned scale
  turns them into logits for training and does not change the argmax.

Latent weights are clipped to [-1, 1] and binarized with a straight-through estimator;
activations use sign with a hard-tanh STE, and ``sign(0) = +1`` everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import Dataset
from ..errors import UserError
from .checks import require_finite
from ..ir import (INT8_WEIGHT_LIMIT, Conv2dLayer, DenseLayer, IntegerModel, MaxPool2dLayer, Requant,
                 fold_batchnorm_levels, fold_batchnorm_sign, quantize_multiplier, write_atomically)

UINT8_MAX = 255

CHECKPOINT_FORMAT = "hwgen-checkpoint"
CHECKPOINT_VERSION = 1


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; the gradient passes where |x| <= 1 (hard-tanh STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Bipolar sign with ``sign(0) = +1`` and a hard-tanh straight-through gradient."""
    return _SignSTE.apply(x)


#: Weight precisions of the ``binary`` templates, and their activation bits.
LOW_BIT_WEIGHTS = ("binary", "ternary", "int2")
ACT_BITS = (1, 2, 3, 4)
#: TWN's threshold: weights within ``TERNARY_DELTA * mean|w|`` of zero become 0 (Li & Liu, 2016).
TERNARY_DELTA = 0.7


class _LevelsSTE(torch.autograd.Function):
    """``round(clamp(y, 0, 1) * levels)`` (torch's round: ties to even); the gradient passes,
    scaled by ``levels``, where ``0 <= y <= 1`` (the clipped straight-through estimator of PACT and
    DoReFa with the clip fixed at 1: the BN in front of it learns the scale)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(y)
        ctx.levels = levels
        return torch.round(torch.clamp(y, 0.0, 1.0) * levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return grad * ((y >= 0) & (y <= 1)).to(grad.dtype) * ctx.levels, None


def activation(y: torch.Tensor, bits: int) -> torch.Tensor:
    """The hidden activation: bipolar sign for 1 bit, else the k-bit level ``0 .. 2**k - 1`` itself
    (an integer, so the next layer's accumulator is the hardware's); same operations as
    :func:`hwgen.ir.uniform_levels_reference`."""
    return binarize(y) if bits == 1 else _LevelsSTE.apply(y, (1 << bits) - 1)


class _StraightThrough(torch.autograd.Function):
    """``quantized`` (the weights' integer values, computed from them) with the gradient passed
    straight through to the latent weights."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ternary_delta(weight: torch.Tensor) -> torch.Tensor:
    """TWN's per-layer threshold ``0.7 * mean|w|`` over the latent weights (float32, as trained)."""
    return TERNARY_DELTA * weight.detach().abs().mean()


def int2_step(weight: torch.Tensor) -> torch.Tensor:
    """The per-layer step of 2-bit weights: ``mean|w|`` of the latent weights (float32, as trained)."""
    return weight.detach().abs().mean().clamp(min=1e-8)


def quantize_low_bit_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """±1 (``sign(0) = +1``), ternary {-1, 0, +1} or 2-bit {-2, -1, 0, 1} weights, with
    straight-through gradients."""
    if kind == "binary":
        return binarize(weight)
    with torch.no_grad():
        if kind == "ternary":
            quantized = torch.where(weight.abs() > ternary_delta(weight), torch.sign(weight), torch.zeros_like(weight))
        else:
            quantized = torch.clamp(torch.round(weight / int2_step(weight)), -2.0, 1.0)
    return _StraightThrough.apply(weight, quantized)


def low_bit_weight_values(weight: torch.Tensor, kind: str) -> np.ndarray:
    """The integer weights the forward pass uses: uint8 bits for binary, int8 values for ternary
    and 2-bit weights."""
    with torch.no_grad():
        if kind in ("ternary", "int2"):
            return quantize_low_bit_weight(weight, kind).to(torch.int8).cpu().numpy()
        return (weight.detach() >= 0).to(torch.uint8).cpu().numpy()


class BinaryLinear(nn.Linear):
    """Linear layer with ±1 (or ternary) weights: latent real weights in [-1, 1], quantized in the forward pass."""

    def __init__(self, in_features: int, out_features: int, weights: str = "binary"):
        super().__init__(in_features, out_features, bias=False)
        nn.init.uniform_(self.weight, -1.0, 1.0)
        self.weight_kind = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, quantize_low_bit_weight(self.weight, self.weight_kind))

    def clip_(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(-1.0, 1.0)

    def weight_bits(self) -> np.ndarray:
        return (self.weight.detach() >= 0).to(torch.uint8).cpu().numpy()

    def integer_weights(self) -> np.ndarray:
        """The IR's weights: bits (binary) or int8 values in [-1, 1] (ternary)."""
        return low_bit_weight_values(self.weight, self.weight_kind)


class BinaryConv2d(nn.Module):
    """K×K convolution with ±1 (or ternary) weights (latent real weights in [-1, 1]); padding is
    applied by the caller."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, weights: str = "binary"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel).uniform_(-1.0, 1.0))
        self.weight_kind = weights

    def clip_(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(-1.0, 1.0)

    def quantized_weight(self) -> torch.Tensor:
        return quantize_low_bit_weight(self.weight, self.weight_kind)

    def integer_weights(self) -> np.ndarray:
        """The IR's weights in its ``(C_out, K*K*C_in)`` layout, ``(ky, kx, c)`` order."""
        values = low_bit_weight_values(self.weight, self.weight_kind)
        return values.transpose(0, 2, 3, 1).reshape(len(values), -1)


@dataclass(frozen=True)
class Architecture:
    """Shape of a network: input image shape, optional conv front end, hidden widths, classes, kind.

    ``conv`` items are ``"<C>c<K>[s<S>][p<P>]"`` (a K×K convolution to C channels, stride S
    (default 1), padding P (default K // 2)) or ``"m<K>"`` (K×K max-pooling), e.g.
    ``("32c3", "m2", "64c3", "m2")``. Each convolution is followed by BN and the activation.
    """

    input_shape: tuple[int, ...]
    hidden: tuple[int, ...]
    classes: int
    kind: str = "binary"
    conv: tuple[str, ...] = ()
    #: Precision of a ``binary`` network's weights: ``"binary"`` (±1) or ``"ternary"`` ({-1, 0, +1}).
    weights: str = "binary"
    #: Bits of a ``binary`` network's hidden activations: 1 (±1, sign) or 2 to 4 (unsigned levels).
    act_bits: int = 1

    def __post_init__(self) -> None:
        if self.weights not in LOW_BIT_WEIGHTS:
            raise UserError(f"weights {self.weights!r}: choose one of {', '.join(LOW_BIT_WEIGHTS)}")
        if self.act_bits not in ACT_BITS:
            raise UserError(f"activation bits {self.act_bits}: choose one of {', '.join(map(str, ACT_BITS))}")
        if (self.weights, self.act_bits) != ("binary", 1) and self.kind != "binary":
            raise UserError(f"--weights {self.weights} --act-bits {self.act_bits} apply to --kind binary, "
                            f"not {self.kind}")

    @property
    def precision(self) -> str:
        """FINN's spelling of the precision: ``W1A1``, ``W1A2``, ``WtA2`` (ternary), ``W2A2`` (2-bit), ..."""
        return f"W{ {'binary': '1', 'ternary': 't', 'int2': '2'}[self.weights]}A{self.act_bits}"

    @property
    def conv_layers(self) -> list[tuple]:
        """Parsed ``conv``: ``("conv", channels, kernel, stride, padding)`` or ``("pool", kernel)``."""
        return [parse_conv_item(item) for item in self.conv]

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` after the conv front end (the input itself when there is none)."""
        return _walk_conv(self)[1]

    @property
    def widths(self) -> list[int]:
        first = int(np.prod(self.feature_shape)) if self.conv else self.in_features
        return [first, *self.hidden, self.classes]

    def as_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "hidden": list(self.hidden),
                "classes": self.classes, "kind": self.kind, "conv": list(self.conv),
                "weights": self.weights, "act_bits": self.act_bits}

    def with_kind(self, kind: str) -> "Architecture":
        """The same shape as another kind; precision fields go with ``binary`` only."""
        if kind == "binary":
            return Architecture(self.input_shape, self.hidden, self.classes, kind, self.conv, self.weights, self.act_bits)
        return Architecture(self.input_shape, self.hidden, self.classes, kind, self.conv)


def parse_conv_item(item: str) -> tuple:
    """``"32c3s2p1"`` to ``("conv", 32, 3, 2, 1)``; ``"m2"`` to ``("pool", 2)``."""
    import re
    text = item.strip().lower()
    pool = re.fullmatch(r"m(\d+)", text)
    if pool and int(pool.group(1)) >= 1:
        return ("pool", int(pool.group(1)))
    conv = re.fullmatch(r"(\d+)c(\d+)(?:s(\d+))?(?:p(\d+))?", text)
    if not conv or int(conv.group(1)) < 1 or int(conv.group(2)) < 1:
        raise UserError(f"--conv item {item!r}: write <channels>c<kernel>[s<stride>][p<padding>] or m<pool>, "
                        "e.g. 32c3, 64c3s2, m2")
    kernel = int(conv.group(2))
    stride = int(conv.group(3) or 1)
    padding = int(conv.group(4)) if conv.group(4) is not None else kernel // 2
    if stride < 1 or padding >= kernel:
        raise UserError(f"--conv item {item!r}: stride must be >= 1 and padding below the kernel size")
    return ("conv", int(conv.group(1)), kernel, stride, padding)


def _walk_conv(arch: Architecture) -> tuple[list[tuple[tuple, tuple[int, int, int]]], tuple[int, int, int]]:
    """Each conv-front-end item with its input shape ``(C, H, W)``, and the final shape."""
    shape = tuple(arch.input_shape)
    channels, height, width = (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])
    items = []
    for item in arch.conv_layers:
        items.append((item, (channels, height, width)))
        if item[0] == "pool":
            height, width = height // item[1], width // item[1]
        else:
            _, channels, kernel, stride, padding = item
            height = (height + 2 * padding - kernel) // stride + 1
            width = (width + 2 * padding - kernel) // stride + 1
        if height < 1 or width < 1:
            raise UserError(f"--conv {','.join(arch.conv)} shrinks the {shape} image to nothing")
    return items, (channels, height, width)


def conv_shapes(arch: Architecture) -> list[tuple[tuple, tuple[int, int, int]]]:
    """Each conv-front-end item with its input shape ``(C, H, W)``."""
    return _walk_conv(arch)[0]


def _image_maps(x: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """Flat images to ``(B, C, H, W)`` (inputs are stored (H, W[, C]) with channels innermost)."""
    shape = tuple(arch.input_shape)
    if len(shape) == 2:
        return x.reshape(len(x), 1, *shape)
    return x.reshape(len(x), *shape).permute(0, 3, 1, 2)


def _conv_modules(arch: Architecture, make_conv) -> tuple[nn.ModuleList, nn.ModuleList]:
    """One conv (from ``make_conv(c_in, c_out, kernel)``) and one BatchNorm2d per conv item."""
    convs, norms = nn.ModuleList(), nn.ModuleList()
    for item, (channels, _, _) in conv_shapes(arch):
        if item[0] == "conv":
            convs.append(make_conv(channels, item[1], item[2]))
            norms.append(nn.BatchNorm2d(item[1]))
    return convs, norms


class BinaryMLP(nn.Module):
    """W1A1 MLP with uint8 input, BN + sign between layers, integer scores out.

    With ``arch.weights == "ternary"`` the weights are {-1, 0, +1}, with ``"int2"`` {-2, -1, 0, 1}
    (a per-layer step ``mean|w|``); with ``arch.act_bits`` k > 1
    the hidden activations are k-bit levels ``round(clamp(BN, 0, 1) * (2**k - 1))`` instead of signs.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.convs, self.conv_norms = _conv_modules(
            arch, lambda c_in, c_out, kernel: BinaryConv2d(c_in, c_out, kernel, arch.weights))
        self.linears = nn.ModuleList(BinaryLinear(a, b, arch.weights) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(widths[-2])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.arch.conv:
            h = _image_maps(x, self.arch)
            # Pooling the BN outputs before the sign gives the same bits as OR-pooling the signs
            # (sign is monotone), but the gradient reaches the largest pre-activation, not the
            # first of the tied +1s.
            awaiting_sign = False
            bits = self.arch.act_bits
            for conv, norm, (_, _, _, stride, padding), first in _conv_steps(self):
                if conv is None:
                    h = F.max_pool2d(h, stride)
                    continue
                h = activation(h, bits) if awaiting_sign else h
                padded = F.pad(h, (padding,) * 4, value=padding_value(first, bits))
                h, awaiting_sign = norm(F.conv2d(padded, conv.quantized_weight(), stride=stride)), True
            h = (activation(h, bits) if awaiting_sign else h).flatten(1)
        for linear, norm in zip(self.linears[:-1], self.norms):
            h = activation(norm(linear(h)), self.arch.act_bits)
        return self.linears[-1](h) * self.log_scale.exp()

    def clip_(self) -> None:
        for layer in [*self.convs, *self.linears]:
            layer.clip_()
        if self.arch.weights == "int2":
            # A channel with gamma < 0 is exported with its weight row negated, and a 2-bit row
            # holding -2 has no negation in [-2, 1]: keep every BN scale >= 0.
            with torch.no_grad():
                for norm in [*self.conv_norms, *self.norms]:
                    norm.weight.clamp_(min=0.0)


def padding_value(first: bool, act_bits: int) -> float:
    """A convolution's padding: the integer 0 of its input, i.e. pixel 0, bit 0 (-1) for ±1
    activations, level 0 for k-bit ones."""
    return -1.0 if not first and act_bits == 1 else 0.0


def activation_kind(act_bits: int) -> str:
    """The IR's input kind of a hidden activation of ``act_bits`` bits."""
    return "bits" if act_bits == 1 else f"uint{act_bits}"


class FloatMLP(nn.Module):
    """The float reference of the same shape (ReLU + BN), for the accuracy the binary net gives up."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.convs, self.conv_norms = _conv_modules(arch, nn.Conv2d)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _zero_padded_front(self, x / 255.0, lambda _, conv, norm, maps, stride: F.relu(norm(
            F.conv2d(maps, conv.weight, conv.bias, stride=stride))))
        for linear, norm in zip(self.linears[:-1], self.norms):
            h = F.relu(norm(linear(h)))
        return self.linears[-1](h)

    def clip_(self) -> None:
        """Float weights are not clipped."""


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def weight_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric int8 scale ``max|w| / 127``, per output channel or per tensor; never zero."""
    magnitude = weight.detach().abs().flatten(1)
    peak = magnitude.amax(dim=1) if per_channel else magnitude.amax().expand(weight.shape[0])
    return torch.clamp(peak, min=1e-12) / INT8_WEIGHT_LIMIT


def _per_row(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *([1] * (weight.dim() - 1)))


def fake_quant_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    scale = _per_row(weight_scale(weight, per_channel), weight)
    return torch.clamp(round_ste(weight / scale), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT) * scale


def quantize_weight(weight: torch.Tensor, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights (same shape) and their float64 scales, computed in float64 (export and integer path)."""
    w = weight.detach().double()
    scale = weight_scale(w, per_channel)
    q = torch.clamp(torch.round(w / _per_row(scale, w)), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT)
    return q.to(torch.int8).numpy(), scale.numpy()


class Int8MLP(nn.Module):
    """int8 MLP with BN folded: fake-quantized weights, bias and uint8 activations (STE).

    ``act_scales[i]`` is the real value of one step of hidden layer ``i``'s uint8 output (zero
    point 0, after ReLU); it is set by calibration (:func:`int8_from_float`) and kept fixed.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.convs, _ = _conv_modules(arch, nn.Conv2d)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.register_buffer("act_scales", torch.ones(len(self.convs) + len(arch.hidden)))

    def input_scale(self, index: int) -> torch.Tensor:
        """Real value of one input step of compute layer ``index`` (convolutions first, then dense)."""
        return torch.tensor(1.0 / 255.0, dtype=torch.float64) if index == 0 else self.act_scales[index - 1].double()

    def _quantized(self, index: int, layer: nn.Module, inputs: torch.Tensor, last: bool, apply) -> torch.Tensor:
        w = fake_quant_weight(layer.weight, per_channel=not last)
        acc_scale = self.input_scale(index).float() * weight_scale(layer.weight, not last)
        z = apply(inputs, w, round_ste(layer.bias / acc_scale) * acc_scale)
        if last:
            return z
        step = self.act_scales[index]
        return torch.clamp(round_ste(z / step), 0, UINT8_MAX) * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _zero_padded_front(self, x / 255.0, lambda index, conv, _, maps, stride: self._quantized(
            index, conv, maps, False, lambda v, w, b: F.conv2d(v, w, b, stride=stride)))
        index = len(self.convs)
        for position, linear in enumerate(self.linears):
            h = self._quantized(index + position, linear, h, position == len(self.linears) - 1, F.linear)
        return h

    def clip_(self) -> None:
        """int8 latent weights are not clipped; their scale follows them."""


class MixedMLP(nn.Module):
    """int8 first layer on uint8 pixels, BN + sign, binary hidden layers, int8 output layer."""

    def __init__(self, arch: Architecture):
        super().__init__()
        if not arch.hidden:
            raise UserError("a mixed network needs at least one hidden layer (--hidden)")
        if arch.conv:
            raise UserError("--kind mixed supports MLPs only; use --kind binary or int8 with --conv")
        self.arch = arch
        widths = arch.widths
        self.linears = nn.ModuleList(
            [nn.Linear(widths[0], widths[1], bias=False)]
            + [BinaryLinear(a, b) for a, b in zip(widths[1:-2], widths[2:-1])]
            + [nn.Linear(widths[-2], widths[-1])])
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = binarize(self.norms[0](F.linear(x, fake_quant_weight(self.linears[0].weight, per_channel=True))))
        for linear, norm in zip(self.linears[1:-1], self.norms[1:]):
            h = binarize(norm(linear(h)))
        last = self.linears[-1]
        scale = weight_scale(last.weight, per_channel=False)
        return F.linear(h, fake_quant_weight(last.weight, per_channel=False), round_ste(last.bias / scale) * scale)

    def clip_(self) -> None:
        for linear in self.linears[1:-1]:
            linear.clip_()


def _conv_steps(model: nn.Module):
    """``(conv or None, norm or None, (kind, channels, kernel, stride, padding), first)`` per conv item.

    For a pool the stride slot holds the pool size; ``first`` marks the first convolution.
    """
    convs = iter(model.convs)
    norms = iter(getattr(model, "conv_norms", []))
    first = True
    for item, _ in conv_shapes(model.arch):
        if item[0] == "pool":
            yield None, None, ("pool", 0, item[1], item[1], 0), False
            continue
        yield next(convs), next(norms, None), item, first
        first = False


def _zero_padded_front(model: nn.Module, x: torch.Tensor, conv_step) -> torch.Tensor:
    """Flat pixels (already scaled) through a zero-padded conv front end to flat features.

    Pools take the max; each convolution is ``conv_step(index, conv, norm, padded_maps, stride)``.
    """
    if not model.arch.conv:
        return x
    h = _image_maps(x, model.arch)
    index = 0
    for conv, norm, (_, _, _, stride, padding), _ in _conv_steps(model):
        if conv is None:
            h = F.max_pool2d(h, stride)
            continue
        h = conv_step(index, conv, norm, F.pad(h, (padding,) * 4), stride)
        index += 1
    return h.flatten(1)


KINDS = {"binary": BinaryMLP, "float": FloatMLP, "int8": Int8MLP, "mixed": MixedMLP}


@torch.no_grad()
def int8_from_float(reference: FloatMLP, calibration: np.ndarray) -> Int8MLP:
    """Post-training quantization: fold BN into the float layers, calibrate activation scales.

    Each hidden layer's uint8 step is its largest ReLU output over ``calibration`` / 255, measured
    on the float (BN-folded) network.
    """
    reference.eval()
    model = build_model(reference.arch.with_kind("int8"))
    pairs = list(zip(reference.convs, reference.conv_norms, model.convs))
    pairs += [(source, norm, target) for source, norm, target in
              zip(reference.linears, [*reference.norms, None], model.linears)]
    for source, norm, target in pairs:
        weight, bias = source.weight.double(), source.bias.double()
        if norm is not None:
            gain = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            weight = weight * _per_row(gain, weight)
            bias = (bias - norm.running_mean.double()) * gain + norm.bias.double()
        target.weight.copy_(weight.float())
        target.bias.copy_(bias.float())
    # Calibrate on the folded float network: each layer's largest ReLU output is its top step.
    def calibrated_conv(index, conv, _, maps, stride):
        out = F.relu(F.conv2d(maps, conv.weight, conv.bias, stride=stride))
        model.act_scales[index] = torch.clamp(out.max(), min=1e-8) / UINT8_MAX
        return out

    pixels = torch.from_numpy(calibration.reshape(len(calibration), -1).astype(np.float32)) / 255.0
    h = _zero_padded_front(model, pixels, calibrated_conv)
    index = len(model.convs)
    for linear in model.linears[:-1]:
        h = F.relu(linear(h))
        model.act_scales[index] = torch.clamp(h.max(), min=1e-8) / UINT8_MAX
        index += 1
    model.eval()
    return model


def build_model(arch: Architecture, seed: int = 0) -> nn.Module:
    """A freshly initialized model; the initialization is seeded so training runs repeat exactly."""
    if arch.kind not in KINDS:
        raise UserError(f"unknown model kind {arch.kind!r}; choose one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    return KINDS[arch.kind](arch)


@torch.no_grad()
def start_from_float(float_model: nn.Module, student: nn.Module) -> None:
    """Set a binary or mixed ``student``'s weights from a float model of the same shape: binary and
    low-bit latent weights keep the float weights' signs and relative sizes, scaled into [-1, 1]
    (each layer by its largest magnitude); int8 layers take the weights and biases as they are.
    Batch norms keep their fresh initialization."""
    pairs = [*zip(float_model.convs, getattr(student, "convs", [])), *zip(float_model.linears, student.linears)]
    for source, target in pairs:
        if isinstance(target, (BinaryLinear, BinaryConv2d)):
            target.weight.copy_(source.weight / source.weight.abs().max().clamp(min=1e-12))
        else:
            target.weight.copy_(source.weight)
            if getattr(target, "bias", None) is not None:
                target.bias.copy_(source.bias)


@dataclass(frozen=True)
class Augmentation:
    """Random training-time changes to image samples: a shift of up to ``shift`` pixels in each
    direction (the uncovered border is pixel 0) and, with ``flip``, a left-right mirror of half the
    samples. Samples that are flat vectors are never changed."""

    shift: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise UserError(f"augmentation shift {self.shift}: give 0 or more pixels")

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.flip

    def as_dict(self) -> dict:
        """What a checkpoint's or model's info records of it."""
        return {"shift": self.shift, "flip": self.flip}

    def apply(self, x: torch.Tensor, image_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Flat samples ``(B, prod(image_shape))`` stored ``(H, W[, C])``, changed and flattened again."""
        if not self.active or len(image_shape) < 2:
            return x
        height, width = image_shape[:2]
        maps = x.view(len(x), height, width, -1)
        if self.shift:
            s = self.shift
            padded = F.pad(maps, (0, 0, s, s, s, s))
            rows = torch.arange(height) + torch.randint(0, 2 * s + 1, (len(x), 1), generator=generator)
            cols = torch.arange(width) + torch.randint(0, 2 * s + 1, (len(x), 1), generator=generator)
            maps = padded[torch.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.flip:
            mirrored = torch.rand(len(x), generator=generator) < 0.5
            maps = torch.where(mirrored[:, None, None, None], maps.flip(2), maps)
        return maps.reshape(len(x), -1)


def train(model: nn.Module, dataset: Dataset, *, epochs: int, seed: int = 0, lr: float = 1e-2,
          batch_size: int = 256, progress: bool = True, teacher: nn.Module | None = None,
          temperature: float = 4.0, distill_weight: float = 0.7,
          augmentation: Augmentation = Augmentation()) -> float:
    """Train with Adam and a cosine schedule, seeded; returns the test accuracy of the model's forward.

    With a ``teacher`` (knowledge distillation, Hinton et al. 2015) the loss is
    ``(1 - distill_weight) * CE(student, labels) + distill_weight * T**2 * KL(teacher_T || student_T)``
    where ``_T`` are the softmax at ``temperature``; the ``T**2`` keeps the soft gradients on the
    scale of the hard ones. The teacher is frozen (eval mode); its logits are computed once, or per
    batch on the augmented samples when ``augmentation`` is active.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(dataset.train_x.astype(np.float32))
    y = torch.from_numpy(dataset.train_y)
    soft_targets = None
    if teacher is not None:
        if not temperature > 0 or not 0 <= distill_weight <= 1:
            raise UserError(f"distillation needs temperature > 0 (got {temperature}) and a weight in [0, 1] "
                            f"(got {distill_weight})")
        if not augmentation.active:
            soft_targets = F.log_softmax(_logits(teacher, x) / temperature, dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    bar = tqdm(total=steps, desc=f"train {type(model).__name__}", disable=not progress, unit="step",
               mininterval=0.5)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            samples = augmentation.apply(x[index], dataset.image_shape, generator)
            logits = model(samples)
            loss = F.cross_entropy(logits, y[index])
            if teacher is not None:
                targets = (soft_targets[index] if soft_targets is not None else
                           F.log_softmax(_logits(teacher, samples) / temperature, dim=1))
                soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), targets,
                                reduction="batchmean", log_target=True)
                loss = (1 - distill_weight) * loss + distill_weight * temperature ** 2 * soft
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            model.clip_()
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return float_accuracy(model, dataset.test_x, dataset.test_y)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's eval-mode logits for flat float images, in batches."""
    model.eval()
    return torch.cat([model(x[start:start + batch_size]) for start in range(0, len(x), batch_size)])


@torch.no_grad()
def float_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the model's own (float or fake-quant) eval-mode forward."""
    logits = _logits(model, torch.from_numpy(images.reshape(len(images), -1).astype(np.float32)))
    return float((logits.argmax(dim=1).numpy() == labels).mean())


def _batchnorm64(z: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """BN in float64, in the operation order of :func:`hwgen.ir.batchnorm_reference` (1-D or 2-D BN)."""
    def channel(v: torch.Tensor) -> torch.Tensor:
        return v.double().view(1, -1, 1, 1) if z.dim() == 4 else v.double()
    return ((z - channel(norm.running_mean)) / torch.sqrt(channel(norm.running_var) + norm.eps)
            ) * channel(norm.weight) + channel(norm.bias)


def _as_ir_order(maps: torch.Tensor) -> np.ndarray:
    """Torch ``(B, C, H, W)`` maps flattened in the IR's ``(y, x, c)`` order (2-D tensors unchanged)."""
    if maps.dim() == 4:
        maps = maps.permute(0, 2, 3, 1)
    return maps.reshape(len(maps), -1).numpy()


def _conv_dot(h: torch.Tensor, layer: Conv2dLayer, pad: float) -> torch.Tensor:
    """A conv layer's accumulators on ``(B, C, H, W)`` maps, exact in float64, as int64 ``(B, C_out, Ho, Wo)``."""
    channels = layer.in_shape[2]
    weights = torch.from_numpy(layer.weight_values.astype(np.float64)).view(
        -1, layer.kernel, layer.kernel, channels).permute(0, 3, 1, 2)
    padded = F.pad(h, (layer.padding,) * 4, value=pad)
    acc = torch.round(F.conv2d(padded, weights, stride=layer.stride)).to(torch.int64)
    return acc + torch.from_numpy(layer.bias_values).view(1, -1, 1, 1)


def _torch_order_columns(model: nn.Module, layer: DenseLayer) -> np.ndarray:
    """The first dense layer's weight values with columns back in torch's ``(c, y, x)`` flatten order."""
    values = layer.weight_values
    if not model.arch.conv:
        return values
    channels, height, width = model.arch.feature_shape
    return values.reshape(-1, height, width, channels).transpose(0, 3, 1, 2).reshape(len(values), -1)


def _ir_order_columns(model: nn.Module, weights: np.ndarray) -> np.ndarray:
    """The first dense layer's columns from torch's ``(c, y, x)`` to the IR's ``(y, x, c)`` order."""
    if not model.arch.conv:
        return weights
    channels, height, width = model.arch.feature_shape
    return weights.reshape(-1, channels, height, width).transpose(0, 2, 3, 1).reshape(len(weights), -1)


def _bn_parameters(norm: nn.BatchNorm1d) -> tuple:
    """``(mean, var, eps, gamma, beta)`` as float64 arrays (exact copies of the float32 values)."""
    return (norm.running_mean.detach().double().numpy(), norm.running_var.detach().double().numpy(), norm.eps,
            norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy())


def _quantized_bias(bias: torch.Tensor, acc_scale: np.ndarray) -> np.ndarray:
    """int bias in accumulator units: ``round(b / (s_in * s_w))``."""
    return np.round(bias.detach().double().numpy() / acc_scale).astype(np.int64)


def _bits_forward(z: torch.Tensor, norm: nn.BatchNorm1d, outputs: list) -> torch.Tensor:
    """Record ``BN(z) >= 0`` as output bits and return them as bipolar float64 values."""
    bits = _batchnorm64(z, norm) >= 0
    outputs.append(bits.to(torch.uint8).numpy())
    return torch.where(bits, 1.0, -1.0).double()


def _activation_forward(z: torch.Tensor, norm: nn.Module, act_bits: int, outputs: list,
                        as_ir=lambda t: t.numpy()) -> torch.Tensor:
    """Record a hidden layer's integer outputs (``BN >= 0`` bits, or k-bit levels computed as
    :func:`hwgen.ir.uniform_levels_reference` does) and return the next layer's float64 input."""
    y = _batchnorm64(z, norm)
    if act_bits == 1:
        bits = y >= 0
        outputs.append(as_ir(bits.to(torch.uint8)))
        return torch.where(bits, 1.0, -1.0).double()
    levels = torch.round(torch.clamp(y, 0.0, 1.0) * ((1 << act_bits) - 1))
    outputs.append(as_ir(levels.to(torch.int64)))
    return levels


def _dot(h: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """Integer dot products, exact in float64, as int64."""
    return torch.round(h @ torch.from_numpy(weights.astype(np.float64)).T).to(torch.int64)


@torch.no_grad()
def integer_forward(model: nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """The torch model's integer output of every layer (eval mode), computed with torch ops.

    This is the third leg of the three-way agreement: it uses the exported integer parameters
    but its own arithmetic (torch float64 dot products, which are exact for these integers, and
    torch int64 requantization), and must equal :func:`hwgen.golden.run` on every output.
    Binary layers give ``BN >= 0`` bits (``sign(0) = +1``), with BN in float64 in the same
    operation order as :func:`hwgen.ir.batchnorm_reference`; an XNOR output layer gives
    ``popcount = (z + N) / 2``.
    """
    model.eval()
    h = torch.from_numpy(images.reshape(len(images), -1).astype(np.float64))
    outputs: list[np.ndarray] = []
    if isinstance(model, Int8MLP):
        if model.arch.conv:
            h = _image_maps(h, model.arch)
        for layer in export(model).layers:
            if isinstance(layer, MaxPool2dLayer):
                h = F.max_pool2d(h, layer.kernel)
                outputs.append(_as_ir_order(h))
                continue
            if isinstance(layer, Conv2dLayer):
                acc = _conv_dot(h, layer, pad=0.0)
            else:
                weights = _torch_order_columns(model, layer) if h.dim() == 4 else layer.weight_values
                acc = _dot(h.flatten(1), weights) + torch.from_numpy(layer.bias_values)
            if layer.requant is None:
                outputs.append(acc.numpy())
                break
            q = layer.requant
            channel = (lambda v: v.view(1, -1, 1, 1)) if acc.dim() == 4 else (lambda v: v)
            right = channel(31 - torch.from_numpy(q.shift))
            scaled = (acc * channel(torch.from_numpy(q.multiplier))
                      + torch.bitwise_left_shift(torch.ones_like(right), right - 1)) >> right
            y = torch.clamp(scaled + q.zero_point, q.lo, q.hi)
            outputs.append(_as_ir_order(y))
            h = y.double()
        return outputs
    if isinstance(model, MixedMLP):
        weights, scale = quantize_weight(model.linears[0].weight, per_channel=True)
        h = _bits_forward(_dot(h, weights).double() * torch.from_numpy(scale), model.norms[0], outputs)
        for linear, norm in zip(model.linears[1:-1], model.norms[1:]):
            h = _bits_forward(F.linear(h, torch.where(linear.weight >= 0, 1.0, -1.0).double()), norm, outputs)
        last = model.linears[-1]
        weights, scale = quantize_weight(last.weight, per_channel=False)
        outputs.append((_dot(h, weights) + torch.from_numpy(_quantized_bias(last.bias, scale))).numpy())
        return outputs
    if isinstance(model, BinaryMLP):
        act_bits = model.arch.act_bits
        if model.arch.conv:
            h = _image_maps(h, model.arch)
            for conv, norm, (_, _, _, stride, padding), first in _conv_steps(model):
                if conv is None:
                    h = F.max_pool2d(h, stride)
                    pooled = torch.where(h > 0, 1, 0).to(torch.uint8) if act_bits == 1 else h.to(torch.int64)
                    outputs.append(_as_ir_order(pooled))
                    continue
                padded = F.pad(h, (padding,) * 4, value=padding_value(first, act_bits))
                z = F.conv2d(padded, conv.quantized_weight().detach().double(), stride=stride)
                h = _activation_forward(z, norm, act_bits, outputs, _as_ir_order)
            h = h.flatten(1)
        for index, linear in enumerate(model.linears):
            z = F.linear(h, quantize_low_bit_weight(linear.weight, linear.weight_kind).detach().double())
            if index < len(model.norms):
                h = _activation_forward(z, model.norms[index], act_bits, outputs)
            else:
                popcount = act_bits == 1 and model.arch.weights == "binary" and (index > 0 or model.arch.conv)
                score = (z + linear.in_features) / 2 if popcount else z
                outputs.append(torch.round(score).to(torch.int64).numpy())
        return outputs
    raise UserError("a float model has no integer form; quantize it first (hwgen train --kind int8)")


def _binary_hidden(name: str, input_kind: str, bits: np.ndarray, norm: nn.BatchNorm1d) -> DenseLayer:
    return fold_batchnorm_sign(DenseLayer(name, input_kind, "threshold", bits), *_bn_parameters(norm))


def _low_bit_hidden(arch: Architecture, name: str, input_kind: str, weights: np.ndarray, norm: nn.Module) -> DenseLayer:
    """A hidden layer of a ``binary`` template: BN + sign to thresholds, or BN + k-bit levels to
    multi-thresholds."""
    layer = DenseLayer(name, input_kind, "threshold", weights, None, arch.weights)
    if arch.act_bits == 1:
        return fold_batchnorm_sign(layer, *_bn_parameters(norm))
    return fold_batchnorm_levels(layer, *_bn_parameters(norm), arch.act_bits)


def _int8_requant(acc_scale: np.ndarray, out_scale: float) -> Requant:
    """uint8 output (zero point 0, ReLU) with per-channel ``(M0, s)`` for ``acc_scale / out_scale``."""
    multiplier, shift = zip(*(quantize_multiplier(float(v)) for v in acc_scale / out_scale))
    return Requant(np.array(multiplier, np.int64), np.array(shift, np.int64), 0, "uint8", 0, UINT8_MAX)


def _conv_front(model: nn.Module) -> list:
    """The conv front end as IR layers: Conv2dLayer (binary thresholds or int8 requant) and pools."""
    layers: list = []
    compute = 0
    binary = isinstance(model, BinaryMLP)
    hidden_kind = activation_kind(model.arch.act_bits) if binary else "uint8"
    for (conv, norm, item, first), (_, (channels, height, width)) in zip(_conv_steps(model), conv_shapes(model.arch)):
        shape = (height, width, channels)
        if conv is None:
            layers.append(MaxPool2dLayer(f"pool{len(layers)}", shape, item[2], hidden_kind))
            continue
        _, out_channels, kernel, stride, padding = item
        name = f"conv{compute}"
        if binary:
            dense = _low_bit_hidden(model.arch, name, "uint8" if first else hidden_kind, conv.integer_weights(), norm)
        else:
            weights, scale = quantize_weight(conv.weight, per_channel=True)
            weights = weights.transpose(0, 2, 3, 1).reshape(out_channels, -1)
            acc_scale = float(model.input_scale(compute)) * scale
            dense = DenseLayer(name, "uint8", "requant", weights, None, "int8", _quantized_bias(conv.bias, acc_scale),
                               _int8_requant(acc_scale, float(model.act_scales[compute])))
        layers.append(Conv2dLayer(dense, shape, kernel, stride, padding))
        compute += 1
    return layers


def export(model: nn.Module, info: dict | None = None) -> IntegerModel:
    """Export a quantized model to the integer model (BN folded into thresholds or weights).

    Convolutions keep the IR's ``(ky, kx, c)`` window order, and the first dense layer after them
    gets its columns reordered from torch's ``(c, y, x)`` flatten order to the IR's ``(y, x, c)``.
    """
    layers: list = []
    if isinstance(model, Int8MLP):
        layers = _conv_front(model)
        offset = len(model.convs)
        for index, linear in enumerate(model.linears):
            name, last = f"dense{index}", index == len(model.linears) - 1
            weights, scale = quantize_weight(linear.weight, per_channel=not last)
            weights = _ir_order_columns(model, weights) if index == 0 else weights
            acc_scale = float(model.input_scale(offset + index)) * scale
            bias = _quantized_bias(linear.bias, acc_scale)
            if last:
                layers.append(DenseLayer(name, "uint8", "scores", weights, None, "int8", bias))
            else:
                layers.append(DenseLayer(name, "uint8", "requant", weights, None, "int8", bias,
                                         _int8_requant(acc_scale, float(model.act_scales[offset + index]))))
    elif isinstance(model, MixedMLP):
        weights, scale = quantize_weight(model.linears[0].weight, per_channel=True)
        layers.append(fold_batchnorm_sign(DenseLayer("dense0", "uint8", "threshold", weights, None, "int8"),
                                          *_bn_parameters(model.norms[0]), z_scale=scale))
        for index, (linear, norm) in enumerate(zip(model.linears[1:-1], model.norms[1:]), start=1):
            layers.append(_binary_hidden(f"dense{index}", "bits", linear.weight_bits(), norm))
        last = model.linears[-1]
        weights, scale = quantize_weight(last.weight, per_channel=False)
        layers.append(DenseLayer(f"dense{len(model.linears) - 1}", "bits", "scores", weights, None, "int8",
                                 _quantized_bias(last.bias, scale)))
    elif isinstance(model, BinaryMLP):
        layers = _conv_front(model)
        for index, linear in enumerate(model.linears):
            input_kind = "uint8" if index == 0 and not model.arch.conv else activation_kind(model.arch.act_bits)
            weights = linear.integer_weights()
            weights = _ir_order_columns(model, weights) if index == 0 else weights
            if index < len(model.norms):
                layers.append(_low_bit_hidden(model.arch, f"dense{index}", input_kind, weights, model.norms[index]))
            else:
                layers.append(DenseLayer(f"dense{index}", input_kind, "scores", weights, None, model.arch.weights))
    else:
        raise UserError("a float checkpoint does not export to the integer model; train --kind binary, "
                        "int8 or mixed")
    return IntegerModel(tuple(model.arch.input_shape), tuple(layers), dict(info or {}))


def save_checkpoint(path: Path | str, model: nn.Module, info: dict) -> None:
    """Save architecture, weights and provenance; loadable with ``torch.load(weights_only=True)``."""
    import io
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "arch": model.arch.as_dict(), "state_dict": model.state_dict(), "info": info}, buffer)
    write_atomically(Path(path), buffer.getvalue())


def load_checkpoint(path: Path | str) -> tuple[nn.Module, dict]:
    """Load a checkpoint without unpickling arbitrary objects; bad files raise :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (create one with `hwgen train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise UserError(f"{path}: not a readable hwgen checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); re-run `hwgen train`") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: field 'format' is not {CHECKPOINT_FORMAT!r}; is this an hwgen checkpoint?")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: field 'version' is {blob.get('version')!r}; this hwgen reads {CHECKPOINT_VERSION}")
    if isinstance(blob.get("state_dict"), dict):
        require_finite(path, (("state_dict." + name, value) for name, value in blob["state_dict"].items()
                              if isinstance(value, torch.Tensor)), "tensor")
    try:
        arch_fields = blob["arch"]
        arch = Architecture(tuple(arch_fields["input_shape"]), tuple(arch_fields["hidden"]),
                            int(arch_fields["classes"]), str(arch_fields["kind"]),
                            tuple(arch_fields.get("conv", ())), str(arch_fields.get("weights", "binary")),
                            int(arch_fields.get("act_bits", 1)))
        model = build_model(arch)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: field 'arch' or 'state_dict' is malformed ({error}); re-run `hwgen train`") from None
    model.eval()
    return model, dict(blob.get("info", {}))
