"""The benchmark suite: `make bench` writes ``bench/results.json``, two plots, and the README table.

Every figure comes from this run on this machine; where a figure compares two things, both are
measured side by side here. Reference networks (Fashion-MNIST shape, 28×28 uint8 input):

``mlp-binary``, ``mlp-int8``, ``mlp-mixed``
    784-256-256-10 MLPs trained by ``hwgen train`` (seed 0, 20 epochs; reused from
    ``build/bench`` when present); ``mlp-binary`` is the reference for the whole-test-set run.
``cnn-binary``
    32c3,m2,64c3,m2 + 256 + 10, W1A1, random weights (simulation speed, II and resources do not
    depend on trained values; the trained CNNs' accuracy is in the README).

Board figures are yosys cell counts at ``--fold auto``'s choice for that board, then ``hwgen
build``'s placed counts and Fmax (``--no-pnr`` skips the builds, which take 4-50 minutes each
under WebAssembly), and from those the figure hardware people compare: MACs per second per LUT
at placed Fmax, beside FINN's published BNN-PYNQ LFC W1A1 figure. The II is measured in
Verilator at the ULX3S's folds.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from hwgen import golden
from hwgen.boards import load_board
from hwgen.data import load_dataset
from hwgen.errors import UserError
from hwgen.fit import Estimate, auto_folds
from hwgen.ir import Conv2dLayer, IntegerModel, MaxPool2dLayer
from hwgen.rtl.dense import pipelining_for
from hwgen.rtl.network import Fold, NetworkTop, compute_layers, default_folds, generate_verilog
from hwgen.rtl.spram import SPRAM_PRIMITIVE
from hwgen.synth import lut4s, synthesize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results.json")
WORK = ROOT / "build" / "bench"
README = ROOT / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- bench:begin -->", "<!-- bench:end -->"
#: The reference MLPs the bench trains and builds: ``hwgen train`` options besides the shape.
TRAINED = {"mlp-binary": ["--kind", "binary"], "mlp-int8": ["--kind", "int8"], "mlp-mixed": ["--kind", "mixed"]}
#: The low-bit precisions of the same MLP, trained for the accuracy-by-precision figure only, with
#: the recipe measured best for W1A2 ("Between 1 and 8 bits" in the README).
PRECISIONS = {"W1A2": ["--kind", "binary", "--act-bits", "2", "--lr", "2e-2", "--distill", "--temperature", "2"],
              "WtA2": ["--kind", "binary", "--weights", "ternary", "--act-bits", "2", "--lr", "2e-2", "--distill"],
              "W2A2": ["--kind", "binary", "--weights", "int2", "--act-bits", "2", "--lr", "2e-2", "--distill"]}
FAMILIES = {"ecp5": ("ulx3s-85f", "TRELLIS_FF", "DP16KD", "MULT18X18D"),
            "ice40": ("icebreaker", "SB_DFF", "SB_RAM40_4K", "SB_MAC16")}
FAMILIES_BOARDS = [board for board, *_ in FAMILIES.values()]
#: nextpnr placer seeds per build (``hwgen build --seeds``): placed Fmax of one netlist varies by
#: 10-20 % from seed to seed, so each build keeps the best of these, and the spread is reported.
PNR_SEEDS = 2

#: FINN's BNN-PYNQ LFC W1A1 (784-1024-1024-1024-10) on a Zynq 7020 at 100 MHz, as published in the
#: FINN paper (Umuroglu et al., FPGA 2017, table "max" LFC): images/s and LUT6s; its MACs per image.
FINN_LFC = {"images_per_s": 356_633, "luts": 28_360,
            "macs": 784 * 1024 + 1024 * 1024 + 1024 * 1024 + 1024 * 10}


def macs_per_s_per_lut(macs: int, images_per_s: float, luts: int) -> float:
    """Multiply-accumulates per second per LUT: the throughput-per-area figure FPGA papers compare."""
    return macs * images_per_s / luts


def hwgen(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "hwgen.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"hwgen {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def trained_model(name: str, options: list[str] | None = None) -> IntegerModel:
    """The trained reference MLP ``name`` (or one trained with ``options``): trained and exported
    into ``build/bench`` once."""
    path = WORK / f"{name}.npz"
    if not path.is_file():
        checkpoint = WORK / f"{name}.pt"
        print(f"training {name} (784-256-256-10, 20 epochs) ...", flush=True)
        hwgen("train", "--dataset", "fashion-mnist", "--hidden", "256,256", "--epochs", "20", "--seed", "0",
              *(options or TRAINED[name]), "-o", str(checkpoint))
        hwgen("export", str(checkpoint), "-o", str(path))
    return IntegerModel.load(path)


def cnn_model() -> IntegerModel:
    """The reference CNN shape with random weights: two 3×3 convolutions with 2×2 pooling, then
    the 256-wide hidden layer and the scores layer `--conv 32c3,m2,64c3,m2 --hidden 256` trains."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_cnn, random_layer

    spec = dict(kernel=3, stride=1, padding=1, weights="binary", output="threshold", pool=2)
    convs = random_cnn(np.random.default_rng(0), (28, 28, 1), [dict(spec, channels=32), dict(spec, channels=64)],
                       10).layers[:-1]          # random_cnn's own scores layer is replaced below
    rng = np.random.default_rng(1)
    hidden = random_layer(rng, "dense0", "bits", "threshold", convs[-1].out_features, 256)
    return IntegerModel((28, 28, 1), convs + (hidden, random_layer(rng, "dense1", "bits", "scores", 256, 10)))


