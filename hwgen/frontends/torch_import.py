"""Your own float PyTorch model: traced with ``torch.export``, mapped onto hwgen's float template.

A user's ``nn.Module`` (or a ``torch.export`` archive, ``.pt2``, which loads without unpickling
user classes) is read as its graph of ATen ops. A chain of the shape

    [Conv2d [BatchNorm2d] (ReLU | Hardtanh) [MaxPool2d]]*  [Flatten]  [Linear [BatchNorm1d] (ReLU | Hardtanh)]*  Linear

becomes hwgen's :class:`~hwgen.frontends.templates.FloatMLP` with the user's weights (a missing
BatchNorm becomes an exact identity, a missing bias a zero), so the same quantization code path
as ``hwgen train`` takes it from there: post-training int8 quantization
(:func:`~hwgen.frontends.templates.int8_from_float`), or binary/mixed fine-tuning that starts
from the float weights and distils from the float model itself. Anything else is refused,
naming the module path and the op.

The model's input is the uint8 sample (``(H, W)``, ``(H, W, C)`` channels last, or flat) times
``input_scale`` plus ``input_offset``: the normalization the user trained with (default
``x / 255``); it is folded into the first layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import golden
from ..data import Dataset, load_dataset
from ..errors import UserError
from .checks import require_finite
from ..ir import IntegerModel
from . import templates

ACTIVATIONS = ("aten.relu.default", "aten.relu_.default", "aten.hardtanh.default", "aten.hardtanh_.default")
SKIPPED = ("aten.dropout.default", "aten.clone.default", "aten.alias.default", "aten.contiguous.default",
           "aten.detach.default")
FLATTENS = ("aten.flatten.using_ints", "aten.view.default", "aten.reshape.default")
SUPPORTED = "Linear, Conv2d, BatchNorm1d/2d, ReLU, Hardtanh, MaxPool2d, Flatten (and Dropout, skipped)"


@dataclass
class _Step:
    kind: str                       # conv, linear, bn, act, pool, flatten
    where: str
    tensors: dict = field(default_factory=dict)
    args: tuple = ()


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(top level)"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return f"{path or '(top level)'} ({kind.rsplit('.', 1)[-1]})"


def _steps(program) -> list[_Step]:
    """The program's ops in order, with their parameters resolved."""
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    state = {**program.state_dict, **dict(getattr(program, "constants", {}) or {})}

    def tensor(arg):
        if arg is None:
            return None
        key = names.get(getattr(arg, "name", None))
        return None if key is None else state[key].detach().to(torch.float64)

    steps = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target, where, args = str(node.target), _module_path(node), node.args
        if target in SKIPPED:
            continue
        if target == "aten.conv2d.default":
            stride, padding, dilation, groups = (list(args[3]) if len(args) > 3 else [1, 1],
                                                 list(args[4]) if len(args) > 4 else [0, 0],
                                                 list(args[5]) if len(args) > 5 else [1, 1],
                                                 args[6] if len(args) > 6 else 1)
            if groups != 1 or any(d != 1 for d in dilation) or len(set(stride)) != 1 or len(set(padding)) != 1:
                raise UserError(f"module {where}: op {target} with stride {stride}, padding {padding}, dilation "
                                f"{dilation}, groups {groups}; hwgen supports one stride, one padding, dilation 1, "
                                "groups 1")
            steps.append(_Step("conv", where, {"weight": tensor(args[1]), "bias": tensor(args[2] if len(args) > 2
                                                                                          else None)},
                               (int(stride[0]), int(padding[0]))))
        elif target == "aten.linear.default":
            steps.append(_Step("linear", where, {"weight": tensor(args[1]),
                                                 "bias": tensor(args[2] if len(args) > 2 else None)}))
        elif target == "aten.batch_norm.default":
            steps.append(_Step("bn", where, {"weight": tensor(args[1]), "bias": tensor(args[2]),
                                             "mean": tensor(args[3]), "var": tensor(args[4])}, (float(args[7]),)))
        elif target in ACTIVATIONS:
            if "hardtanh" in target:
                low, high = (float(args[1]) if len(args) > 1 else -1.0), (float(args[2]) if len(args) > 2 else 1.0)
                steps.append(_Step("act", where, args=("hardtanh", low, high)))
            else:
                steps.append(_Step("act", where, args=("relu",)))
        elif target == "aten.max_pool2d.default":
            kernel = list(args[1])
            stride = list(args[2]) if len(args) > 2 and args[2] else kernel
            padding = list(args[3]) if len(args) > 3 else [0, 0]
            if len(set(kernel)) != 1 or stride != kernel or any(padding):
                raise UserError(f"module {where}: op {target} with kernel {kernel}, stride {stride}, padding "
                                f"{padding}; hwgen pools K x K windows with stride K and no padding")
            steps.append(_Step("pool", where, args=(int(kernel[0]),)))
        elif target in FLATTENS:
            steps.append(_Step("flatten", where))
        else:
            raise UserError(f"module {where}: op {target} is not supported; hwgen imports {SUPPORTED}")
    return steps


