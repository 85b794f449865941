"""QONNX import: real Brevitas models trained in the test, exported, imported, and held to
qonnx's executor on every quantized tensor, then through the RTL in Verilator."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import brevitas_models as bm
from hwgen import golden
from hwgen.errors import UserError
from hwgen.frontends.qonnx import check_against_executor, executor_outputs, float_inputs_for, import_model
from hwgen.ir import Conv2dLayer, IntegerModel, MaxPool2dLayer
from hwgen.rtl.network import default_folds
from sim.verify import NetworkSimulator
from test_cli import assert_user_error, hwgen

ACTIVATION_QUANTIZERS = ("Quant", "BipolarQuant")


def activation_quantizer_outputs(path) -> set[str]:
    """Every Quant/BipolarQuant of the cleaned-up graph that quantizes an activation (not a constant)."""
    from hwgen.frontends.qonnx import _Graph, _load

    graph = _Graph(_load(path), path)
    return {node.output[0] for node in graph.nodes
            if node.op_type in ACTIVATION_QUANTIZERS and graph.const(node.input[0]) is None}


def import_and_check(tmp_path, make_model, name):
    path = bm.train_and_export(make_model, tmp_path, name)
    imported = import_model(path)
    _, _, test_x, test_y = bm.digits()
    agreement = check_against_executor(path, imported, test_x)        # all 449 test images
    assert agreement.images == len(test_x) >= 200
    assert [bad for *_, bad in agreement.tensors] == [0] * len(agreement.tensors), agreement.summary()
    assert agreement.classes_equal == len(test_x) and agreement.max_output_error <= agreement.output_tolerance
    shared = {tensor for _, tensor, _, _ in agreement.tensors}
    assert activation_quantizer_outputs(path) <= shared          # every activation quantizer was compared
    codes = imported.input_quantizer.codes(test_x)
    assert np.array_equal(codes, test_x.reshape(len(test_x), -1).astype(np.uint8))   # codes are the pixels
    accuracy = float((golden.run(imported, codes).classes == test_y).mean())
    return path, imported, codes, accuracy


def assert_rtl_equals_golden(model: IntegerModel, codes: np.ndarray, build_dir):
    simulator = NetworkSimulator(model, default_folds(model), build_dir)
    report = simulator.verify(codes[:40], stall=0.3, seed=1, timing_images=6)
    assert report.checked.mismatches == [] and report.timing.mismatches == []
    assert report.checked.protocol_errors == [] and report.timing.protocol_errors == []
    assert report.ii_measured == simulator.top.cycles_per_image


def test_binary_mlp_tfc_style(tmp_path):
    path, model, codes, accuracy = import_and_check(tmp_path, bm.BinaryMLP, "tfc")
    assert [(layer.weight_kind, layer.input_kind, layer.output_kind) for layer in model.layers] == [
        ("binary", "uint8", "threshold"), ("binary", "bits", "threshold"), ("binary", "bits", "scores")]
    assert accuracy > 0.6
    assert_rtl_equals_golden(model, codes, tmp_path / "sim")


def test_int8_mlp_per_channel_scales_relu(tmp_path):
    path, model, codes, accuracy = import_and_check(tmp_path, lambda: bm.IntMLP(8), "int8")
    hidden = model.layers[:2]
    assert all(layer.output_kind == "requant" and layer.requant.rounding == "half_even"
               and (layer.requant.lo, layer.requant.hi) == (0, 255) for layer in hidden)
    assert len(set(hidden[0].requant.shift.tolist())) > 1               # per-channel weight scales
    assert accuracy > 0.8
    assert_rtl_equals_golden(model, codes, tmp_path / "sim")


def test_binary_cnn_cnv_style(tmp_path):
    path, model, codes, accuracy = import_and_check(tmp_path, bm.BinaryCNN, "cnv")
    assert [type(layer).__name__ for layer in model.layers] == ["Conv2dLayer", "Conv2dLayer", "MaxPool2dLayer",
                                                                "DenseLayer"]
    assert model.layers[0].in_shape == (8, 8, 1) and model.layers[2].out_shape == (2, 2, 16)
    assert accuracy > 0.6
    assert_rtl_equals_golden(model, codes, tmp_path / "sim")


def test_four_bit_activations_import_exactly_as_multi_thresholds(tmp_path):
    path, model, codes, accuracy = import_and_check(tmp_path, lambda: bm.IntMLP(4), "a4")
    assert [(layer.output_kind, layer.output_type, layer.thresholds.shape[1]) for layer in model.layers[:2]] == [
        ("multithreshold", "uint4", 15)] * 2
    # the codes are 4-bit: they never leave [0, 15] and use many of its values
    hidden = golden.run(model, codes).outputs[0]
    assert hidden.min() == 0 and hidden.max() <= 15 and len(np.unique(hidden)) >= 8
    assert accuracy > 0.8
    # sim takes float inputs and quantizes them with the recorded rule
    model_path = tmp_path / "a4.npz"
    model.save(model_path)
    np.save(tmp_path / "inputs.npy", float_inputs_for(model, codes[:20]))
    result = hwgen("sim", model_path, "--float-inputs", tmp_path / "inputs.npy", "--images", "all",
                   "--build-dir", tmp_path / "cli-sim")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RTL vs golden: 20/20 images bit-exact" in result.stdout


def test_learned_float_scales_import_and_agree_with_the_executor_all_but_near_ties(tmp_path):
    """With float scales the executor's float32 products round; hwgen follows exact arithmetic.

    They may then differ where an accumulator lies within float32 rounding of a step: rare.
    """
    path = bm.train_and_export(bm.FloatScaleMLP, tmp_path, "float_scales")
    model = import_model(path)
    _, _, test_x, _ = bm.digits()
    agreement = check_against_executor(path, model, test_x)
    codes = sum(n for _, _, n, _ in agreement.tensors)
    mismatches = sum(bad for *_, bad in agreement.tensors)
    assert codes == len(test_x) * (64 + 64) and mismatches <= codes // 1000, agreement.summary()
    assert agreement.classes_equal + agreement.classes_tied >= len(test_x) - 1


def test_batchnorm_before_two_bits_imports_exactly_as_multi_thresholds(tmp_path):
    path, model, codes, accuracy = import_and_check(tmp_path, bm.BNBeforeLowBits, "bn2")
    assert (model.layers[0].output_kind, model.layers[0].output_type) == ("multithreshold", "uint2")
    hidden = golden.run(model, codes).outputs[0]
    assert set(np.unique(hidden).tolist()) == {0, 1, 2, 3}
    assert_rtl_equals_golden(model, codes, tmp_path / "sim")


def test_batchnorm_before_six_bits_is_refused(tmp_path):
    path = bm.train_and_export(lambda: bm.BNBeforeLowBits(6), tmp_path, "bn6")
    with pytest.raises(UserError, match=re.escape(
            f"{path}: node 'Quant_5' (Quant): channel 0: no requantizer (M0, shift, integer bias, half-even "
            "rounding) gives this 6-bit quantizer's codes on the whole accumulator range (a bias off the "
            "accumulator grid, or BatchNorm before a 5-8-bit quantizer); quantize the bias with Int32Bias, or "
            "use an activation of at most 4 bits after BatchNorm") + "$"):
        import_model(path)


def test_cli_import_checks_and_refuses_an_unsupported_op(tmp_path):
    good = bm.train_and_export(bm.BinaryMLP, tmp_path, "tfc", steps=20)
    result = hwgen("import", good, "-o", tmp_path / "tfc.npz", "--dataset", "digits", "--images", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"golden vs qonnx execute_onnx on 200 inputs: (\d+)/\1 quantized codes equal over 3 tensors; "
                     r"classes equal on 200/200;", result.stdout), result.stdout
    assert IntegerModel.load(tmp_path / "tfc.npz").info["dataset"] == "digits"

    bad = bm.train_and_export(bm.WithTanh, tmp_path, "tanh", steps=5)
    result = hwgen("import", bad, "-o", tmp_path / "tanh.npz")
    assert_user_error(result, f"error: {bad}: node 'Tanh_0' (Tanh): follows layer node 'Gemm_0' before its "
                              "quantizer; supported there: Add, Sub, Mul, Div, BatchNormalization, Relu\n")
    assert not (tmp_path / "tanh.npz").exists() and not list(tmp_path.glob(".*.tmp"))


def test_unreadable_and_cyclic_graphs_are_refused(tmp_path):
    good = bm.train_and_export(bm.BinaryMLP, tmp_path, "tfc", steps=5)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    result = hwgen("import", truncated, "-o", tmp_path / "t.npz")
    assert_user_error(result, f"error: {truncated}: not a readable ONNX model")
    missing = hwgen("import", tmp_path / "nope.onnx", "-o", tmp_path / "t.npz")
    assert_user_error(missing, f"error: {tmp_path / 'nope.onnx'}: ONNX model file not found\n")

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Relu", ["b"], ["y"], name="third")]
    cyclic = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), cyclic)
    result = hwgen("import", cyclic, "-o", tmp_path / "c.npz")
    assert_user_error(result, f"error: {cyclic}: the graph has a cycle through node ")
    assert not list(tmp_path.glob("*.npz"))


def test_executor_outputs_in_a_batch_equal_one_at_a_time(tmp_path):
    """The check runs the executor on a whole batch; on these exact models that changes nothing."""
    path = bm.train_and_export(bm.BinaryCNN, tmp_path, "cnv", steps=5)
    _, _, test_x, _ = bm.digits()
    names = sorted(activation_quantizer_outputs(path))
    batch = executor_outputs(path, test_x[:6], names)
    for k in range(6):
        single = executor_outputs(path, test_x[k:k + 1], names)
        for tensor in names:
            assert np.array_equal(single[tensor][0], batch[tensor][k]), tensor


def import_bnn_pynq_exactly(name: str, tmp_path) -> tuple[IntegerModel, np.ndarray]:
    """A BNN-PYNQ network exported, imported and held to the executor on 200 random inputs (every
    activation quantizer compared); the model and the inputs' codes."""
    path, shape = bm.bnn_pynq(name, tmp_path)
    model = import_model(path)
    inputs = np.random.default_rng(1).random((200, *shape[1:])).astype(np.float32)
    agreement = check_against_executor(path, model, inputs)
    assert agreement.ok and agreement.classes_equal == 200, agreement.summary()
    assert activation_quantizer_outputs(path) <= {tensor for _, tensor, _, _ in agreement.tensors}
    return model, model.input_quantizer.codes(inputs)