def timed(function, repeat: int = 1):
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def total_macs(model: IntegerModel) -> int:
    macs = 0
    for layer in model.layers:
        if isinstance(layer, Conv2dLayer):
            macs += layer.dense.in_features * layer.dense.out_features * layer.out_shape[0] * layer.out_shape[1]
        elif not isinstance(layer, MaxPool2dLayer):
            macs += layer.in_features * layer.out_features
    return macs


def bench_verification(model: IntegerModel, images: np.ndarray) -> dict:
    """Item 1: the whole test set through the RTL: cocotb harness vs raw Verilator loop, and 2 jobs."""
    from sim.fast import BatchSimulator, verify_all
    from sim.raw import RawVerilatorLoop
    from sim.verify import expected_words

    folds = default_folds(model)
    expected = expected_words(golden.run(model, images))
    raw = RawVerilatorLoop(NetworkTop(model, folds), WORK / "raw")
    raw_run = raw.run(images, WORK / "raw_run")
    simulator = BatchSimulator(model, folds, WORK / "verify" / "batch", batch=32)
    one = simulator.run(images, WORK / "cocotb_run")
    start = time.perf_counter()
    report = verify_all(model, folds, images, WORK / "verify", jobs=2)
    full_wall = time.perf_counter() - start
    return {
        "images": len(images),
        "raw_images_per_s": round(len(images) / raw_run.wall_seconds, 1),
        "raw_cycles_per_s": round(raw_run.cycles / raw_run.wall_seconds),
        "raw_mismatched_images": int((raw_run.words.view(np.int32) != expected).any(axis=1).sum()),
        "cocotb_images_per_s": round(len(images) / one.wall_seconds, 1),
        "cocotb_cycles_per_s": round(one.cycles / one.wall_seconds),
        "cocotb_mismatched_images": int((one.words.view(np.int32) != expected).any(axis=1).sum()),
        "cocotb_over_raw": round(raw_run.wall_seconds / one.wall_seconds, 3),
        "verify_jobs": 2,
        "verify_wall_s": round(full_wall, 1),
        "verify_mismatched_images": report.mismatched_images,
        "verify_protocol_errors": report.protocol_errors,
        "ii_measured": report.ii_measured,
        "ii_formula": report.ii_formula,
    }


def bench_golden_vs_torch(model: IntegerModel, images: np.ndarray) -> dict:
    """Item 2: golden images/s against torch's float forward of the same 784-256-256-10 shape."""
    import torch

    from hwgen.frontends.templates import Architecture, FloatMLP

    torch.manual_seed(0)
    net = FloatMLP(Architecture((28, 28), (256, 256), 10, "float")).eval()
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    golden_s, _ = timed(lambda: golden.run(model, images), repeat=3)
    with torch.no_grad():
        torch_s, _ = timed(lambda: net(x), repeat=3)
    return {"images": len(images), "torch_threads": torch.get_num_threads(),
            "golden_images_per_s": round(len(images) / golden_s),
            "torch_float_images_per_s": round(len(images) / torch_s),
            "golden_over_torch": round(torch_s / golden_s, 3)}


