"""Your own float PyTorch model: ordinary user code, trained briefly on digits, saved with
torch.export, quantized (int8) and binarized (binary, mixed) through the API and the CLI;
torch fake-quant == golden on every integer output, RTL == golden in Verilator."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import hwgen
from hwgen import golden
from hwgen.data import load_digits_dataset
from hwgen.errors import UserError
from hwgen.frontends import templates, torch_import
from hwgen.rtl.network import default_folds
from sim.verify import NetworkSimulator
from test_cli import assert_user_error, hwgen as run_hwgen


class UserMLP(nn.Module):
    """How a user writes it: no hwgen classes, a hidden layer without BatchNorm, one with."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.BatchNorm1d(32),
                                 nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class UserCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3), nn.ReLU())
        self.classifier = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class WithSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.act = nn.Sigmoid()
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(self.act(self.fc(x.flatten(1))))


def fit(model: nn.Module, steps: int = 300) -> nn.Module:
    """Ordinary user training: pixels / 255, Adam, seeded."""
    ds = load_digits_dataset()
    torch.manual_seed(0)
    x = torch.from_numpy(ds.train_x.astype(np.float32) / 255).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(ds.train_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def assert_torch_equals_golden(network, ds):
    model = network.export()
    torch_outputs = templates.integer_forward(network.model, ds.test_x)
    result = golden.run(model, ds.test_x)
    for layer, a, b in zip(model.layers, torch_outputs, result.outputs):
        assert np.array_equal(a, b), layer.name
    return model


@pytest.mark.parametrize("make_model", [UserMLP, UserCNN])
def test_template_is_the_users_float_model(make_model, digits):
    torch.manual_seed(1)
    user = fit(make_model(), steps=50)
    program = torch_import.trace(user, digits.image_shape)
    template = torch_import.float_template(program, digits.image_shape)
    x = torch.from_numpy(digits.test_x.astype(np.float32))
    with torch.no_grad():
        theirs = user(x.reshape(-1, 1, 8, 8) / 255)
        ours = template(x)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_int8_ptq_of_a_user_mlp_and_cnn_through_the_rtl(tmp_path, digits):
    for name, make_model in (("mlp", UserMLP), ("cnn", UserCNN)):
        torch.manual_seed(2)
        network = hwgen.quantize(fit(make_model()), digits, kind="int8")
        model = assert_torch_equals_golden(network, digits)
        accuracy = network.evaluate(digits)
        assert accuracy >= network.info["float_accuracy"] - 0.02, (name, accuracy, network.info)
        simulator = NetworkSimulator(model, default_folds(model), tmp_path / name)
        report = simulator.verify(digits.test_x[:24], stall=0.3, seed=3, timing_images=4)
        assert report.checked.mismatches == [] and report.timing.mismatches == []
        assert report.ii_measured == simulator.top.cycles_per_image


@pytest.mark.parametrize("kind", ["binary", "mixed"])
def test_binarize_a_user_mlp_with_self_distillation(kind, tmp_path, digits):
    torch.manual_seed(3)
    network = hwgen.binarize(fit(UserMLP()), digits, kind=kind, epochs=8)
    assert network.info["distillation"]["teacher"] == "the float model"
    assert_torch_equals_golden(network, digits)
    assert network.evaluate(digits) > 0.7
    saved = network.save(tmp_path / "model.npz")
    assert saved.layers[0].output_kind == "threshold"


@pytest.mark.parametrize("weights, act_bits", [pytest.param("binary", 2, marks=pytest.mark.slow), ("ternary", 2)])
def test_binarize_a_user_mlp_to_low_bit_precisions(weights, act_bits, tmp_path, digits):
    torch.manual_seed(3)
    network = hwgen.binarize(fit(UserMLP()), digits, kind="binary", weights=weights, act_bits=act_bits, epochs=8)
    assert network.info["precision"] == ("W1A2" if weights == "binary" else "WtA2")
    model = assert_torch_equals_golden(network, digits)
    assert network.evaluate(digits) > 0.8
    hidden = [layer for layer in model.layers if layer.output_kind != "scores"]
    assert {(layer.output_kind, layer.output_type) for layer in hidden} == {("multithreshold", "uint2")}
    assert {layer.weight_kind for layer in model.layers} == {weights}


def test_binarize_refuses_low_bit_precision_for_mixed(digits):
    with pytest.raises(UserError, match=r"^--weights ternary --act-bits 2 apply to --kind binary"):
        hwgen.binarize(fit(UserMLP()), digits, kind="mixed", weights="ternary", act_bits=2, epochs=1)


def test_cli_quantize_a_torch_export_archive_and_binarize_a_cnn(tmp_path, digits):
    torch.manual_seed(4)
    archive = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(fit(UserCNN()), (torch.zeros(1, 1, 8, 8),)), archive)   # static batch
    result = run_hwgen("quantize", archive, "--kind", "binary", "--epochs", "4", "--shift", "1", "--lr", "5e-3",
                       "--dataset", "digits", "-o", tmp_path / "cnn.npz")
    assert result.returncode == 0, result.stderr
    assert "torch fake-quant vs golden: 449/449 images agree on all" in result.stdout
    sim = run_hwgen("sim", tmp_path / "cnn.npz", "--images", "16", "--build-dir", tmp_path / "sim")
    assert sim.returncode == 0 and "RTL vs golden: 16/16 images bit-exact" in sim.stdout, sim.stdout + sim.stderr


def test_unsupported_op_is_refused_naming_the_module(tmp_path, digits):
    with pytest.raises(UserError, match="^" + re.escape(
            "module act (Sigmoid): op aten.sigmoid.default is not supported; hwgen imports Linear, Conv2d, "
            "BatchNorm1d/2d, ReLU, Hardtanh, MaxPool2d, Flatten (and Dropout, skipped)") + "$"):
        hwgen.quantize(WithSigmoid(), digits)
    archive = tmp_path / "sigmoid.pt2"
    torch.export.save(torch.export.export(WithSigmoid().eval(), (torch.zeros(1, 1, 8, 8),)), archive)
    result = run_hwgen("quantize", archive, "--dataset", "digits", "-o", tmp_path / "m.npz")
    assert_user_error(result, "error: module act (Sigmoid): op aten.sigmoid.default is not supported")
    assert not (tmp_path / "m.npz").exists()
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a zip")
    assert_user_error(run_hwgen("quantize", broken, "--dataset", "digits", "-o", tmp_path / "m.npz"),
                      f"error: {broken}: not a readable torch.export archive")


@pytest.mark.slow
@pytest.mark.parametrize("make_model", [UserMLP, UserCNN])
def test_user_models_accumulators_do_not_wrap(make_model, tmp_path, digits):
    """The int8 PTQ of each user model, every layer driven to its accumulator bounds through the RTL."""
    from test_extremes import assert_accumulators_hold

    torch.manual_seed(2)
    model = hwgen.quantize(fit(make_model()), digits, kind="int8").export()
    assert assert_accumulators_hold(model, default_folds(model), tmp_path) > 0
