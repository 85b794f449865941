"""Quantization-aware training in torch and export to the integer model.

The only module of hwgen that imports torch. Four kinds of MLP (``Architecture.kind``):

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

from .data import Dataset
from .errors import UserError
from .ir import (INT8_WEIGHT_LIMIT, DenseLayer, IntegerModel, Requant, fold_batchnorm_sign, quantize_multiplier,
                 write_atomically)

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


class BinaryLinear(nn.Linear):
    """Linear layer with ±1 weights: latent real weights in [-1, 1], binarized in the forward pass."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        nn.init.uniform_(self.weight, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, binarize(self.weight))

    def clip_(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(-1.0, 1.0)

    def weight_bits(self) -> np.ndarray:
        return (self.weight.detach() >= 0).to(torch.uint8).cpu().numpy()


@dataclass(frozen=True)
class Architecture:
    """Shape of an MLP: input image shape, hidden widths, classes, and its kind (see the module doc)."""

    input_shape: tuple[int, ...]
    hidden: tuple[int, ...]
    classes: int
    kind: str = "binary"

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def widths(self) -> list[int]:
        return [self.in_features, *self.hidden, self.classes]

    def as_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "hidden": list(self.hidden),
                "classes": self.classes, "kind": self.kind}

    def with_kind(self, kind: str) -> "Architecture":
        return Architecture(self.input_shape, self.hidden, self.classes, kind)


class BinaryMLP(nn.Module):
    """W1A1 MLP with uint8 input, BN + sign between layers, integer scores out."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.linears = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(widths[-2])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for linear, norm in zip(self.linears[:-1], self.norms):
            h = binarize(norm(linear(h)))
        return self.linears[-1](h) * self.log_scale.exp()

    def clip_(self) -> None:
        for linear in self.linears:
            linear.clip_()


class FloatMLP(nn.Module):
    """The float reference of the same shape (ReLU + BN), for the accuracy the binary net gives up."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        widths = arch.widths
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / 255.0
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
    magnitude = weight.detach().abs()
    peak = magnitude.amax(dim=1) if per_channel else magnitude.amax().expand(weight.shape[0])
    return torch.clamp(peak, min=1e-12) / INT8_WEIGHT_LIMIT


def fake_quant_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    scale = weight_scale(weight, per_channel)[:, None]
    return torch.clamp(round_ste(weight / scale), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT) * scale


def quantize_weight(weight: torch.Tensor, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and their float64 scales, computed in float64 (what export and the integer path use)."""
    w = weight.detach().double()
    scale = weight_scale(w, per_channel)
    q = torch.clamp(torch.round(w / scale[:, None]), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT)
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
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.register_buffer("act_scales", torch.ones(len(arch.hidden)))

    def input_scale(self, index: int) -> torch.Tensor:
        return torch.tensor(1.0 / 255.0, dtype=torch.float64) if index == 0 else self.act_scales[index - 1].double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / 255.0
        for index, linear in enumerate(self.linears):
            last = index == len(self.linears) - 1
            w = fake_quant_weight(linear.weight, per_channel=not last)
            acc_scale = (self.input_scale(index).float() * weight_scale(linear.weight, not last))
            z = F.linear(h, w, round_ste(linear.bias / acc_scale) * acc_scale)
            if last:
                return z
            step = self.act_scales[index]
            h = torch.clamp(round_ste(z / step), 0, UINT8_MAX) * step
        raise AssertionError("unreachable")

    def clip_(self) -> None:
        """int8 latent weights are not clipped; their scale follows them."""


class MixedMLP(nn.Module):
    """int8 first layer on uint8 pixels, BN + sign, binary hidden layers, int8 output layer."""

    def __init__(self, arch: Architecture):
        super().__init__()
        if not arch.hidden:
            raise UserError("a mixed network needs at least one hidden layer (--hidden)")
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


KINDS = {"binary": BinaryMLP, "float": FloatMLP, "int8": Int8MLP, "mixed": MixedMLP}


@torch.no_grad()
def int8_from_float(reference: FloatMLP, calibration: np.ndarray) -> Int8MLP:
    """Post-training quantization: fold BN into the float layers, calibrate activation scales.

    Each hidden layer's uint8 step is its largest ReLU output over ``calibration`` / 255, measured
    on the float (BN-folded) network.
    """
    reference.eval()
    model = build_model(reference.arch.with_kind("int8"))
    for index, (source, target) in enumerate(zip(reference.linears, model.linears)):
        weight, bias = source.weight.double(), source.bias.double()
        if index < len(reference.norms):
            norm = reference.norms[index]
            gain = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            weight = weight * gain[:, None]
            bias = (bias - norm.running_mean.double()) * gain + norm.bias.double()
        target.weight.copy_(weight.float())
        target.bias.copy_(bias.float())
    h = torch.from_numpy(calibration.reshape(len(calibration), -1).astype(np.float32)) / 255.0
    for index, linear in enumerate(model.linears[:-1]):
        h = F.relu(linear(h))
        model.act_scales[index] = torch.clamp(h.max(), min=1e-8) / UINT8_MAX
    model.eval()
    return model


def build_model(arch: Architecture, seed: int = 0) -> nn.Module:
    """A freshly initialized model; the initialization is seeded so training runs repeat exactly."""
    if arch.kind not in KINDS:
        raise UserError(f"unknown model kind {arch.kind!r}; choose one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    return KINDS[arch.kind](arch)


def train(model: nn.Module, dataset: Dataset, *, epochs: int, seed: int = 0, lr: float = 1e-2,
          batch_size: int = 256, progress: bool = True) -> float:
    """Train with Adam and a cosine schedule, seeded; returns the test accuracy of the model's forward."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(dataset.train_x.astype(np.float32))
    y = torch.from_numpy(dataset.train_y)
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
            loss = F.cross_entropy(model(x[index]), y[index])
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
def float_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32)))
    return float((logits.argmax(dim=1).numpy() == labels).mean())


