"""Real Brevitas networks for the QONNX import tests: built, trained briefly on digits, exported.

Scales are powers of two (or constants of 1) and biases are Int32Bias, so qonnx's float32 executor
computes every value before a quantizer exactly; the import must then agree with it on every code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.core.scaling import ScalingImplType
from brevitas.export import export_qonnx
from brevitas.quant import (Int8WeightPerTensorFixedPoint, Int8WeightPerTensorFloat, Int32Bias, SignedBinaryActPerTensorConst,
                            SignedBinaryWeightPerTensorConst, Uint8ActPerTensorFixedPoint, Uint8ActPerTensorFloat)

from hwgen.data import load_digits_dataset


def pixel_input() -> qnn.QuantIdentity:
    """An 8-bit unsigned input quantizer of scale exactly 1: the codes are the uint8 pixels."""
    return qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, scaling_impl_type=ScalingImplType.CONST,
                             scaling_init=255.0, return_quant_tensor=True)


def binary_linear(n_in: int, n_out: int) -> qnn.QuantLinear:
    return qnn.QuantLinear(n_in, n_out, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                           weight_scaling_const=1.0)


def bipolar_act() -> qnn.QuantIdentity:
    return qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True)


class BinaryMLP(nn.Module):
    """TFC style: 8-bit input, 1-bit weights and activations, BatchNorm."""

    def __init__(self):
        super().__init__()
        self.input_quant = pixel_input()
        self.fc0, self.bn0, self.act0 = binary_linear(64, 48), nn.BatchNorm1d(48), bipolar_act()
        self.fc1, self.bn1, self.act1 = binary_linear(48, 32), nn.BatchNorm1d(32), bipolar_act()
        self.fc2 = binary_linear(32, 10)

    def forward(self, x):
        x = self.input_quant(x.flatten(1))
        x = self.act0(self.bn0(self.fc0(x)))
        x = self.act1(self.bn1(self.fc1(x)))
        return self.fc2(x)


def int8_linear(n_in: int, n_out: int, per_channel: bool) -> qnn.QuantLinear:
    return qnn.QuantLinear(n_in, n_out, bias=True, weight_quant=Int8WeightPerTensorFixedPoint,
                           weight_scaling_per_output_channel=per_channel, bias_quant=Int32Bias)


class IntMLP(nn.Module):
    """int8 weights (per-channel scales in the hidden layers), Int32 biases, ReLU activations of ``act_bits``."""

    def __init__(self, act_bits: int = 8):
        super().__init__()
        self.input_quant = pixel_input()
        self.fc0 = int8_linear(64, 32, per_channel=True)
        self.relu0 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=act_bits, return_quant_tensor=True)
        self.fc1 = int8_linear(32, 24, per_channel=True)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=act_bits, return_quant_tensor=True)
        self.fc2 = int8_linear(24, 10, per_channel=False)

    def forward(self, x):
        x = self.input_quant(x.flatten(1))
        x = self.relu0(self.fc0(x))
        x = self.relu1(self.fc1(x))
        return self.fc2(x)


class FloatScaleMLP(nn.Module):
    """Brevitas's defaults: learned float scales (per channel in the hidden layer), 8-bit ReLU, Int32Bias."""

    def __init__(self):
        super().__init__()
        self.input_quant = pixel_input()
        self.fc0 = qnn.QuantLinear(64, 64, bias=True, weight_quant=Int8WeightPerTensorFloat,
                                   weight_scaling_per_output_channel=True, bias_quant=Int32Bias)
        self.relu0 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(64, 10, bias=True, weight_quant=Int8WeightPerTensorFloat, bias_quant=Int32Bias)

    def forward(self, x):
        return self.fc1(self.relu0(self.fc0(self.input_quant(x.flatten(1)))))