def board_folds(model: IntegerModel, board_name: str) -> tuple[Estimate | None, str]:
    """``--fold auto``'s choice on ``board_name`` (folds and weight placement); ``None`` and the
    reason when no folding fits."""
    try:
        return auto_folds(model, load_board(board_name)), "auto"
    except UserError as error:
        return None, str(error)


def bench_network(name: str, model: IntegerModel) -> dict:
    """Items 3-5 for one network: generation time, II vs formula vs ideal, synthesis per board."""
    from sim.fast import BatchSimulator

    # --fold auto once per board: the II is measured at the ULX3S's folds, synthesis uses each board's.
    choices = {board: board_folds(model, board) for board in FAMILIES_BOARDS}
    ecp5_choice = choices[FAMILIES["ecp5"][0]][0]
    folds = ecp5_choice.folds if ecp5_choice else default_folds(model)
    seconds, verilog = timed(lambda: generate_verilog(NetworkTop(model, folds)), repeat=2)
    top = NetworkTop(model, folds)
    images = np.random.default_rng(0).integers(0, 256, (12, model.in_features)).astype(np.uint8)
    run = BatchSimulator(model, folds, WORK / "ii" / name, batch=4).run(images, WORK / "ii" / name / "run")
    macs = total_macs(model)
    lanes = sum(fold.pe * fold.simd for fold in folds)
    result = {"folds": [str(f) for f in folds], "verilog_generation_s": round(seconds, 2),
              "verilog_bytes": len(verilog), "ii_measured": int(np.diff(run.out_last)[-1]),
              "ii_formula": top.cycles_per_image, "macs": macs, "macs_per_cycle": lanes,
              "ii_ideal": round(macs / lanes, 1)}
    all_binary = all(layer.weight_kind == "binary" for layer in compute_layers(model))
    for family, (board, ff, bram, dsp) in FAMILIES.items():
        board_est, choice = choices[board]
        if board_est is None:
            result[board] = {"fits": False, "why": choice}
            continue
        board_fold = board_est.folds
        start = time.perf_counter()
        board_top = NetworkTop(model, board_fold, weight_memories=board_est.weight_memories,
                               **pipelining_for(family))
        text = generate_verilog(board_top)
        cells = synthesize(text, "hwgen_network", family)
        result[board] = {"fits": True, "fold_choice": choice, "folds": [str(f) for f in board_fold],
                         "weight_memories": board_est.weight_memories,
                         "ii_formula": board_top.cycles_per_image, "macs": macs,
                         "luts": lut4s(cells, family), "ffs": sum(v for k, v in cells.items() if k.startswith(ff)),
                         "brams": cells.get(bram, 0), "dsps": cells.get(dsp, 0),
                         "sprams": cells.get(SPRAM_PRIMITIVE, 0), "estimate": board_est.total.as_dict(),
                         "synth_s": round(time.perf_counter() - start, 1)}
        if all_binary:
            binary_lanes = sum(fold.pe * fold.simd for fold in board_fold)
            result[board]["luts_per_binary_mac_per_cycle"] = round(result[board]["luts"] / binary_lanes, 2)
    return result


def pnr_point(name: str, board: str, row: dict):
    """The sweep point that places and routes network ``name`` on ``board`` at the folds and weight
    placement its results row holds (its model saved under ``build/bench/boards``)."""
    from hwgen.sweep import SweepPoint

    return SweepPoint(str(WORK / "boards" / f"{name}.npz"), board, ",".join(row["folds"]), "pnr",
                      weights=",".join(row["weight_memories"]), seeds=PNR_SEEDS)


def save_results(results: dict) -> None:
    """Write results.json (through a staging file) and the README table from ``results``."""
    staging = RESULTS.with_suffix(".json.partial")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.replace(RESULTS)
    rewrite_readme(readme_table(results))