def _batchnorm64(z: torch.Tensor, norm: nn.BatchNorm1d) -> torch.Tensor:
    """BN in float64, in the operation order of :func:`hwgen.ir.batchnorm_reference`."""
    return ((z - norm.running_mean.double()) / torch.sqrt(norm.running_var.double() + norm.eps)
            ) * norm.weight.double() + norm.bias.double()


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
        for layer in export(model).layers:
            acc = _dot(h, layer.weights) + torch.from_numpy(layer.bias_values)
            if layer.requant is None:
                outputs.append(acc.numpy())
                break
            q = layer.requant
            right = 31 - torch.from_numpy(q.shift)
            scaled = (acc * torch.from_numpy(q.multiplier) + torch.bitwise_left_shift(torch.ones_like(right), right - 1)
                      ) >> right
            y = torch.clamp(scaled + q.zero_point, q.lo, q.hi)
            outputs.append(y.numpy())
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
        for index, linear in enumerate(model.linears):
            z = F.linear(h, torch.where(linear.weight >= 0, 1.0, -1.0).double())
            if index < len(model.norms):
                h = _bits_forward(z, model.norms[index], outputs)
            else:
                score = (z + linear.in_features) / 2 if index > 0 else z
                outputs.append(torch.round(score).to(torch.int64).numpy())
        return outputs
    raise UserError("a float model has no integer form; quantize it first (hwgen train --kind int8)")


def _binary_hidden(name: str, input_kind: str, linear: BinaryLinear, norm: nn.BatchNorm1d) -> DenseLayer:
    return fold_batchnorm_sign(DenseLayer(name, input_kind, "threshold", linear.weight_bits()), *_bn_parameters(norm))


def export(model: nn.Module, info: dict | None = None) -> IntegerModel:
    """Export a quantized model to the integer model (BN folded into thresholds or weights)."""
    layers: list[DenseLayer] = []
    if isinstance(model, Int8MLP):
        for index, linear in enumerate(model.linears):
            name, last = f"dense{index}", index == len(model.linears) - 1
            weights, scale = quantize_weight(linear.weight, per_channel=not last)
            acc_scale = float(model.input_scale(index)) * scale
            bias = _quantized_bias(linear.bias, acc_scale)
            if last:
                layers.append(DenseLayer(name, "uint8", "scores", weights, None, "int8", bias))
                continue
            multiplier, shift = zip(*(quantize_multiplier(float(v)) for v in acc_scale / float(model.act_scales[index])))
            requant = Requant(np.array(multiplier, np.int64), np.array(shift, np.int64), 0, "uint8", 0, UINT8_MAX)
            layers.append(DenseLayer(name, "uint8", "requant", weights, None, "int8", bias, requant))
    elif isinstance(model, MixedMLP):
        weights, scale = quantize_weight(model.linears[0].weight, per_channel=True)
        layers.append(fold_batchnorm_sign(DenseLayer("dense0", "uint8", "threshold", weights, None, "int8"),
                                          *_bn_parameters(model.norms[0]), z_scale=scale))
        for index, (linear, norm) in enumerate(zip(model.linears[1:-1], model.norms[1:]), start=1):
            layers.append(_binary_hidden(f"dense{index}", "bits", linear, norm))
        last = model.linears[-1]
        weights, scale = quantize_weight(last.weight, per_channel=False)
        layers.append(DenseLayer(f"dense{len(model.linears) - 1}", "bits", "scores", weights, None, "int8",
                                 _quantized_bias(last.bias, scale)))
    elif isinstance(model, BinaryMLP):
        for index, linear in enumerate(model.linears):
            input_kind = "uint8" if index == 0 else "bits"
            if index < len(model.norms):
                layers.append(_binary_hidden(f"dense{index}", input_kind, linear, model.norms[index]))
            else:
                layers.append(DenseLayer(f"dense{index}", input_kind, "scores", linear.weight_bits()))
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
    try:
        arch_fields = blob["arch"]
        arch = Architecture(tuple(arch_fields["input_shape"]), tuple(arch_fields["hidden"]),
                            int(arch_fields["classes"]), str(arch_fields["kind"]))
        model = build_model(arch)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: field 'arch' or 'state_dict' is malformed ({error}); re-run `hwgen train`") from None
    model.eval()
    return model, dict(blob.get("info", {}))