class BNBeforeLowBits(nn.Module):
    """BatchNorm before a ``bits``-bit ReLU quantizer: its float bias is off the accumulator grid
    (multi-thresholds import it exactly up to 4 bits; a requantizer cannot, beyond)."""

    def __init__(self, bits: int = 2):
        super().__init__()
        self.input_quant = pixel_input()
        self.fc0 = int8_linear(64, 16, per_channel=False)
        self.bn0 = nn.BatchNorm1d(16)
        self.relu0 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=bits, return_quant_tensor=True)
        self.fc1 = int8_linear(16, 10, per_channel=False)

    def forward(self, x):
        return self.fc1(self.relu0(self.bn0(self.fc0(self.input_quant(x.flatten(1))))))


def binary_conv(c_in: int, c_out: int) -> qnn.QuantConv2d:
    return qnn.QuantConv2d(c_in, c_out, 3, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                           weight_scaling_const=1.0)


class BinaryCNN(nn.Module):
    """CNV style on 8x8 digits: two binary convolutions, BatchNorm, bipolar activations, max-pool."""

    def __init__(self):
        super().__init__()
        self.input_quant = pixel_input()
        self.conv0, self.bn0, self.act0 = binary_conv(1, 16), nn.BatchNorm2d(16), bipolar_act()
        self.conv1, self.bn1, self.act1 = binary_conv(16, 16), nn.BatchNorm2d(16), bipolar_act()
        self.pool = nn.MaxPool2d(2)
        self.fc = binary_linear(64, 10)

    def forward(self, x):
        x = self.input_quant(x)
        x = self.act0(self.bn0(self.conv0(x)))
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


class WithTanh(nn.Module):
    """An op hwgen does not support (Tanh) between a layer and its quantizer."""

    def __init__(self):
        super().__init__()
        self.input_quant = pixel_input()
        self.fc0 = int8_linear(64, 16, per_channel=False)
        self.act0 = qnn.QuantIdentity(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.fc1 = int8_linear(16, 10, per_channel=False)

    def forward(self, x):
        return self.fc1(self.act0(torch.tanh(self.fc0(self.input_quant(x.flatten(1))))))


def digits():
    """sklearn's digits as (float pixels 0..16 shaped (N, 1, 8, 8), labels): the codes are the pixels."""
    ds = load_digits_dataset()
    def as_float(x):
        return x.reshape(-1, 1, 8, 8).astype(np.float32)
    return as_float(ds.train_x), ds.train_y, as_float(ds.test_x), ds.test_y


def train_and_export(make_model, folder: Path, name: str, steps: int = 150, seed: int = 0) -> Path:
    """``make_model()`` built and trained for a few seeded Adam steps on digits (so BatchNorm
    statistics mean something), then exported to QONNX."""
    torch.manual_seed(seed)
    model = make_model()
    train_x, train_y, _, _ = digits()
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = folder / f"{name}.onnx"
    with torch.no_grad():
        export_qonnx(model, torch.from_numpy(train_x[:1]), str(path))
    return path


def bnn_pynq(name: str, folder: Path, steps: int = 20, seed: int = 0) -> tuple[Path, tuple[int, ...]]:
    """One of FINN's BNN-PYNQ networks as the brevitas wheel defines it (``brevitas_examples``).

    No pretrained weights can be downloaded here: a few seeded steps on random images give BatchNorm
    statistics that mean something, with the weights clipped to [-1, 1] after each step as their
    trainer does. Returns the QONNX file and the input shape.
    """
    from brevitas_examples.bnn_pynq.models import model_with_cfg

    torch.manual_seed(seed)
    model, _ = model_with_cfg(name, pretrained=False)
    shape = (1, 3, 32, 32) if name.startswith("cnv") else (1, 1, 28, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x, y = torch.rand(32, *shape[1:]), torch.randint(0, 10, (32,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clip_weights(-1, 1)
    model.eval()
    path = folder / f"{name}.onnx"
    with torch.no_grad():
        export_qonnx(model, torch.rand(*shape), str(path))
    return path, shape
