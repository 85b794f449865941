"""hwgen: quantized PyTorch networks to bit-exact, verified hardware with open tools."""

__version__ = "0.1.0"


def quantize(model, calibration, kind: str = "int8", **options):
    """Post-training quantization of your own float PyTorch model: see :func:`hwgen.frontends.torch_import.quantize`."""
    from .frontends.torch_import import quantize as run
    return run(model, calibration, kind, **options)


def binarize(model, train_data, kind: str = "binary", **options):
    """Binary or mixed fine-tuning of your own float model: see :func:`hwgen.frontends.torch_import.binarize`."""
    from .frontends.torch_import import binarize as run
    return run(model, train_data, kind, **options)
