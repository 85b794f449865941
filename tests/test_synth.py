"""Synthesis with yosys: the int8 layer's multipliers and the requantizer's land in DSP blocks on
iCE40 and ECP5, as many as hwgen/fit.py counts."""
from __future__ import annotations

import numpy as np
import pytest
from amaranth.back import verilog

from hwgen.rtl.dense import FoldedDense
from hwgen.rtl.requant import Requantizer
from hwgen.synth import synthesize
from helpers import random_layer


@pytest.fixture(scope="module")
def int8_layer_verilog():
    layer = random_layer(np.random.default_rng(0), "d", "uint8", "scores", 64, 8, "int8")
    # 16 products: more than the iCE40UP5K's 8 DSPs, to show yosys does not stop at the device's count.
    return verilog.convert(FoldedDense(layer, pe=4, simd=4), name="layer", emit_src=False)


@pytest.mark.parametrize("family, dsp_cell", [("ice40", "SB_MAC16"), ("ecp5", "MULT18X18D")])
def test_int8_products_map_to_dsp_blocks(int8_layer_verilog, family, dsp_cell):
    cells = synthesize(int8_layer_verilog, "layer", family)
    assert cells.get(dsp_cell) == 4 * 4, cells      # one DSP per PE x SIMD product, however many


def test_binary_layer_uses_no_dsp():
    layer = random_layer(np.random.default_rng(1), "d", "bits", "threshold", 64, 8)
    cells = synthesize(verilog.convert(FoldedDense(layer, pe=2, simd=16), name="layer", emit_src=False),
                       "layer", "ice40")
    assert "SB_MAC16" not in cells and cells.get("SB_LUT4", 0) > 0


@pytest.mark.parametrize("family, dsp_cell", [("ice40", "SB_MAC16"), ("ecp5", "MULT18X18D")])
def test_requantizer_takes_four_dsp_blocks(family, dsp_cell):
    """acc x M0 (32 x 31 bits) in four 16x16 / 18x18 multipliers: the 4 DSPs the fit estimate counts."""
    layer = random_layer(np.random.default_rng(3), "d", "uint8", "requant", 32, 16, "int8")
    cells = synthesize(verilog.convert(Requantizer(layer, pe=1), name="rq", emit_src=False), "rq", family)
    assert cells.get(dsp_cell) == 4, cells
