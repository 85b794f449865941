"""QAT in torch, export, and three-way agreement: fake-quant torch == golden on every integer output."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hwgen import golden
from hwgen.frontends import templates
from hwgen.data import load_dataset
from hwgen.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    arch = templates.Architecture(digits.image_shape, (128, 64), digits.classes)
    model = templates.build_model(arch)
    accuracy = templates.train(model, digits, epochs=30, seed=0, progress=False)
    return model, accuracy


def test_sign_of_zero_is_plus_one_and_ste_gates_gradient():
    x = torch.tensor([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    y = templates.binarize(x)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_latent_weights_stay_clipped(trained):
    model, _ = trained
    for linear in model.linears:
        assert linear.weight.abs().max().item() <= 1.0


def test_training_is_seeded(digits):
    arch = templates.Architecture(digits.image_shape, (16,), digits.classes)
    first, second = templates.build_model(arch, seed=5), templates.build_model(arch, seed=5)
    a = templates.train(first, digits, epochs=2, seed=5, progress=False)
    b = templates.train(second, digits, epochs=2, seed=5, progress=False)
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))


def test_binary_mlp_learns_digits(trained):
    _, accuracy = trained
    assert accuracy > 0.85


def _assert_torch_equals_golden(model, images):
    torch_outputs = templates.integer_forward(model, images)
    result = golden.run(templates.export(model), images)
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
    model = templates.build_model(model.arch)
    model.load_state_dict(trained[0].state_dict())
    with torch.no_grad():
        for norm in model.norms:
            norm.weight[0::3] *= -1          # row inversion path
            norm.weight[1] = 0.0             # constant channel
            norm.bias[1] = -0.25
            norm.weight[2] = 0.0
            norm.bias[2] = 0.0               # BN exactly 0 -> sign(0) = +1, always 1
    model.eval()
    ir = templates.export(model)
    assert ir.layers[0].thresholds[1] == ir.layers[0].channel_acc_bounds[1][1] + 1   # always 0
    assert ir.layers[0].thresholds[2] == ir.layers[0].channel_acc_bounds[0][2]       # always 1
    _assert_torch_equals_golden(model, digits.test_x)


def test_checkpoint_round_trip_and_bad_files(tmp_path, trained, digits):
    model, _ = trained
    path = tmp_path / "m.pt"
    templates.save_checkpoint(path, model, {"dataset": "digits"})
    loaded, info = templates.load_checkpoint(path)
    assert info == {"dataset": "digits"}
    assert np.array_equal(templates.integer_forward(loaded, digits.test_x[:50])[-1],
                          templates.integer_forward(model, digits.test_x[:50])[-1])
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="cut.pt: not a readable hwgen checkpoint"):
        templates.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: field 'format' is not 'hwgen-checkpoint'"):
        templates.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        templates.load_checkpoint(tmp_path / "none.pt")


def test_pickled_objects_are_not_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))
    torch.save({"format": "hwgen-checkpoint", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="evil.pt: not a readable hwgen checkpoint"):
        templates.load_checkpoint(tmp_path / "evil.pt")


def test_float_reference_does_not_export(digits):
    model = templates.build_model(templates.Architecture(digits.image_shape, (8,), digits.classes, "float"))
    with pytest.raises(UserError, match="a float checkpoint does not export"):
        templates.export(model)


@pytest.fixture(scope="module")
def float_reference(digits):
    model = templates.build_model(templates.Architecture(digits.image_shape, (96, 64), digits.classes, "float"))
    accuracy = templates.train(model, digits, epochs=30, lr=1e-3, progress=False)
    return model, accuracy


def test_int8_ptq_is_close_to_float_and_torch_equals_golden(float_reference, digits):
    reference, float_acc = float_reference
    model = templates.int8_from_float(reference, digits.train_x)
    ir = templates.export(model)
    assert [layer.output_kind for layer in ir.layers] == ["requant", "requant", "scores"]
    assert all(layer.weights.dtype == np.int8 and np.abs(layer.weights).max() == 127 for layer in ir.layers)
    result = _assert_torch_equals_golden(model, digits.test_x)
    int8_acc = float((result.classes == digits.test_y).mean())
    assert abs(int8_acc - float_acc) <= 0.01
    # uint8 activations after ReLU: zero point 0, clamp [0, 255], and the range is used.
    assert all(o.min() == 0 and 128 <= o.max() <= 255 for o in result.outputs[:-1])


def test_int8_output_layer_is_per_tensor_so_scores_keep_the_argmax(float_reference, digits):
    model = templates.int8_from_float(float_reference[0], digits.train_x)
    last = model.linears[-1]
    weights, scale = templates.quantize_weight(last.weight, per_channel=False)
    assert len(set(scale.tolist())) == 1
    fake = templates.float_accuracy(model, digits.test_x, digits.test_y)
    result = golden.run(templates.export(model), digits.test_x)
    assert abs(float((result.classes == digits.test_y).mean()) - fake) <= 0.005


def test_int8_qat_fine_tunes_and_stays_exact(float_reference, digits):
    model = templates.int8_from_float(float_reference[0], digits.train_x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    templates.train(model, digits, epochs=2, lr=1e-4, progress=False)
    assert not torch.equal(before["linears.0.weight"], model.state_dict()["linears.0.weight"])
    assert torch.equal(before["act_scales"], model.act_scales)          # calibrated scales stay fixed
    _assert_torch_equals_golden(model, digits.test_x)


def test_mixed_network_trains_and_torch_equals_golden(digits):
    model = templates.build_model(templates.Architecture(digits.image_shape, (96, 64), digits.classes, "mixed"))
    accuracy = templates.train(model, digits, epochs=30, progress=False)
    ir = templates.export(model)
    assert [(layer.weight_kind, layer.input_kind, layer.output_kind) for layer in ir.layers] == [
        ("int8", "uint8", "threshold"), ("binary", "bits", "threshold"), ("int8", "bits", "scores")]
    result = _assert_torch_equals_golden(model, digits.test_x)
    assert accuracy > 0.85 and abs(float((result.classes == digits.test_y).mean()) - accuracy) < 0.01


def test_int8_checkpoint_round_trip(tmp_path, float_reference, digits):
    model = templates.int8_from_float(float_reference[0], digits.train_x)
    templates.save_checkpoint(tmp_path / "q.pt", model, {})
    loaded, _ = templates.load_checkpoint(tmp_path / "q.pt")
    assert isinstance(loaded, templates.Int8MLP) and torch.equal(loaded.act_scales, model.act_scales)
    assert np.array_equal(templates.integer_forward(loaded, digits.test_x)[-1], templates.integer_forward(model, digits.test_x)[-1])


# Convolutional networks: digits are 8x8, so a 3x3 'same' conv, a 2x2 pool, a strided conv and
# a 1x1 conv fit; the exactness checks use this front end after a short training.
CONV_FRONT = ("8c3", "m2", "16c3s2p1", "8c1")


@pytest.fixture(scope="module")
def binary_cnn(digits):
    model = templates.build_model(templates.Architecture(digits.image_shape, (32,), digits.classes, "binary", CONV_FRONT))
    templates.train(model, digits, epochs=3, progress=False)
    return model


def test_conv_shapes_follow_kernel_stride_padding(digits):
    arch = templates.Architecture((28, 28), (16,), 10, "binary", ("32c3", "m2", "64c5s2p0", "16c1"))
    assert [shape for _, shape in templates.conv_shapes(arch)] == [(1, 28, 28), (32, 28, 28), (32, 14, 14), (64, 5, 5)]
    assert arch.feature_shape == (16, 5, 5) and arch.widths == [400, 16, 10]
    with pytest.raises(UserError, match=r"--conv item '3x3'"):
        templates.parse_conv_item("3x3")
    with pytest.raises(UserError, match="shrinks the"):
        templates.Architecture((8, 8), (4,), 10, "binary", ("4c5p0", "4c5p0")).widths


def test_binary_cnn_torch_equals_golden(binary_cnn, digits):
    ir = templates.export(binary_cnn)
    assert [type(layer).__name__ for layer in ir.layers] == [
        "Conv2dLayer", "MaxPool2dLayer", "Conv2dLayer", "Conv2dLayer", "DenseLayer", "DenseLayer"]
    assert ir.layers[0].dense.input_kind == "uint8" and ir.layers[2].dense.input_kind == "bits"
    assert (ir.layers[2].stride, ir.layers[2].padding, ir.layers[3].kernel) == (2, 1, 1)
    _assert_torch_equals_golden(binary_cnn, digits.test_x)


def test_binary_cnn_learns_digits(digits):
    model = templates.build_model(templates.Architecture(digits.image_shape, (64,), digits.classes, "binary", ("16c3", "m2")))
    accuracy = templates.train(model, digits, epochs=30, progress=False)
    result = golden.run(templates.export(model), digits.test_x)
    assert accuracy > 0.85 and abs(float((result.classes == digits.test_y).mean()) - accuracy) < 0.01


def test_int8_cnn_ptq_and_qat_torch_equals_golden(digits):
    reference = templates.build_model(templates.Architecture(digits.image_shape, (32,), digits.classes, "float", CONV_FRONT))
    float_acc = templates.train(reference, digits, epochs=15, lr=1e-3, progress=False)
    model = templates.int8_from_float(reference, digits.train_x)
    result = _assert_torch_equals_golden(model, digits.test_x)
    assert abs(float((result.classes == digits.test_y).mean()) - float_acc) <= 0.015
    templates.train(model, digits, epochs=1, lr=1e-4, progress=False)
    _assert_torch_equals_golden(model, digits.test_x)


def test_cnn_checkpoint_round_trip(tmp_path, binary_cnn, digits):
    model = binary_cnn
    templates.save_checkpoint(tmp_path / "cnn.pt", model, {"dataset": "digits"})
    loaded, info = templates.load_checkpoint(tmp_path / "cnn.pt")
    assert loaded.arch == model.arch and info == {"dataset": "digits"}
    assert np.array_equal(golden.run(templates.export(loaded), digits.test_x).outputs[-1],
                          golden.run(templates.export(model), digits.test_x).outputs[-1])


def test_start_from_float_keeps_signs_and_scales_into_the_latent_range(float_reference):
    """Binary layers take the float weights' signs, each layer scaled to a largest magnitude of 1;
    a mixed network's int8 layers take the float weights and biases unchanged."""
    reference = float_reference[0]
    w1a2 = templates.build_model(replace(reference.arch, kind="binary", act_bits=2), seed=3)
    templates.start_from_float(reference, w1a2)
    for source, target in zip(reference.linears, w1a2.linears):
        assert np.array_equal(target.weight_bits(), (source.weight.detach() >= 0).numpy().astype(np.uint8))
        assert float(target.weight.abs().max()) == 1.0
        assert torch.allclose(target.weight * source.weight.abs().max(), source.weight)
    mixed = templates.build_model(reference.arch.with_kind("mixed"), seed=3)
    templates.start_from_float(reference, mixed)
    assert torch.equal(mixed.linears[0].weight, reference.linears[0].weight)
    assert torch.equal(mixed.linears[-1].weight, reference.linears[-1].weight)
    assert torch.equal(mixed.linears[-1].bias, reference.linears[-1].bias)
    assert np.array_equal(mixed.linears[1].weight_bits(),
                          (reference.linears[1].weight.detach() >= 0).numpy().astype(np.uint8))


