"""The hwgen command as a user runs it: real processes, exit codes, messages, files."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import random_model

HWGEN = [sys.executable, "-m", "hwgen.cli"]


def hwgen(*args, cwd=None):
    return subprocess.run([*HWGEN, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def assert_sim_bit_exact(cwd, model, folds, images, cycles_per_image):
    """`hwgen sim` passes on ``images`` test images, and the measured II equals the formula's."""
    sim = hwgen("sim", model, "--images", images, "--fold", folds, "--build-dir", "sim", cwd=cwd)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert f"RTL vs golden: {images}/{images} images bit-exact" in sim.stdout
    measured, formula = re.search(r"cycles per image \(II\): measured (\d+), formula (\d+)", sim.stdout).groups()
    assert int(measured) == int(formula) == cycles_per_image


def test_help_lists_the_commands():
    result = hwgen("--help")
    assert result.returncode == 0
    for command in ("train", "export", "import", "verilog", "sim", "demo"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), command
        sub = hwgen(command, "--help")
        assert sub.returncode == 0 and "Usage:" in sub.stdout and len(sub.stdout.splitlines()) > 4


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.npz"
    random_model(np.random.default_rng(0), [64, 32, 10]).save(path)
    return path


def test_verilog_is_deterministic_and_atomic(tmp_path, model_file):
    for name in ("a.v", "b.v"):
        result = hwgen("verilog", model_file, "--fold", "8x16,5x8", "-o", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "folds 8x16, 5x8; 16 cycles per image" in result.stdout
    assert (tmp_path / "a.v").read_bytes() == (tmp_path / "b.v").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_fold_names_layer_and_choices(tmp_path, model_file):
    result = hwgen("verilog", model_file, "--fold", "8x16,4x8", "-o", tmp_path / "x.v")
    assert_user_error(result, "layer 'dense1': PE=4 does not divide out_features=10; valid PE values: [1, 2, 5, 10]")
    result = hwgen("verilog", model_file, "--fold", "8x16,5x3", "-o", tmp_path / "x.v")
    assert_user_error(result, "layer 'dense1': SIMD=3 must divide or be a multiple of the 8 elements per beat the "
                              "previous stage emits; valid SIMD values: [1, 2, 4, 8, 16, 24, 32]")
    result = hwgen("verilog", model_file, "--fold", "8x24,5x8", "-o", tmp_path / "x.v")
    assert_user_error(result, "layer 'dense0': SIMD=24 does not divide in_features=64, as the first layer's SIMD "
                              "must (the input stream carries whole beats); valid SIMD values: [1, 2, 4, 8, 16, 32, 64]")
    result = hwgen("verilog", model_file, "--fold", "8x16", "-o", tmp_path / "x.v")
    assert_user_error(result, "--fold gives 1 folds, the model has 2 dense/conv layers (dense0, dense1)")
    result = hwgen("verilog", model_file, "--fold", "8by16,5x8", "-o", tmp_path / "x.v")
    assert_user_error(result, "--fold item 1 is '8by16'; write PExSIMD")
    assert not (tmp_path / "x.v").exists()


def test_corrupt_model_is_one_clean_error(tmp_path, model_file):
    data = model_file.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 3])
    result = hwgen("verilog", bad, "-o", tmp_path / "x.v")
    assert_user_error(result, str(bad))
    assert not (tmp_path / "x.v").exists()


def test_missing_inputs_are_clean_errors(tmp_path):
    assert_user_error(hwgen("export", tmp_path / "none.pt", "-o", tmp_path / "m.npz"), "checkpoint not found")
    assert_user_error(hwgen("train", "--dataset", "fashion-mnist", "--data", tmp_path / "nowhere",
                            "-o", tmp_path / "m.pt"), "dataset folder not found")
    assert_user_error(hwgen("train", "--dataset", "digits", "--hidden", "12,x", "-o", tmp_path / "m.pt"),
                      "--hidden '12,x'")


