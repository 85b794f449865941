"""QAT in torch, export, and three-way agreement: fake-quant torch == golden on every integer output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hwgen import golden, quant
from hwgen.data import load_dataset
from hwgen.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    arch = quant.Architecture(digits.image_shape, (128, 64), digits.classes)
    model = quant.build_model(arch)
    accuracy = quant.train(model, digits, epochs=30, seed=0, progress=False)
    return model, accuracy


def test_sign_of_zero_is_plus_one_and_ste_gates_gradient():
    x = torch.tensor([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    y = quant.binarize(x)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_latent_weights_stay_clipped(trained):
    model, _ = trained
    for linear in model.linears:
        assert linear.weight.abs().max().item() <= 1.0


def test_training_is_seeded(digits):
    arch = quant.Architecture(digits.image_shape, (16,), digits.classes)
    first, second = quant.build_model(arch, seed=5), quant.build_model(arch, seed=5)
    a = quant.train(first, digits, epochs=2, seed=5, progress=False)
    b = quant.train(second, digits, epochs=2, seed=5, progress=False)
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))


def test_binary_mlp_learns_digits(trained):
    _, accuracy = trained
    assert accuracy > 0.85


def _assert_torch_equals_golden(model, images):
    torch_outputs = quant.integer_forward(model, images)
    result = golden.run(quant.export(model), images)
    assert len(torch_outputs) == len(result.outputs)
    for index, (a, b) in enumerate(zip(torch_outputs, result.outputs)):
        assert a.shape == b.shape
        differ = np.argwhere(a != b)
        assert not len(differ), f"layer {index}: first difference at image/index {differ[0].tolist()}"
    return result


def test_torch_equals_golden_on_every_integer_output(trained, digits):
    model, accuracy = trained
    result = _assert_torch_equals_golden(model, digits.test_x)
    # The eval forward (float32 BN) and the integer path agree on nearly every class.
    assert abs(float((result.classes == digits.test_y).mean()) - accuracy) < 0.01


def test_negative_and_zero_gamma_channels_still_agree(trained, digits):
    model, _ = trained
    model = quant.build_model(model.arch)
    model.load_state_dict(trained[0].state_dict())
    with torch.no_grad():
        for norm in model.norms:
            norm.weight[0::3] *= -1          # row inversion path
            norm.weight[1] = 0.0             # constant channel
            norm.bias[1] = -0.25
            norm.weight[2] = 0.0
            norm.bias[2] = 0.0               # BN exactly 0 -> sign(0) = +1, always 1
    model.eval()
    ir = quant.export(model)
    assert ir.layers[0].thresholds[1] == ir.layers[0].channel_acc_bounds[1][1] + 1   # always 0
    assert ir.layers[0].thresholds[2] == ir.layers[0].channel_acc_bounds[0][2]       # always 1
    _assert_torch_equals_golden(model, digits.test_x)


def test_checkpoint_round_trip_and_bad_files(tmp_path, trained, digits):
    model, _ = trained
    path = tmp_path / "m.pt"
    quant.save_checkpoint(path, model, {"dataset": "digits"})
    loaded, info = quant.load_checkpoint(path)
    assert info == {"dataset": "digits"}
    assert np.array_equal(quant.integer_forward(loaded, digits.test_x[:50])[-1],
                          quant.integer_forward(model, digits.test_x[:50])[-1])
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="cut.pt: not a readable hwgen checkpoint"):
        quant.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: field 'format' is not 'hwgen-checkpoint'"):
        quant.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        quant.load_checkpoint(tmp_path / "none.pt")


def test_pickled_objects_are_not_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))
    torch.save({"format": "hwgen-checkpoint", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt: not a readable hwgen checkpoint"):
        quant.load_checkpoint(tmp_path / "evil.pt")


def test_float_reference_does_not_export(digits):
    model = quant.build_model(quant.Architecture(digits.image_shape, (8,), digits.classes, binary=False))
    with pytest.raises(UserError, match="only binary"):
        quant.export(model)
