"""Front ends: everything that reads torch or ONNX and makes an :class:`hwgen.ir.IntegerModel`."""