def place_and_route_all(models: dict[str, IntegerModel], networks: dict[str, dict], jobs: int) -> float:
    """Item 5's Fmax: ``hwgen build`` (yosys + nextpnr, bitstream) of every network on every board
    it fits, at the folds and weight placement synthesized above, as a ``hwgen sweep`` on a local
    Ray of ``jobs`` workers (rows in ``build/bench/sweep/results.jsonl``; a rerun reuses finished
    builds of unchanged inputs). Results go into ``networks``; returns the wall time in seconds."""
    from hwgen.sweep import run_sweep

    builds = [(name, board) for name, row in networks.items() for board in FAMILIES_BOARDS if row[board]["fits"]]
    (WORK / "boards").mkdir(parents=True, exist_ok=True)
    for name in {name for name, _ in builds}:
        models[name].save(WORK / "boards" / f"{name}.npz")
    points = [pnr_point(name, board, networks[name][board]) for name, board in builds]
    start = time.perf_counter()
    rows = run_sweep(points, WORK / "sweep", num_cpus=jobs)
    wall = time.perf_counter() - start
    for (name, board), row in zip(builds, rows):
        if "error" in row:                     # a design the estimate passed but nextpnr refused is a result
            networks[name][board]["pnr_error"] = row["error"][-600:]
            continue
        report = json.loads((Path(row["build"]) / "hwgen_report.json").read_text())
        result = {"fmax_mhz": report["fmax_mhz"], "placed": report["placed"], "pnr_tool_s": report["tool_seconds"],
                  "nextpnr_seeds_fmax_mhz": report.get("nextpnr_seeds_fmax_mhz"),
                  "images_per_s_at_fmax": round(report["images_per_s_at_fmax"] or 0),
                  "weight_image": report.get("weight_image")}
        result["macs_per_s_per_lut"] = round(macs_per_s_per_lut(
            networks[name]["macs"], result["images_per_s_at_fmax"], report["placed"]["luts"]["used"]))
        networks[name][board].update(result)
    return wall


def bench_layers(model: IntegerModel) -> list[dict]:
    """Resources per stage of the reference MLP on ECP5 (each stage synthesized alone)."""
    from amaranth.back import verilog as amaranth_verilog

    top = NetworkTop(model, default_folds(model))
    rows = []
    for index, (stage, layer) in enumerate(zip(top.stages, top.stage_layers)):
        text = amaranth_verilog.convert(stage, name="stage", emit_src=False, strip_internal_attrs=True)
        cells = synthesize(text, "stage", "ecp5")
        rows.append({"stage": f"{layer}:{type(stage).__name__}", "luts": lut4s(cells, "ecp5"),
                     "ffs": sum(v for k, v in cells.items() if k.startswith("TRELLIS_FF")),
                     "brams": cells.get("DP16KD", 0)})
    return rows


def bench_popcount() -> list[dict]:
    """Item 6: our XNOR-popcount (Amaranth adder tree) vs a plain Verilog sum loop, same width."""
    from amaranth.back import verilog as amaranth_verilog
    from amaranth.hdl import Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    from hwgen.rtl.arith import tree_sum

    rows = []
    for width in (32, 128, 512):
        class XnorPopcount(wiring.Component):
            def __init__(self):
                super().__init__({"x": In(width), "w": In(width), "count": Out(width.bit_length())})

            def elaborate(self, platform):
                m = Module()
                agree = Signal(width)
                m.d.comb += agree.eq(~(self.x ^ self.w))
                m.d.sync += self.count.eq(tree_sum([agree[k] for k in range(width)]))
                return m

        ours = amaranth_verilog.convert(XnorPopcount(), name="popcount", emit_src=False, strip_internal_attrs=True)
        bits = width.bit_length()
        plain = (f"module popcount(input clk, input rst, input [{width - 1}:0] x, input [{width - 1}:0] w, "
                 f"output reg [{bits - 1}:0] count);\n  integer i; reg [{bits - 1}:0] s;\n"
                 f"  always @* begin s = 0; for (i = 0; i < {width}; i = i + 1) s = s + !(x[i] ^ w[i]); end\n"
                 f"  always @(posedge clk) count <= rst ? 0 : s;\nendmodule\n")
        for family in FAMILIES:
            rows.append({"width": width, "family": family,
                         "hwgen_luts": lut4s(synthesize(ours, "popcount", family), family),
                         "plain_yosys_luts": lut4s(synthesize(plain, "popcount", family), family)})
    return rows