@pytest.mark.parametrize("name, rtl", [("tfc_1w1a", True), ("cnv_1w1a", False)])
def test_bnn_pynq_networks_import_exactly(tmp_path, name, rtl):
    """FINN's own reference networks: TFC's 2x - 1 before a bipolar input quantizer, its TensorNorm
    output (Sub, Div, Mul, Add), CNV's signed 8-bit input of scale 2**-7 on 32x32x3 images."""
    model, codes = import_bnn_pynq_exactly(name, tmp_path)
    assert [layer.output_kind for layer in model.layers].count("threshold") == (3 if name.startswith("tfc") else 8)
    if rtl:
        assert_rtl_equals_golden(model, codes, tmp_path / "sim")


@pytest.mark.parametrize("name, weights, rtl", [
    ("tfc_1w2a", "binary", True), ("tfc_2w2a", "ternary", True),
    pytest.param("sfc_1w2a", "binary", False, marks=pytest.mark.slow),
    pytest.param("cnv_1w2a", "binary", False, marks=pytest.mark.slow)])
def test_bnn_pynq_two_bit_networks_import_exactly_as_multi_thresholds(tmp_path, name, weights, rtl):
    """Brevitas's W1A2 and W2A2 BNN-PYNQ definitions: signed narrow 2-bit activations (codes -1, 0,
    +1 become levels 0, 1, 2) after BatchNorm, 2-bit narrow weights (ternary)."""
    model, codes = import_bnn_pynq_exactly(name, tmp_path)
    dense = [layer.dense if isinstance(layer, Conv2dLayer) else layer for layer in model.layers
             if not isinstance(layer, MaxPool2dLayer)]
    assert {layer.weight_kind for layer in dense} == {weights}
    hidden = [layer for layer in dense if layer.output_kind != "scores"]
    assert len(hidden) == (8 if name.startswith("cnv") else 3)
    assert {(layer.output_kind, layer.output_type) for layer in hidden} == {("multithreshold", "uint2")}
    levels = golden.run(model, codes).outputs[0]
    assert set(np.unique(levels).tolist()) == {0, 1, 2}
    if rtl:
        assert_rtl_equals_golden(model, codes, tmp_path / "sim")


@pytest.mark.parametrize("name", ["tfc", pytest.param("int8", marks=pytest.mark.slow),
                                  pytest.param("cnv", marks=pytest.mark.slow),
                                  pytest.param("tfc_1w1a", marks=pytest.mark.slow)])
def test_imported_models_accumulators_do_not_wrap(tmp_path, name):
    """Each imported test model's layers driven to their accumulator bounds through the RTL."""
    from test_extremes import assert_accumulators_hold

    makers = {"tfc": bm.BinaryMLP, "int8": lambda: bm.IntMLP(8), "cnv": bm.BinaryCNN}
    path = bm.bnn_pynq(name, tmp_path)[0] if name == "tfc_1w1a" else bm.train_and_export(makers[name], tmp_path,
                                                                                           name, steps=20)
    model = import_model(path)
    assert assert_accumulators_hold(model, default_folds(model), tmp_path / "extremes") > 0
