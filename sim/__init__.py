"""cocotb testbenches and the Verilator runner glue."""
