"""Whole image sets through the clocked harness (cocotb moves whole images) and the raw C++ loop.

Every output word is checked against golden; the cycle stamps against the II formula; a golden
model that really differs from the RTL must be caught, the first diverging layer named, and a
waveform written.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

from hwgen import golden
from hwgen.ir import IntegerModel
from hwgen.rtl.network import Fold, build_top, default_folds
from sim.fast import BatchSimulator, harness_verilog, verify_all
from sim.raw import RawVerilatorLoop
from sim.verify import expected_words
from helpers import random_images, random_model


@pytest.fixture(scope="module")
def mixed_network():
    """uint8 input, an int8 requantized hidden layer, a binary threshold layer, int8 scores."""
    rng = np.random.default_rng(11)
    model = random_model(rng, [49, 24, 16, 5],
                         kinds=[("int8", "requant"), ("binary", "threshold"), ("int8", "scores")])
    return model, [Fold(4, 7), Fold(8, 8), Fold(5, 16)], random_images(rng, 203, 49)


def test_harness_and_raw_loop_equal_golden_with_exact_cycles(mixed_network, tmp_path):
    model, folds, images = mixed_network
    expected = expected_words(golden.run(model, images))
    simulator = BatchSimulator(model, folds, tmp_path / "harness", batch=16)
    ii = simulator.top.cycles_per_image
    run = simulator.run(images, tmp_path / "run")
    assert not run.hung and run.protocol_errors == 0
    assert np.array_equal(run.words.view(np.int32), expected)
    # Unstalled: every image after the first leaves exactly one II after the one before.
    assert set(np.diff(run.out_last).tolist()) == {ii}
    assert run.out_last[0] - run.first_input_cycle == simulator.top.latency

    raw = RawVerilatorLoop(build_top(model, folds), tmp_path / "raw").run(images, tmp_path / "raw_run")
    assert np.array_equal(raw.words.view(np.int32), expected)
    assert set(np.diff(raw.out_last).tolist()) == {ii}


def test_stalls_and_split_processes_keep_every_word(mixed_network, tmp_path):
    model, folds, images = mixed_network
    report = verify_all(model, folds, images, tmp_path, jobs=2, stall=0.4, batch=8)
    assert report.ok and report.mismatches == [] and report.images == 203
    assert report.protocol_errors == 0 and report.hung_chunks == 0
    # Stalls only slow the design down: each process needs at least (its images - 1) IIs.
    assert report.cycles >= (report.images - report.jobs) * report.ii_formula


def test_mismatch_names_first_diverging_layer_and_writes_waveform(tmp_path):
    """The RTL of one model against the golden model of another whose middle layer differs."""
    rng = np.random.default_rng(3)
    model = random_model(rng, [64, 48, 32, 10])
    images = random_images(rng, 40, 64)
    middle = model.layers[1]
    changed = dataclasses.replace(middle, thresholds=middle.thresholds[::-1].copy())
    reference = IntegerModel(model.input_shape, (model.layers[0], changed, model.layers[2]))
    report = verify_all(model, default_folds(model), images, tmp_path, jobs=1, reference=reference)
    assert not report.ok and report.mismatches[0].image == 0
    divergence = report.divergence
    assert divergence.image == 0 and divergence.layer == middle.name
    want = golden.run(reference, images[:1]).outputs[1][0]
    assert divergence.expected == want[divergence.index] and divergence.got == 1 - divergence.expected
    text = divergence.waveform.read_text()
    assert divergence.waveform.name == "mismatch_image0.vcd" and "$enddefinitions" in text
    assert "probe_dense1_valid" in text
    assert f"first diverging layer: {middle.name} (image 0" in report.summary()


def test_harness_rejects_bad_batch():
    model = random_model(np.random.default_rng(0), [16, 4, 2])
    top = build_top(model, default_folds(model))
    with pytest.raises(ValueError, match="batch must be between 1 and 4096 images, not 0"):
        harness_verilog(top, 0)


def test_cli_verify_whole_digits_test_set(tmp_path):
    """`hwgen verify --images all`: all 449 digits test images, 0 mismatches, II = formula."""
    model = random_model(np.random.default_rng(4), [64, 32, 10])
    model = IntegerModel(model.input_shape, model.layers, {"dataset": "digits"})
    model.save(tmp_path / "m.npz")
    result = subprocess.run([sys.executable, "-m", "hwgen.cli", "verify", "m.npz", "--fold", "8x16,5x8"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images: 449, mismatches: 0 images (0 words)" in result.stdout
    measured, formula = re.search(r"II measured (\d+), formula (\d+)", result.stdout).groups()
    assert int(measured) == int(formula) == 16    # layer 0: (64 / 16) * (32 / 8)
