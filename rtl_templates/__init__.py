"""Text templates (jinja2) for the simulation harness and the raw Verilator loop."""
from __future__ import annotations

from pathlib import Path

import jinja2

_ENVIRONMENT = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent),
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(name: str, **values) -> str:
    """The template ``name`` from this folder filled with ``values`` (a missing value is an error)."""
    return _ENVIRONMENT.get_template(name).render(**values)
