"""The generated Verilog passes ``verilator --lint-only -Wall`` with only the waivers of sim/lint.py."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import reference_shapes
from hwgen.rtl.network import Fold, NetworkTop, default_folds, generate_verilog
from sim.lint import lint_verilog
from sim.primitives import primitive_models
from test_rtl_verilator import random_configuration


@pytest.mark.parametrize("name", ["mlp-binary", "mlp-int8", "mlp-mixed", "cnn-binary"])
def test_reference_networks_lint_clean(name):
    model = reference_shapes()[name]
    assert lint_verilog(generate_verilog(NetworkTop(model, default_folds(model))), "hwgen_network") == []


def test_spram_network_lints_clean_with_the_primitive_model():
    """The iCEBreaker shape of the reference MLP: layer 0's weights in SPRAM, the load sequencer."""
    model = reference_shapes()["mlp-binary"]
    top = NetworkTop(model, [Fold(4, 16), Fold(4, 8), Fold(1, 1)], weight_memories=["spram", "rom", "rom"])
    verilog = generate_verilog(top)
    assert lint_verilog(verilog, "hwgen_network", primitives=primitive_models(verilog)) == []


@pytest.mark.parametrize("seed, mixed", [(seed, False) for seed in range(4)] + [(seed, True) for seed in range(20, 24)])
def test_random_configurations_lint_clean(seed, mixed):
    model, folds, _ = random_configuration(seed, mixed)
    assert lint_verilog(generate_verilog(NetworkTop(model, folds)), "hwgen_network") == []


def test_lint_reports_what_is_not_waived():
    """A latch (an always block that does not assign in every branch) is a finding."""
    findings = lint_verilog("module t(input a, output reg y);\n  always @* if (a) y = 1'b1;\nendmodule\n", "t")
    assert any(line.startswith("%Warning-LATCH") for line in findings), findings


@pytest.mark.parametrize("index", range(3))
def test_low_bit_networks_lint_clean(index):
    """Multi-threshold units and the k-bit x ±1, ternary and int2 lanes."""
    from helpers import random_model
    from test_rtl_verilator import LOW_BIT_MLPS

    widths, kinds, folds = LOW_BIT_MLPS[index]
    model = random_model(np.random.default_rng(700 + index), widths, kinds=kinds)
    assert lint_verilog(generate_verilog(NetworkTop(model, folds)), "hwgen_network") == []