def test_train_export_verilog_sim_on_digits(tmp_path):
    """The whole flow through the CLI with relative paths: every step reports exact agreement."""
    train = hwgen("train", "--dataset", "digits", "--hidden", "32", "--epochs", "3", "--no-float-baseline",
                  "-o", "m.pt", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    export = hwgen("export", "m.pt", "-o", "m.npz", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert "torch fake-quant vs golden: 449/449 images agree on all 42 integer outputs of all 2 layers" in export.stdout
    assert_sim_bit_exact(tmp_path, "m.npz", "4x16,5x8", images=40, cycles_per_image=32)


def test_conv_distillation_flow_on_digits(tmp_path):
    """A float teacher, a distilled binary CNN from it, export and RTL with the convolutions' II."""
    common = ["--dataset", "digits", "--conv", "8c3,m2", "--hidden", "16", "--epochs", "2"]
    teacher = hwgen("train", *common, "--kind", "float", "-o", "float.pt", cwd=tmp_path)
    assert teacher.returncode == 0, teacher.stderr
    assert_user_error(hwgen("export", "float.pt", "-o", "f.npz", cwd=tmp_path), "a float checkpoint does not export")
    student = hwgen("train", *common, "--teacher", "float.pt", "--distill", "--temperature", "3", "-o", "s.pt",
                    cwd=tmp_path)
    assert student.returncode == 0, student.stderr
    assert "float accuracy (8c3,m2,16,10, from float.pt)" in student.stdout and "distilled" in student.stdout
    export = hwgen("export", "s.pt", "-o", "s.npz", cwd=tmp_path)
    assert "449/449 images agree on all" in export.stdout and "of all 4 layers" in export.stdout, export.stdout
    # The window generator sends one pixel per cycle: 8 x 8 windows x 3 x 3 pixels; the conv's
    # PE 8 x SIMD 9 keeps up (64 cycles) and dense0 needs (128/16)(16/16) = 8.
    assert_sim_bit_exact(tmp_path, "s.npz", "8x9,16x16,10x16", images=12, cycles_per_image=576)


def test_conv_and_teacher_errors(tmp_path):
    assert_user_error(hwgen("train", "--dataset", "digits", "--conv", "8x3", "-o", tmp_path / "m.pt"),
                      "--conv item '8x3'")
    assert_user_error(hwgen("train", "--dataset", "digits", "--conv", "8c5p0,8c5p0", "-o", tmp_path / "m.pt"),
                      "shrinks the")
    assert_user_error(hwgen("train", "--dataset", "digits", "--kind", "int8", "--distill", "-o", tmp_path / "m.pt"),
                      "--distill trains a binary or mixed student")
    teacher = hwgen("train", "--dataset", "digits", "--kind", "float", "--hidden", "8", "--epochs", "1",
                    "-o", tmp_path / "f.pt")
    assert teacher.returncode == 0, teacher.stderr
    assert_user_error(hwgen("train", "--dataset", "digits", "--hidden", "16", "--teacher", tmp_path / "f.pt",
                            "-o", tmp_path / "m.pt"), "differs from this run's", "--hidden and --conv")
    assert_user_error(hwgen("train", "--dataset", "digits", "--hidden", "8", "--start-from-teacher", "-o", tmp_path / "m.pt"),
                      "--start-from-teacher starts a binary or mixed student from a float --teacher FILE", "no --teacher")


def test_own_three_channel_data_through_conv_export_and_rtl(tmp_path):
    """--data FILE.npz with 12x12x3 uint8 images: train a binary CNN, export (torch == golden), RTL."""
    from test_data import synthetic_rgb

    x, y = synthetic_rgb(np.random.default_rng(0), 600)
    data = tmp_path / "rgb.npz"
    np.savez(data, train_x=x[:500], train_y=y[:500], test_x=x[500:], test_y=y[500:])
    train = hwgen("train", "--data", data, "--conv", "8c3,m2", "--hidden", "16", "--epochs", "20", "--kind", "binary",
                  "-o", tmp_path / "rgb.pt")
    assert train.returncode == 0, train.stderr
    export = hwgen("export", tmp_path / "rgb.pt", "-o", tmp_path / "rgb-model.npz")
    assert export.returncode == 0, export.stderr
    assert "torch fake-quant vs golden: 100/100 images agree on all 1459 integer outputs of all 4 layers" in export.stdout
    accuracy = float(re.search(r"quantized \(integer\) accuracy on rgb test set: ([\d.]+)", export.stdout).group(1))
    assert accuracy > 0.6
    # the model remembers its data file: sim reads the same test set
    assert_sim_bit_exact(tmp_path, tmp_path / "rgb-model.npz", "8x27,16x32,3x16", 20, 1296)


def test_malformed_data_file_is_one_message(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_x=np.zeros((4, 8, 8), np.uint8), train_y=np.zeros(4, np.int64))
    result = hwgen("train", "--data", bad, "-o", tmp_path / "m.pt")
    assert_user_error(result, f"error: {bad}: array 'test_x' is missing; the file needs train_x, train_y, test_x, "
                              "test_y\n")
    assert not (tmp_path / "m.pt").exists()


def test_export_check_runs_in_batches_and_names_the_image(tmp_path, monkeypatch, capsys):
    """The torch == golden check goes a batch at a time; its accuracy is golden's on the whole test
    set, and a wrong threshold is caught with the image's index in the whole set, nothing written."""
    from hwgen import cli, golden
    from hwgen.data import load_dataset
    from hwgen.errors import UserError
    from hwgen.frontends import templates

    monkeypatch.setattr(cli, "CHECK_BATCH_IMAGES", 100)
    digits = load_dataset("digits")
    arch = templates.Architecture(digits.image_shape, (24,), digits.classes, "binary", (), "ternary", 2)
    model = templates.build_model(arch, seed=2)
    templates.train(model, digits, epochs=1, seed=2, progress=False)
    integer_model = templates.export(model)
    cli._check_torch_and_save(model, integer_model, digits, str(tmp_path / "m.npz"))
    whole = golden.run(integer_model, digits.test_x)
    assert integer_model.info["quantized_accuracy"] == float(np.mean(whole.classes == digits.test_y))
    # Raise the one threshold whose first exact hit (accumulator == threshold) comes latest: golden
    # then differs from torch first on that image, beyond the first batch.
    hidden = integer_model.layers[0]
    accumulators = digits.test_x.reshape(len(digits.test_x), -1).astype(np.int64) @ hidden.weights.T.astype(np.int64)
    accumulators += 0 if hidden.bias is None else hidden.bias
    first_hit = {}
    for channel, row in enumerate(hidden.thresholds):
        for level, threshold in enumerate(row):
            raisable = level + 1 == len(row) or row[level + 1] > threshold
            hits = np.flatnonzero(accumulators[:, channel] == threshold)
            if raisable and len(hits):
                first_hit[channel, level] = int(hits[0])
    (channel, level), image = max(first_hit.items(), key=lambda item: item[1])
    assert image >= 100
    hidden.thresholds[channel, level] += 1
    with pytest.raises(UserError, match="torch and golden disagree; the model was not written"):
        cli._check_torch_and_save(model, integer_model, digits, str(tmp_path / "bad.npz"))
    assert f"MISMATCH image {image}, layer {hidden.name}, index {channel}:" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()