def _example_input(input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    shape = tuple(input_shape)
    if len(shape) == 1:
        return torch.zeros(batch, shape[0])
    channels = 1 if len(shape) == 2 else shape[2]
    return torch.zeros(batch, channels, shape[0], shape[1])


def trace(model: nn.Module, input_shape: tuple[int, ...]):
    """``torch.export`` of ``model`` (eval mode) for samples of ``input_shape`` (hwgen order), any batch."""
    try:
        return torch.export.export(model.eval(), (_example_input(input_shape),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:  # torch raises many types when a model cannot be traced
        raise UserError(f"torch.export could not trace the model for an input of {list(input_shape)} "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def load_program(path: Path | str):
    """A ``torch.export`` archive (``torch.export.save``); no user class is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: torch.export archive not found (write one with torch.export.save)")
    import logging
    import zipfile

    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a readable torch.export archive (not a zip file); write it with "
                        "torch.export.save")
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)          # torch logs a traceback of its own before it raises
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise UserError(f"{path}: not a readable torch.export archive ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    finally:
        logger.setLevel(level)
    require_finite(path, list(program.state_dict.items()) + list(program.constants.items()), "tensor")
    return program


def _identity_bn(channels: int) -> dict:
    """BatchNorm that changes nothing: ``(x - 0) / sqrt((1 - eps) + eps) * 1 + 0``."""
    eps = 1e-5
    return {"weight": torch.ones(channels, dtype=torch.float64), "bias": torch.zeros(channels, dtype=torch.float64),
            "mean": torch.zeros(channels, dtype=torch.float64),
            "var": torch.full((channels,), 1 - eps, dtype=torch.float64), "eps": eps}


def float_template(program, input_shape: tuple[int, ...], *, input_scale: float = 1 / 255,
                   input_offset: float = 0.0, classes: int | None = None) -> templates.FloatMLP:
    """The traced user model as hwgen's float template, with the user's weights."""
    steps = _steps(program)
    conv_items, hidden, layers = [], [], []       # layers: (kind, step, bn or None)
    index = 0

    def take(kind):
        nonlocal index
        if index < len(steps) and steps[index].kind == kind:
            index += 1
            return steps[index - 1]
        return None

    def activation(after: _Step, required: bool):
        act = take("act")
        if act is None and required:
            where = steps[index].where if index < len(steps) else "the output"
            raise UserError(f"module {where}: hwgen needs ReLU or Hardtanh after {after.where} "
                            f"(the pattern is layer, optional BatchNorm, activation); supported: {SUPPORTED}")
        return act

    while index < len(steps) and steps[index].kind == "conv":
        conv = take("conv")
        norm = take("bn")
        act = activation(conv, True)
        pool = take("pool")
        channels, _, kernel, _ = conv.tensors["weight"].shape
        stride, padding = conv.args
        if padding >= kernel:
            raise UserError(f"module {conv.where}: padding {padding} must be below the kernel size {kernel}")
        conv_items.append(f"{channels}c{kernel}s{stride}p{padding}")
        if pool is not None:
            conv_items.append(f"m{pool.args[0]}")
        layers.append(("conv", conv, norm, act))
    take("flatten")
    while index < len(steps):
        linear = take("linear")
        if linear is None:
            step = steps[index]
            raise UserError(f"module {step.where}: a {step.kind} here does not fit hwgen's pattern; supported: "
                            f"{SUPPORTED} as convolutions, then dense layers")
        if index == len(steps):
            layers.append(("out", linear, None, None))
            break
        norm = take("bn")
        act = activation(linear, True)
        hidden.append(int(linear.tensors["weight"].shape[0]))
        layers.append(("linear", linear, norm, act))
    if not layers or layers[-1][0] != "out":
        raise UserError("the model must end with a Linear layer whose outputs are the class scores")
    out_features = int(layers[-1][1].tensors["weight"].shape[0])
    if classes is not None and out_features != classes:
        raise UserError(f"the model has {out_features} outputs, the data has {classes} classes")
    arch = templates.Architecture(tuple(input_shape), tuple(hidden), out_features, "float", tuple(conv_items))
    arch.widths          # refuses a conv front end that shrinks the input to nothing
    model = templates.build_model(arch)
    convs, linears = iter(model.convs), iter(model.linears)
    conv_norms, norms = iter(model.conv_norms), iter(model.norms)
    first = True
    with torch.no_grad():
        for kind, step, norm, act in layers:
            target = next(convs) if kind == "conv" else next(linears)
            weight = step.tensors["weight"].clone()
            bias = step.tensors["bias"] if step.tensors["bias"] is not None else torch.zeros(weight.shape[0],
                                                                                              dtype=torch.float64)
            if tuple(target.weight.shape) != tuple(weight.shape):
                raise UserError(f"module {step.where}: weight of shape {list(weight.shape)} does not fit the shapes "
                                f"hwgen traces for an input of {list(input_shape)} ({list(target.weight.shape)})")
            if first:
                # the template sees x / 255; the user's model saw x * input_scale + input_offset
                if input_offset and kind == "conv" and step.args[1]:
                    raise UserError(f"module {step.where}: an input offset ({input_offset}) cannot fold into a "
                                    "padded first convolution (its padding is 0 of the normalized input)")
                bias = bias + input_offset * weight.flatten(1).sum(dim=1)
                weight = weight * (255.0 * input_scale)
                first = False
            target.weight.copy_(weight.float())
            target.bias.copy_(bias.float())
            if kind == "out":
                continue
            if act.args[0] == "hardtanh" and not (act.args[1] <= 0 <= act.args[2]):
                raise UserError(f"module {act.where}: Hardtanh({act.args[1]}, {act.args[2]}) does not contain 0")
            bn = norm.tensors if norm is not None else _identity_bn(weight.shape[0])
            eps = norm.args[0] if norm is not None else bn["eps"]
            target_norm = next(conv_norms) if kind == "conv" else next(norms)
            for name, key in (("weight", "weight"), ("bias", "bias"), ("running_mean", "mean"),
                              ("running_var", "var")):
                getattr(target_norm, name).copy_(bn[key].float())
            target_norm.eps = eps
    model.eval()
    model.activations = [act.args for _, _, _, act in layers if act is not None]
    return model


class _UserModel(nn.Module):
    """The user's own traced model behind hwgen's input convention (flat uint8 values as floats)."""

    def __init__(self, program, input_shape: tuple[int, ...], input_scale: float, input_offset: float):
        super().__init__()
        self.module, self.input_shape = program.module(), tuple(input_shape)
        self.input_scale, self.input_offset = input_scale, input_offset
        # an archive traced without a dynamic batch runs in batches of the size it was traced with
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"
                        and n.name in program.graph_signature.user_inputs]
        size = placeholders[0].meta["val"].shape[0] if placeholders else None
        self.batch = size if isinstance(size, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.input_shape
        if len(shape) == 2:
            x = x.reshape(len(x), 1, *shape)
        elif len(shape) == 3:
            x = x.reshape(len(x), *shape).permute(0, 3, 1, 2)
        x = x * self.input_scale + self.input_offset
        if self.batch is None:
            return self.module(x)
        padded = torch.cat([x, x[:1].expand(-len(x) % self.batch, *x.shape[1:])])
        return torch.cat([self.module(chunk) for chunk in padded.split(self.batch)])[:len(x)]

    def eval(self):      # an exported module has no train/eval switch; it is traced in eval mode
        return self


@dataclass
class QuantizedNetwork:
    """A quantized or binarized network: the torch model, its float starting point, and its export."""

    model: nn.Module
    reference: nn.Module      # the user's float model
    info: dict

    def export(self) -> IntegerModel:
        """The integer model (IR), ready for the golden model, RTL and boards."""
        return templates.export(self.model, self.info)

    def evaluate(self, data) -> float:
        """Golden-model accuracy on a dataset's test set (a :class:`~hwgen.data.Dataset` or a path)."""
        ds = _dataset(data)
        return float((golden.run(self.export(), ds.test_x).classes == ds.test_y).mean())

    def save(self, path: Path | str) -> IntegerModel:
        """Write the integer model file (atomically); returns it."""
        model = self.export()
        model.save(path)
        return model


def _dataset(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    return load_dataset("auto", data)


def _program(model, input_shape):
    if isinstance(model, (str, Path)):
        return load_program(model)
    if isinstance(model, nn.Module):
        return trace(model, input_shape)
    return model      # an ExportedProgram


def quantize(model, calibration, kind: str = "int8", *, input_scale: float = 1 / 255,
             input_offset: float = 0.0, qat_epochs: int = 0, seed: int = 0) -> QuantizedNetwork:
    """Post-training int8 quantization of a trained float model.

    Parameters
    ----------
    model : nn.Module, torch.export.ExportedProgram, or a path to a ``.pt2`` archive
    calibration : Dataset or path
        Its training samples calibrate the activation scales (the first 10,000).
    kind : str
        ``"int8"``; ``"binary"``/``"mixed"`` go through :func:`binarize`.
    """
    if kind != "int8":
        return binarize(model, calibration, kind=kind, input_scale=input_scale, input_offset=input_offset, seed=seed)
    ds = _dataset(calibration)
    program = _program(model, ds.image_shape)
    template = float_template(program, ds.image_shape, input_scale=input_scale, input_offset=input_offset,
                              classes=ds.classes)
    if any(activation[0] == "hardtanh" for activation in template.activations):
        raise UserError("the model uses Hardtanh; hwgen's int8 activations are uint8 after ReLU: quantize a ReLU "
                        "model to int8, or binarize this one (kind='binary' or 'mixed')")
    user = _UserModel(program, ds.image_shape, input_scale, input_offset)
    quantized = templates.int8_from_float(template, ds.train_x[:10000])
    info = {"dataset": ds.name, "kind": "int8", "source": "torch", "seed": seed,
            "float_accuracy": templates.float_accuracy(user, ds.test_x, ds.test_y),
            "ptq_accuracy": templates.float_accuracy(quantized, ds.test_x, ds.test_y)}
    if qat_epochs:
        info["qat_accuracy"] = templates.train(quantized, ds, epochs=qat_epochs, seed=seed, lr=1e-4)
    return QuantizedNetwork(quantized, user, info)


def binarize(model, train_data, kind: str = "binary", *, weights: str = "binary", act_bits: int = 1,
             epochs: int = 10, distill: bool = True,
             temperature: float = 4.0, distill_weight: float = 0.7, lr: float = 1e-2, seed: int = 0,
             input_scale: float = 1 / 255, input_offset: float = 0.0,
             augmentation: templates.Augmentation = templates.Augmentation()) -> QuantizedNetwork:
    """Quantization-aware fine-tuning to ``binary`` (W1A1) or ``mixed`` from the float weights.

    With ``kind="binary"``, ``weights="ternary"`` gives {-1, 0, +1} weights (TWN) and ``act_bits``
    2-4 gives k-bit hidden activations (multi-threshold units in hardware): W1A2, WtA2 and so on.

    The student starts from the float model's weights (scaled into the latent [-1, 1]) and, with
    ``distill``, learns from the float model itself as teacher: soft targets at ``temperature``,
    soft loss scaled by T² (:func:`hwgen.frontends.templates.train`). ``augmentation`` (random
    shifts, mirroring) changes the training samples for student and teacher alike.
    """
    if kind not in ("binary", "mixed"):
        raise UserError(f"kind {kind!r}: binarize makes 'binary' or 'mixed' networks (quantize makes 'int8')")
    ds = _dataset(train_data)
    program = _program(model, ds.image_shape)
    template = float_template(program, ds.image_shape, input_scale=input_scale, input_offset=input_offset,
                              classes=ds.classes)
    user = _UserModel(program, ds.image_shape, input_scale, input_offset)
    arch = template.arch.with_kind(kind)
    student = templates.build_model(replace(arch, weights=weights, act_bits=act_bits), seed)
    templates.start_from_float(template, student)
    info = {"dataset": ds.name, "kind": kind, "precision": student.arch.precision, "source": "torch", "seed": seed,
            "epochs": epochs,
            "float_accuracy": templates.float_accuracy(user, ds.test_x, ds.test_y)}
    if distill:
        info["distillation"] = {"temperature": temperature, "weight": distill_weight, "teacher": "the float model"}
    if augmentation.active:
        info["augmentation"] = augmentation.as_dict()
    info[f"{kind}_accuracy"] = templates.train(student, ds, epochs=epochs, seed=seed, lr=lr,
                                               teacher=user if distill else None, temperature=temperature,
                                               distill_weight=distill_weight, augmentation=augmentation)
    return QuantizedNetwork(student, user, info)
