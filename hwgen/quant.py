"""Quantization-aware training in torch and export to the integer model.

The only module of hwgen that imports torch. A binary MLP here is:

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
from .ir import DenseLayer, IntegerModel, fold_batchnorm_sign, write_atomically

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
    """Shape of an MLP: input image shape, hidden widths, classes, and whether it is binary."""

    input_shape: tuple[int, ...]
    hidden: tuple[int, ...]
    classes: int
    binary: bool = True

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def widths(self) -> list[int]:
        return [self.in_features, *self.hidden, self.classes]

    def as_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "hidden": list(self.hidden),
                "classes": self.classes, "binary": self.binary}


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


def build_model(arch: Architecture, seed: int = 0) -> nn.Module:
    """A freshly initialized model; the initialization is seeded so training runs repeat exactly."""
    torch.manual_seed(seed)
    return BinaryMLP(arch) if arch.binary else FloatMLP(arch)


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


@torch.no_grad()
def integer_forward(model: BinaryMLP, images: np.ndarray) -> list[np.ndarray]:
    """The fake-quantized torch model's integer output of every layer (eval mode, float64).

    Dot products of integers are exact in float64; BN is evaluated in float64 in the same
    operation order as :func:`hwgen.ir.batchnorm_reference`. Hidden layers give output bits
    (``BN >= 0``, i.e. ``sign(0) = +1``); the output layer gives ``popcount = (z + N) / 2`` for bit
    inputs, or the signed sum for uint8 inputs.
    """
    model.eval()
    h = torch.from_numpy(images.reshape(len(images), -1).astype(np.float64))
    outputs = []
    for index, linear in enumerate(model.linears):
        z = F.linear(h, torch.where(linear.weight >= 0, 1.0, -1.0).double())
        if index < len(model.norms):
            norm = model.norms[index]
            y = ((z - norm.running_mean.double()) / torch.sqrt(norm.running_var.double() + norm.eps)
                 ) * norm.weight.double() + norm.bias.double()
            bits = y >= 0
            outputs.append(bits.to(torch.uint8).numpy())
            h = torch.where(bits, 1.0, -1.0).double()
        else:
            score = (z + linear.in_features) / 2 if index > 0 else z
            outputs.append(torch.round(score).to(torch.int64).numpy())
    return outputs


def _bn_parameters(norm: nn.BatchNorm1d) -> tuple:
    """``(mean, var, eps, gamma, beta)`` as float64 arrays (exact copies of the float32 values)."""
    return (norm.running_mean.detach().double().numpy(), norm.running_var.detach().double().numpy(), norm.eps,
            norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy())


def export(model: BinaryMLP, info: dict | None = None) -> IntegerModel:
    """Export the trained binary MLP to the integer model (BN + sign folded into thresholds)."""
    if not isinstance(model, BinaryMLP):
        raise UserError("only binary (W1A1) checkpoints export to the integer model; "
                        "this checkpoint is a float reference (--float)")
    layers = []
    for index, linear in enumerate(model.linears):
        input_kind = "uint8" if index == 0 else "bits"
        name = f"dense{index}"
        if index < len(model.norms):
            norm = model.norms[index]
            layers.append(fold_batchnorm_sign(
                DenseLayer(name, input_kind, "threshold", linear.weight_bits()), *_bn_parameters(norm)))
        else:
            layers.append(DenseLayer(name, input_kind, "scores", linear.weight_bits()))
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
                            int(arch_fields["classes"]), bool(arch_fields["binary"]))
        model = build_model(arch)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: field 'arch' or 'state_dict' is malformed ({error}); re-run `hwgen train`") from None
    model.eval()
    return model, dict(blob.get("info", {}))