def test_distillation_weight_zero_is_plain_training_and_the_teacher_changes_training(float_reference, digits):
    arch = templates.Architecture(digits.image_shape, (96, 64), digits.classes)
    plain, zero, distilled = (templates.build_model(arch, seed=1) for _ in range(3))
    templates.train(plain, digits, epochs=2, seed=1, progress=False)
    templates.train(zero, digits, epochs=2, seed=1, progress=False, teacher=float_reference[0], distill_weight=0.0)
    templates.train(distilled, digits, epochs=2, seed=1, progress=False, teacher=float_reference[0])
    weights = [m.state_dict()["linears.0.weight"] for m in (plain, zero, distilled)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    with pytest.raises(UserError, match="temperature > 0"):
        templates.train(plain, digits, epochs=1, progress=False, teacher=float_reference[0], temperature=0.0)


def test_distillation_matches_the_teacher_soft_targets(float_reference, digits):
    """Pure soft-target training (weight 1, T=1) pulls the student's predictions toward the teacher's."""
    teacher = float_reference[0]
    arch = templates.Architecture(digits.image_shape, (96, 64), digits.classes, "float")
    student = templates.build_model(arch, seed=2)
    templates.train(student, digits, epochs=20, seed=2, lr=1e-3, progress=False, teacher=teacher,
                temperature=1.0, distill_weight=1.0)
    x = torch.from_numpy(digits.test_x.astype(np.float32))
    agree = float((templates._logits(student, x).argmax(1) == templates._logits(teacher, x).argmax(1)).float().mean())
    assert agree > 0.9


def test_augmentation_shifts_with_a_zero_border_and_mirrors_exactly():
    """Each augmented sample is its image moved by (dy, dx) within ±shift, perhaps mirrored; nothing else."""
    shape = (5, 6, 2)
    images = torch.arange(1, 4 * 60 + 1, dtype=torch.float32).view(4, 60)
    out = templates.Augmentation(shift=2, flip=True).apply(images, shape, torch.Generator().manual_seed(3))
    for image, changed in zip(images.view(4, *shape).numpy(), out.view(4, *shape).numpy()):
        candidates = []
        for mirrored in (image, image[:, ::-1]):
            padded = np.pad(mirrored, ((2, 2), (2, 2), (0, 0)))
            candidates += [padded[dy:dy + 5, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(changed, c) for c in candidates)
    assert not torch.equal(out, images)
    assert torch.equal(templates.Augmentation().apply(images, shape, torch.Generator()), images)
    flat = torch.ones(3, 7)
    assert torch.equal(templates.Augmentation(2, True).apply(flat, (7,), torch.Generator()), flat)
    with pytest.raises(UserError, match="augmentation shift -1"):
        templates.Augmentation(shift=-1)


def test_augmented_distillation_is_seeded_and_changes_training(float_reference, digits):
    arch = templates.Architecture(digits.image_shape, (64,), digits.classes)
    runs = [templates.build_model(arch, seed=4) for _ in range(3)]
    for model, augmentation in zip(runs, (templates.Augmentation(1, False), templates.Augmentation(1, False),
                                          templates.Augmentation())):
        templates.train(model, digits, epochs=1, seed=4, progress=False, teacher=float_reference[0],
                        augmentation=augmentation)
    weights = [m.state_dict()["linears.0.weight"] for m in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
