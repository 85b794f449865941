"""Text templates (jinja2) for the simulation harness and the raw Verilator loop."""
