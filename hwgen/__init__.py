"""hwgen: quantized PyTorch networks to bit-exact, verified hardware with open tools."""

__version__ = "0.1.0"
