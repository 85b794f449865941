"""The reference speed: the same network Verilog in a bare C++ Verilator loop, no cocotb.

Used by the benchmarks to put the cocotb runs in proportion (same design, same images, one
process each), and as a second, independent driver of the RTL (its words are checked too).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwgen.errors import UserError
from hwgen.process import run_tool
from hwgen.rtl.network import TOP_NAME, NetworkTop, generate_verilog

from rtl_templates import render

from .runner import build_is_current, mark_built, prepare_verilator_environment
from .verify import image_beats


@dataclass
class RawRun:
    words: np.ndarray          # (images, words per image) uint32
    out_last: np.ndarray
    cycles: int
    wall_seconds: float


class RawVerilatorLoop:
    """``hwgen_network`` compiled with a generated C++ ``main`` (``rtl_templates/raw_loop.cpp.j2``).

    The loop offers a beat every cycle and always takes output, so it runs at the design's II.
    """

    def __init__(self, top: NetworkTop, build_dir: Path | str):
        self.top = top
        self.build_dir = Path(build_dir).resolve()
        beat_bits = len(top.s_axis_tdata)
        verilog = generate_verilog(top) + render("raw_top.v.j2", dut=TOP_NAME, beat_bits=beat_bits)
        main = render(
            "raw_loop.cpp.j2", beat_bytes=beat_bits // 8, beats=top.input_beats, words=top.output_words,
            max_cycles_per_image=4 * sum(stage.cycles_per_image for stage in top.stages) + 100)
        # No VPI here, so nothing is public: Verilator may optimize across the whole design.
        args = ["--cc", "--exe", "--build", "-j", "2", "-Wno-fatal", "-O3", "--top-module", "hwgen_raw_top",
                "-Mdir", str(self.build_dir), "-o", "raw_loop", "network.v", "main.cpp"]
        digest = hashlib.sha256((verilog + main + repr(args)).encode()).hexdigest()
        self.executable = self.build_dir / "raw_loop"
        if build_is_current(self.build_dir, digest) and self.executable.is_file():
            return
        self.build_dir.mkdir(parents=True, exist_ok=True)
        (self.build_dir / "network.v").write_text(verilog)
        (self.build_dir / "main.cpp").write_text(main)
        prepare_verilator_environment()
        done = run_tool(["verilator", *args], cwd=self.build_dir)
        if done.returncode != 0:
            raise UserError(f"Verilator could not build the raw loop in {self.build_dir}:\n{done.stderr[-3000:]}")
        mark_built(self.build_dir, digest)

    def run(self, images: np.ndarray, work_dir: Path | str) -> RawRun:
        """Run ``images`` through the loop; returns the words and cycle counts it reports."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        beats_path, words_path = work_dir / "beats.bin", work_dir / "words.bin"
        beats_path.write_bytes(image_beats(self.top, images.reshape(len(images), -1)).tobytes())
        start = time.perf_counter()
        done = run_tool([str(self.executable), str(beats_path), str(words_path)])
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"raw loop failed: {done.stderr[-2000:]}")
        lines = done.stdout.split()
        words = np.fromfile(words_path, dtype="<u4").reshape(-1, self.top.output_words)
        return RawRun(words, np.array([int(v) for v in lines[1:]], np.int64), int(lines[0].split("=")[1]), wall)
