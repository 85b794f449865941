"""Property-based RTL tests: hypothesis draws whole networks, the RTL must equal golden on every word.

Each example is a network (dense or convolutional, binary or int8 or mixed, or low-bit: k-bit
activations, ternary and 2-bit weights; odd sizes, random legal folds) with weights, thresholds
(multi-thresholds too) and requantizer shifts often at their extremes (all-zero ternary rows), run in
Verilator with random stalls on both stream ends. Every output word and every hidden layer's
output element (probed) must equal the golden model's.

``make test`` runs a few derandomized examples per family. ``make fuzz`` sets HWGEN_FUZZ_EXAMPLES
(default 40 there) and runs random ones; the summary line counts configurations and images, and
a failure prints its case as JSON: paste it into ``REGRESSIONS`` to keep it as a test.
"""
from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from fuzz_cases import FuzzCase, build_case, conv_cases, dense_cases
from sim.verify import NetworkSimulator

FUZZ_EXAMPLES = int(os.environ.get("HWGEN_FUZZ_EXAMPLES", "0"))
FUZZ_LOG = os.environ.get("HWGEN_FUZZ_LOG")

if FUZZ_EXAMPLES:
    FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                             database=DirectoryBasedExampleDatabase("build/fuzz/examples"),
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
else:
    # Each example is a Verilator build (about 10 s): a few, the same on every run.
    FUZZ_SETTINGS = settings(max_examples=2, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Shrunk failures found by the fuzz, kept as tests (the case JSON a failure prints).
REGRESSIONS: list[str] = [
    # A stride-2 3x3 window over a 4x4 map never reads the map's last row: the output was complete
    # while the first convolution still streamed that row, and the probe run ended before it.
    '{"input_shape":[8,8,1],"layers":[{"width":2,"weights":"binary","output":"threshold","weight_pattern"'
    ':"plus","threshold_pattern":"random","shift_pattern":"low","pe":10,"simd":5,"conv":true,"kernel":2,"'
    'stride":2,"padding":0,"pool":false},{"width":2,"weights":"int8","output":"requant","weight_pattern":'
    '"plus","threshold_pattern":"random","shift_pattern":"high","pe":10,"simd":2,"conv":true,"kernel":3,"'
    'stride":2,"padding":0,"pool":false},{"width":2,"weights":"binary","output":"scores","weight_pattern"'
    ':"minus","threshold_pattern":"low","shift_pattern":"low","pe":5,"simd":8,"conv":false,"kernel":1,"st'
    'ride":1,"padding":0,"pool":false}],"images":7,"image_pattern":"zeros","stall_in":0.9,"stall_out":0.0'
    ',"seed":1385}',
]


def check_case(case: FuzzCase, family: str) -> None:
    """Build the case's RTL, stream its images with its stalls, compare every word with golden."""
    model, folds, images = build_case(case)
    where = f"case {case.to_json()}\nlayers {[layer.header() for layer in model.layers]}, folds {folds}"
    with tempfile.TemporaryDirectory(prefix="hwgen-fuzz-") as build_dir:
        simulator = NetworkSimulator(model, folds, build_dir, probes=True)
        run = simulator.run(images, stall_in=case.stall_in, stall_out=case.stall_out, seed=case.seed % 2 ** 31)
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a") as log:
            log.write(json.dumps({"family": family, "images": len(images), "ok": run.ok,
                                  "case": case.to_json()}) + "\n")
    assert run.protocol_errors == [], f"{run.protocol_errors[:3]}\n{where}"
    assert run.mismatches == [], f"{[str(m) for m in run.mismatches[:5]]}\n{where}"
    if case.stall_in == case.stall_out == 0.0 and len(images) >= 5:
        # Unstalled, the last images leave exactly II cycles apart.
        assert run.intervals[-1] == simulator.top.cycles_per_image, f"{run.intervals}\n{where}"


@FUZZ_SETTINGS
@given(dense_cases(mixed=False))
def test_fuzz_binary_mlp(case):
    check_case(case, "binary-mlp")


@FUZZ_SETTINGS
@given(dense_cases(mixed=True))
def test_fuzz_mixed_precision_mlp(case):
    check_case(case, "mixed-mlp")


@FUZZ_SETTINGS
@given(conv_cases())
def test_fuzz_cnn(case):
    check_case(case, "cnn")


@FUZZ_SETTINGS
@given(dense_cases(mixed=False, low_bit=True))
def test_fuzz_low_bit_mlp(case):
    check_case(case, "low-bit-mlp")


@FUZZ_SETTINGS
@given(conv_cases(low_bit=True))
def test_fuzz_low_bit_cnn(case):
    check_case(case, "low-bit-cnn")


@pytest.mark.parametrize("text", REGRESSIONS)
def test_fuzz_regression(text):
    check_case(FuzzCase.from_json(text), "regression")
