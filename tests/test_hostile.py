"""Hostile model files through the CLI: each is one line naming the file and what is wrong, exit
status 2, no traceback, and no output file (nor a staging file beside it)."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from helpers import meta_edit, random_model, rewrite_model_file
from test_cli import assert_user_error, hwgen

MODEL = random_model(np.random.default_rng(0), [20, 8, 6, 3])


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.npz"
    MODEL.save(path)
    return path


def _corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first array's stored data (its CRC then fails)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.infolist()[1]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 80
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + 16]) + data[start + 16:]


def _hostile_model(kind: str, good, folder):
    """Write the hostile variant ``kind`` of the good model file; returns its path."""
    path = folder / f"{kind}.npz"
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted":
        path.write_bytes(_corrupt_member(data))
    elif kind == "not-an-archive":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    elif kind == "wrong-version":
        rewrite_model_file(path, MODEL, meta_edit(lambda m: m.__setitem__("version", 99)))
    elif kind == "shapes-disagree":
        rewrite_model_file(path, MODEL, lambda a: a.__setitem__("dense1.weights", a["dense1.weights"][:, :5]))
    elif kind == "chain-broken":
        rewrite_model_file(path, MODEL, meta_edit(lambda m: m["layers"][2].__setitem__("in_features", 7)))
    elif kind == "declares-too-much":
        rewrite_model_file(path, MODEL, meta_edit(lambda m: m["layers"][0].__setitem__("out_features", 10 ** 12)))
    elif kind == "stores-too-much":
        # 16 MB of zeros compress to a few kB: the stored size is checked before reading.
        rewrite_model_file(path, MODEL, lambda a: a.__setitem__("dense0.weights", np.zeros((4000, 4000), np.uint8)),
                           compressed=True)
    elif kind == "pickled":
        rewrite_model_file(path, MODEL, lambda a: a.__setitem__("dense0.weights", np.array([object()], dtype=object)))
    return path


MODEL_CASES = {
    "truncated": "not a readable hwgen-ir file",
    "corrupted": "corrupt archive",
    "not-an-archive": "not a readable hwgen-ir file",
    "wrong-version": "field 'meta.version' is 99; this hwgen reads versions 1, 2",
    "shapes-disagree": "array 'dense1.weights' has shape (6, 5), expected (6, 8)",
    "chain-broken": "field 'meta.layers[2].in_features' is 7, but the previous stage gives 6",
    "declares-too-much": "would have shape (1000000000000, 20)",
    "stores-too-much": "declares 16,000,128 bytes uncompressed, more than its shape allows",
    "pickled": "dense0.weights",
}


@pytest.mark.parametrize("kind", sorted(MODEL_CASES))
def test_hostile_model_files(kind, good_model, tmp_path):
    path = _hostile_model(kind, good_model, tmp_path)
    output = tmp_path / "out" / "top.v"
    output.parent.mkdir()
    result = hwgen("verilog", path, "-o", output)
    assert_user_error(result, f"error: {path}: ", MODEL_CASES[kind])
    assert list(output.parent.iterdir()) == []


def _checkpoint(folder, edit=None):
    """A real (untrained) hwgen checkpoint, with ``edit(state_dict)`` applied."""
    from hwgen.frontends.templates import Architecture, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(Architecture((8, 8), (16,), 10, "binary"))
    if edit:
        with torch.no_grad():
            edit(model.state_dict())
    path = folder / "model.pt"
    save_checkpoint(path, model, {"dataset": "digits"})
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_inf_is_refused(value, tmp_path):
    def spoil(state):
        state["linears.0.weight"].view(-1)[3] = value

    path = _checkpoint(tmp_path, spoil)
    result = hwgen("export", path, "-o", tmp_path / "m.npz")
    assert_user_error(result, f"error: {path}: tensor 'state_dict.linears.0.weight' holds 1 NaN or infinite value(s) "
                              "of 1024; the model cannot be exported")
    assert not (tmp_path / "m.npz").exists() and not list(tmp_path.glob(".*"))


def test_checkpoint_that_is_not_weights_only_is_refused(tmp_path):
    """A pickle that would run code on load (``weights_only`` refuses it)."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "hwgen-checkpoint", "payload": zipfile.ZipFile}, path)
    result = hwgen("export", path, "-o", tmp_path / "m.npz")
    assert_user_error(result, f"error: {path}: not a readable hwgen checkpoint")
    assert not (tmp_path / "m.npz").exists()


def test_onnx_with_nan_initializer_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    weights = np.ones((4, 3), np.float32)
    weights[1, 2] = np.nan
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(weights, "w")])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph), path)
    result = hwgen("import", path, "-o", tmp_path / "m.npz")
    assert_user_error(result, f"error: {path}: initializer 'w' holds 1 NaN or infinite value(s) of 12")
    assert not (tmp_path / "m.npz").exists()


def test_torch_export_archive_with_nan_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[1].bias[4] = float("nan")
    path = tmp_path / "user.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 8, 8),)), path)
    result = hwgen("quantize", path, "--dataset", "digits", "-o", tmp_path / "m.npz")
    assert_user_error(result, f"error: {path}: tensor '1.bias' holds 1 NaN or infinite value(s) of 10")
    assert not (tmp_path / "m.npz").exists()
