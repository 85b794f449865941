"""A Brevitas W1A1 MLP on Fashion-MNIST, trained and exported to QONNX, as a FINN user would.

    python examples/brevitas_tfc.py -o build/brevitas/tfc.onnx --epochs 20

Then, with hwgen: ``hwgen import build/brevitas/tfc.onnx -o tfc.npz --dataset fashion-mnist``
(see the README's "From Brevitas to a board"). The input quantizer has scale 1, so the integer
codes the hardware takes are the uint8 pixels themselves. Needs the dev extras (brevitas).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.core.scaling import ScalingImplType
from brevitas.export import export_qonnx
from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst, Uint8ActPerTensorFloat

from hwgen.data import load_dataset


class TFC(nn.Module):
    """784-256-256-10: 8-bit pixel input, 1-bit weights and activations, BatchNorm after each hidden layer."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.pixels = qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, scaling_impl_type=ScalingImplType.CONST,
                                        scaling_init=255.0, return_quant_tensor=True)
        layers = []
        for n_in, n_out in ((784, hidden), (hidden, hidden)):
            layers += [qnn.QuantLinear(n_in, n_out, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                                       weight_scaling_const=1.0),
                       nn.BatchNorm1d(n_out),
                       qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True)]
        self.hidden = nn.Sequential(*layers)
        self.out = qnn.QuantLinear(hidden, 10, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                                   weight_scaling_const=1.0)

    def forward(self, x):
        return self.out(self.hidden(self.pixels(x.flatten(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    ds = load_dataset("fashion-mnist")
    x = torch.from_numpy(ds.train_x.reshape(-1, 1, 28, 28).astype(np.float32))
    y = torch.from_numpy(ds.train_y.astype(np.int64))
    model = TFC()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(256):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        model.eval()
        with torch.no_grad():
            test = torch.from_numpy(ds.test_x.reshape(-1, 1, 28, 28).astype(np.float32))
            accuracy = (model(test).argmax(1).numpy() == ds.test_y).mean()
        print(f"epoch {epoch + 1}: test accuracy (Brevitas, torch) {accuracy:.4f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_qonnx(model, x[:1], str(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