def bench_accuracy(models: dict[str, IntegerModel], test_x: np.ndarray, test_y: np.ndarray) -> dict:
    accuracy = {"float": models["mlp-binary"].info.get("float_accuracy")}
    for name, label in (("mlp-int8", "int8"), ("mlp-mixed", "mixed"), ("mlp-binary", "W1A1")):
        accuracy[label] = round(float((golden.run(models[name], test_x).classes == test_y).mean()), 4)
    return accuracy | precision_accuracy(test_x, test_y)


def precision_accuracy(test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """The low-bit MLPs of :data:`PRECISIONS` (trained into ``build/bench`` once): test accuracy."""
    accuracy = {}
    for label, options in PRECISIONS.items():
        model = trained_model(f"mlp-{label.lower()}", options)
        accuracy[label] = round(float((golden.run(model, test_x).classes == test_y).mean()), 4)
    return accuracy


def plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = results["accuracy"]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    labels = list(accuracy)
    axis.bar(labels, [100 * accuracy[k] for k in labels], color=["#888", "#2a7", "#27a", "#a52", "#c83", "#b6a", "#5ab"])
    for index, label in enumerate(labels):
        axis.text(index, 100 * accuracy[label] + 0.1, f"{100 * accuracy[label]:.2f}", ha="center")
    axis.set_ylim(85, 92)
    axis.set_ylabel("Fashion-MNIST test accuracy (%)")
    axis.set_title("784-256-256-10 MLP by precision (golden model)")
    figure.tight_layout()
    figure.savefig(Path(__file__).with_name("accuracy_vs_precision.png"), dpi=120)

    layers = results["mlp_binary_stages_ecp5"]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    names = [row["stage"] for row in layers]
    x = np.arange(len(names))
    axis.bar(x - 0.2, [row["luts"] for row in layers], 0.4, label="LUT4")
    axis.bar(x + 0.2, [row["ffs"] for row in layers], 0.4, label="FF")
    axis.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("cells (yosys synth_ecp5)")
    axis.set_title("mlp-binary resources per stage (block RAMs: "
                   + ", ".join(str(row["brams"]) for row in layers) + ")")
    axis.legend()
    figure.tight_layout()
    figure.savefig(Path(__file__).with_name("resources_per_layer.png"), dpi=120)


def readme_table(results: dict) -> str:
    v, g = results["verification"], results["golden_vs_torch"]
    placed = any("placed" in row[board] for row in results["networks"].values() for board in FAMILIES_BOARDS)
    lines = [
        f"Measured by `make bench` ({results['machine']}, {results['date']}); raw data in `bench/results.json`.",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| whole test set through the RTL (`hwgen verify`, mlp-binary, {v['verify_jobs']} processes) | "
        f"{v['images']:,} images, {v['verify_mismatched_images']} mismatches, {v['verify_wall_s']} s wall |",
        f"| RTL-verified images/s, cocotb + harness vs raw C++ Verilator loop (1 process each) | "
        f"{v['cocotb_images_per_s']:,} vs {v['raw_images_per_s']:,} images/s: ratio **{v['cocotb_over_raw']}** "
        f"({v['cocotb_cycles_per_s']:,} vs {v['raw_cycles_per_s']:,} cycles/s) |",
        f"| golden model vs torch float forward (784-256-256-10, {g['images']:,} images) | "
        f"{g['golden_images_per_s']:,} vs {g['torch_float_images_per_s']:,} images/s: ratio "
        f"{g['golden_over_torch']} |",
        "",
        "Board columns: yosys LUT, FF, BRAM, DSP at `--fold auto`'s choice for the board; "
        + ("then `hwgen build`'s placed counts and Fmax (nextpnr), images/s at that Fmax and MACs per "
           "second per LUT4. FINN's BNN-PYNQ LFC W1A1 (published: "
           f"{FINN_LFC['images_per_s']:,} images/s on {FINN_LFC['luts']:,} LUT6 at 100 MHz) makes "
           f"{macs_per_s_per_lut(FINN_LFC['macs'], FINN_LFC['images_per_s'], FINN_LFC['luts']) / 1e6:.1f} M "
           "MACs/s per LUT6." if placed else "no Fmax (run with `--no-pnr`)."),
        "The II columns are at the ULX3S's folds (measured in Verilator / formula / ideal = MACs ÷ lanes).",
        "",
        "| network | folds (ULX3S) | Verilog gen | II measured / formula / ideal | ULX3S-85F (ECP5) | "
        "iCEBreaker (iCE40UP5K) | LUT4 per binary MAC per cycle (ECP5, yosys, carry cells and LUT RAMs counted) |",
        "|---|---|---|---|---|---|---|",
    ]

    def board_cell(row: dict) -> str:
        if not row["fits"]:
            return "no folding fits (estimate)"
        cell = f"{row['luts']:,}, {row['ffs']:,}, {row['brams']}, {row['dsps']}"
        if row.get("sprams"):
            cell += f", {row['sprams']} SPRAM"
        if row["fold_choice"] == "auto":
            spram = [str(i) for i, memory in enumerate(row.get("weight_memories", [])) if memory == "spram"]
            where = f", weights of layer {'+'.join(spram)} in SPRAM" if spram else ""
            cell = f"`--fold auto` {' '.join(row['folds'])} (II {row['ii_formula']}{where}): {cell}"
        if "pnr_error" in row:
            return cell + "; place and route failed (see bench/results.json)"
        if "placed" in row:
            placed = row["placed"]
            cell += (f"; placed {placed['luts']['used']:,} LUT, {placed['bram_blocks']['used']} BRAM, "
                     f"{placed['dsps']['used']} DSP")
            if "spram_blocks" in placed and placed["spram_blocks"]["used"]:
                cell += f", {placed['spram_blocks']['used']} SPRAM"
            cell += f"; **Fmax {row['fmax_mhz']:.1f} MHz**"
            tried = row.get("nextpnr_seeds_fmax_mhz")
            if tried:
                cell += f" (best of {len(tried)} placer seeds: {' / '.join(f'{fmax:.1f}' for fmax in tried.values() if fmax)})"
            if row.get("weight_image"):
                cell += f", weights loaded from flash in {row['weight_image']['load_ms_at_network_clock']} ms"
            if row.get("macs_per_s_per_lut") is not None:
                cell += (f", {row['images_per_s_at_fmax']:,} images/s, "
                         f"**{row['macs_per_s_per_lut'] / 1e6:.2f} M MACs/s per LUT**")
        return cell

    for name, row in results["networks"].items():
        ecp5 = row["ulx3s-85f"]
        lines.append(f"| {name} | {' '.join(row['folds'])} | {row['verilog_generation_s']} s | "
                     f"{row['ii_measured']} / {row['ii_formula']} / {row['ii_ideal']} | {board_cell(ecp5)} | "
                     f"{board_cell(row['icebreaker'])} | {ecp5.get('luts_per_binary_mac_per_cycle', '–')} |")
    lines += ["", "| XNOR-popcount width | family | hwgen adder tree LUTs | plain yosys sum LUTs |", "|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['family']} | {r['hwgen_luts']} | {r['plain_yosys_luts']} |"
              for r in results["popcount"]]
    accuracy = results["accuracy"]
    lines += ["", "Accuracy by precision (784-256-256-10, golden model, full test set): "
              + ", ".join(f"{k} {100 * v:.2f} %" for k, v in accuracy.items()) + "."]
    return "\n".join(lines)


def rewrite_readme(table: str) -> None:
    text = README.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {TABLE_BEGIN} … {TABLE_END} block to rewrite")
    README.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{table}\n{TABLE_END}", text))


def redo_place_and_route(rows: list[list[str]]) -> None:
    """Place and route ``[network, board]`` rows of ``results.json`` again (the rest is kept)."""
    results = json.loads(RESULTS.read_text())
    networks = results["networks"]
    for item in rows:
        if len(item) != 2 or item[0] not in networks or item[1] not in FAMILIES_BOARDS:
            raise SystemExit(f"--redo-pnr: {':'.join(item)!r} is not NETWORK:BOARD of results.json "
                             f"({', '.join(networks)}; {', '.join(FAMILIES_BOARDS)})")
    wanted = {(name, board) for name, board in rows}
    models = {name: IntegerModel.load(WORK / "boards" / f"{name}.npz") for name, _ in wanted}
    subset = {name: {"macs": networks[name]["macs"],
                     **{board: (dict(networks[name][board]) if (name, board) in wanted else {"fits": False})
                        for board in FAMILIES_BOARDS}} for name in models}
    for name, board in wanted:
        for key in ("pnr_error", "placed", "fmax_mhz", "macs_per_s_per_lut", "images_per_s_at_fmax", "weight_image",
                    "nextpnr_seeds_fmax_mhz"):
            subset[name][board].pop(key, None)
    results.setdefault("pnr_redone", []).extend(f"{name}:{board}" for name, board in sorted(wanted))
    place_and_route_all(models, subset, jobs=2)
    for name, board in wanted:
        networks[name][board] = subset[name][board]
    save_results(results)


def redo_network(name: str) -> None:
    """Measure network ``name`` again from scratch (II in simulation, synthesis and place and route
    on every board at ``--fold auto``) after a change to its hardware; the rest of ``results.json``
    is kept."""
    results = json.loads(RESULTS.read_text())
    networks = results["networks"]
    if name not in networks:
        raise SystemExit(f"--redo: {name!r} is not a network of results.json ({', '.join(networks)})")
    warnings.filterwarnings("ignore", message=".*created but never used")
    model = cnn_model() if name == "cnn-binary" else trained_model(name)
    networks[name] = bench_network(name, model)
    place_and_route_all({name: model}, {name: networks[name]}, jobs=2)
    results.setdefault("redone", []).append(name)
    save_results(results)


def redo_accuracy() -> None:
    """Measure the low-bit precisions' accuracy (training what ``build/bench`` lacks) beside the
    reference MLPs' in ``results.json``, and redraw the plot; the rest of ``results.json`` is kept."""
    results = json.loads(RESULTS.read_text())
    dataset = load_dataset("fashion-mnist")
    results["accuracy"] |= precision_accuracy(dataset.test_x.reshape(len(dataset.test_x), -1), dataset.test_y)
    results.setdefault("redone", []).append("accuracy")
    save_results(results)
    plots(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-pnr", dest="pnr", action="store_false",
                        help="skip place and route (Fmax): yosys cell counts only")
    parser.add_argument("--redo-pnr", metavar="NETWORK:BOARD,...", default=None,
                        help="only place and route these rows again, at the folds results.json holds, and rewrite "
                             "results.json and the README table (after a fix, or a build that was cut short)")
    parser.add_argument("--redo", metavar="NETWORK", default=None,
                        help="only measure this network again (II, synthesis, place and route on every board) "
                             "and rewrite results.json and the README table (after a change to its hardware)")
    parser.add_argument("--redo-accuracy", action="store_true",
                        help="only measure the low-bit precisions' accuracy (W1A2, WtA2, W2A2) again and redraw "
                             "the accuracy plot")
    args = parser.parse_args(argv)
    if args.redo_accuracy:
        redo_accuracy()
        return
    if args.redo:
        redo_network(args.redo)
        return
    if args.redo_pnr:
        redo_place_and_route([item.split(":", 1) for item in args.redo_pnr.split(",")])
        return
    # Tops built only for their properties (folds, formulas) are never elaborated; that is fine.
    warnings.filterwarnings("ignore", message=".*created but never used")
    WORK.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("fashion-mnist")
    test_x, test_y = dataset.test_x.reshape(len(dataset.test_x), -1), dataset.test_y
    models = {name: trained_model(name) for name in TRAINED}
    results = {"machine": f"{platform.machine()}, 2 cores, CPython {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d")}
    print("whole test set through the RTL ...", flush=True)
    results["verification"] = bench_verification(models["mlp-binary"], test_x)
    results["golden_vs_torch"] = bench_golden_vs_torch(models["mlp-binary"], test_x)
    results["accuracy"] = bench_accuracy(models, test_x, test_y)
    results["networks"] = {}
    models["cnn-binary"] = cnn_model()
    for name, model in models.items():
        print(f"network {name} ...", flush=True)
        results["networks"][name] = bench_network(name, model)
    print("resources per stage, popcount comparison ...", flush=True)
    results["mlp_binary_stages_ecp5"] = bench_layers(models["mlp-binary"])
    results["popcount"] = bench_popcount()

    save_results(results)
    if args.pnr:
        print("place and route (hwgen sweep on a local Ray, 2 workers) ...", flush=True)
        results["pnr_wall_s"] = round(place_and_route_all(models, results["networks"], jobs=2))
    save_results(results)
    plots(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
