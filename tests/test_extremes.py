"""Worst-case accumulators through the RTL: each layer driven to its declared bounds, no wrap.

Every dense and convolution layer of the reference network shapes and of imported models gets
its probe network (sim/extremes.py): per output channel, the input giving its largest and its
smallest accumulator. Golden must reach exactly the declared per-channel bounds on them, and the
RTL must equal golden on every probed and output word, with stalls on both ends.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import random_model, reference_shapes
from hwgen.ir import Conv2dLayer
from hwgen.rtl.network import Fold, compute_layers, default_folds
from sim.extremes import accumulator_probe, extreme_inputs
from sim.verify import NetworkSimulator


def assert_accumulators_hold(model, folds, build_dir) -> int:
    """Every layer's probe through Verilator; returns how many images ran."""
    images = 0
    for layer in compute_layers(model):
        dense = layer.dense if isinstance(layer, Conv2dLayer) else layer
        probe = accumulator_probe(model, folds, layer.name)
        assert probe.reaches_bounds(dense), layer.name
        simulator = NetworkSimulator(probe.model, probe.folds, build_dir / layer.name, probes=True)
        run = simulator.run(probe.images, stall_in=0.2, stall_out=0.2, seed=3)
        assert run.ok, (layer.name, [str(m) for m in run.mismatches[:5]], run.protocol_errors[:3])
        images += len(probe.images)
    return images


def test_extreme_inputs_reach_each_channels_bounds():
    """Golden only: the probe's images give every channel its bounds, for uint8, bit and 8-bit inputs."""
    rng = np.random.default_rng(4)
    model = random_model(rng, [13, 7, 5, 3], kinds=[("binary", "threshold"), ("int8", "requant"), ("int8", "scores")])
    folds = [Fold(7, 13), Fold(5, 7), Fold(3, 5)]
    for layer in compute_layers(model):
        assert accumulator_probe(model, folds, layer.name).reaches_bounds(layer), layer.name
    high, low = extreme_inputs(model.layers[0])
    assert high.min() >= 0 and high.max() <= 255 and np.array_equal(high + low, np.full_like(high, 255))


def test_small_mixed_network_accumulators_do_not_wrap(tmp_path):
    """mlp-mixed's kinds at a quarter of its widths (make test's stand-in for the reference
    shapes): a uint8, a bit and an 8-bit input, and all three output roles."""
    model = random_model(np.random.default_rng(7), [196, 64, 64, 10],
                         kinds=[("binary", "threshold"), ("int8", "requant"), ("int8", "scores")])
    assert assert_accumulators_hold(model, default_folds(model), tmp_path) == 2 * (64 + 64 + 10)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mlp-mixed", "cnn-binary", "mlp-binary", "mlp-int8"])
def test_reference_networks_accumulators_do_not_wrap(network, tmp_path):
    """The CNN has two convolutions (pixels, then bits through a 3x3 window of 32 channels) and a
    3136-input head."""
    model = reference_shapes()[network]
    assert assert_accumulators_hold(model, default_folds(model), tmp_path) > 0
