"""``verilator --lint-only -Wall`` over hwgen's Verilog, with the warning classes that Amaranth's
Verilog output (yosys ``write_verilog``) raises by construction waived here, in one place, each
with its reason. Any other warning is a finding."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hwgen.process import run_tool

from .runner import prepare_verilator_environment

__all__ = ["WAIVED", "lint_verilog"]

#: Warning class -> why it is waived for generated Verilog.
WAIVED = {
    "PROCASSINIT": "every register is declared with its reset value as an initializer (`reg x = 0;`) and "
                   "assigned in an always block: the FPGA power-up value, which is how Amaranth states it",
    "WIDTHEXPAND": "write_verilog relies on Verilog's context-determined widths, zero- or sign-extending an "
                   "operand to the width of the expression; the widths are Amaranth's, and the simulations "
                   "check every output bit against the golden model",
    "WIDTHTRUNC": "the same rule the other way: a wider intermediate (a shift, a one-bit test of a vector) "
                  "assigned to a narrower wire keeps its low bits, as Amaranth means",
    "UNUSEDSIGNAL": "Amaranth keeps every named signal, including bits no logic reads (the unused high bits "
                    "of a counter, a stream payload field a stage ignores); synthesis removes them",
    "ASCRANGE": "a zero-width signal (the address of a one-entry FIFO) is written `[-1:0]`",
    "DECLFILENAME": "the file is named by the user, not after its top module",
    "CASEINCOMPLETE": "a Switch without a default (a LUT ROM of fewer than 2**n words) becomes a case "
                      "statement without one; every signal it drives is first assigned its initial value, "
                      "so an uncovered value keeps that and no latch arises (LATCH stays a finding)",
}


def lint_verilog(verilog: str, top: str, primitives: str = "") -> list[str]:
    """The warnings and errors ``verilator --lint-only -Wall`` gives for ``verilog`` (top module
    ``top``) beyond the classes in :data:`WAIVED`: one line per finding, empty when clean.

    ``primitives`` holds the vendor cells the design instantiates (yosys's simulation models,
    :func:`sim.primitives.primitive_models`); they are not hwgen's code, so they are not linted.
    """
    prepare_verilator_environment()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, f"{top}.v").write_text(verilog)
        sources = [f"{top}.v"]
        if primitives:
            Path(folder, "primitives.v").write_text(primitives)
            Path(folder, "primitives.vlt").write_text('`verilator_config\nlint_off -file "*primitives.v"\n')
            sources = ["primitives.vlt", *sources, "primitives.v"]
        done = run_tool(["verilator", "--lint-only", "-Wall", *(f"-Wno-{name}" for name in WAIVED),
                         "--top-module", top, *sources], cwd=folder)
    findings = [line for line in done.stderr.splitlines() if line.startswith("%")]
    if done.returncode != 0 and not findings:
        findings = [f"verilator exited with status {done.returncode}: {done.stderr.strip()[-500:]}"]
    return findings
