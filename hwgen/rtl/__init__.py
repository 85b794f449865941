"""Amaranth generators: one module per hardware block, and the network top that chains them."""
