"""Issue 15's accuracy runs: a user-written float MLP and CNN on Fashion-MNIST, then hwgen.quantize /
hwgen.binarize, golden accuracy on the full test set. ``python -m bench.own_model`` (long: two to three hours).

Results go to ``bench/own_model.json``. Training results differ slightly between machines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hwgen
from hwgen.data import load_dataset
from hwgen.ir import write_atomically

OUT = Path("build/bench/own")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                        nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def train_float(model, ds, epochs=20, seed=0):
    torch.manual_seed(seed)
    x = torch.from_numpy(ds.train_x.astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(ds.train_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(256):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def main() -> None:
    ds = load_dataset("fashion-mnist")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, make in (("mlp", MLP), ("cnn", CNN)):
        start = time.perf_counter()
        user = train_float(make(), ds)
        archive = OUT / f"{name}.pt2"
        torch.export.save(torch.export.export(user, (torch.zeros(2, 1, 28, 28),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)), archive)
        int8 = hwgen.quantize(archive, ds, kind="int8")
        results[f"{name}-int8"] = {"float": int8.info["float_accuracy"], "golden": int8.evaluate(ds)}
        # The CNN needs the longer, gentler recipe to reach 91 % W1A1 (README "Your own PyTorch model").
        recipe = {"epochs": 45, "lr": 5e-3} if name == "cnn" else {"epochs": 20}
        binary = hwgen.binarize(archive, ds, kind="binary", distill=True, **recipe)
        binary.save(OUT / f"{name}-binary.npz")
        results[f"{name}-binary"] = {"float": binary.info["float_accuracy"], "golden": binary.evaluate(ds)}
        results[f"{name}-seconds"] = time.perf_counter() - start
        write_atomically(Path("bench/own_model.json"), json.dumps(results, indent=2))
        print(name, results, flush=True)


if __name__ == "__main__":
    main()
