"""Boards: descriptions, UART, the board top in Verilator, the host over a simulated serial port,
resource fit and automatic folding, and real yosys/nextpnr builds."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from amaranth.sim import Simulator

from helpers import random_cnn, random_model
from hwgen import golden
from hwgen.boards import board_names, load_board
from hwgen.build import build_asic, build_board, network_clock_hz
from hwgen.rtl.clocks import ecp5_pll_settings, ice40_pll_settings
from hwgen.data import load_dataset
from hwgen.errors import UserError
from hwgen.fit import FAMILY_COSTS, auto_folds, bram_blocks_for, check_fit, estimate, memory_placement
from hwgen.host import BoardLink
from hwgen.protocol import IDENTITY_BYTES, identity, parse_identity
from hwgen.rtl.arith import MemoryShape
from hwgen.rtl.network import Fold, default_folds
from hwgen.rtl.uart import UARTReceiver, UARTTransmitter, uart_divisor
from sim.board import BoardSimulator
from amaranth.hdl import Module
from amaranth.lib import wiring
from test_cli import assert_user_error, hwgen

FPGA_BOARDS = [name for name in board_names() if name != "asic"]


@pytest.mark.parametrize("name", FPGA_BOARDS)
def test_board_files_agree_with_amaranth_boards(name):
    board = load_board(name)
    platform = board.amaranth_platform()
    assert (platform.device, platform.package) == (board.device, board.package)
    assert platform.default_clk == board.clock_resource
    assert platform.default_clk_frequency == board.clock_hz

    def pins(resource, number=0, sub=None):
        res = platform.resources[resource, number]
        for io in res.ios:
            if sub is None and hasattr(io, "names"):
                return io.names
            if getattr(io, "name", None) == sub:
                return io.ios[0].names
        raise AssertionError(f"{resource}.{sub} not found")

    assert pins(board.clock_resource) == [board.clock_pin]
    assert (pins(board.uart_resource, sub="rx"), pins(board.uart_resource, sub="tx")) == \
        ([board.uart_pins[0]], [board.uart_pins[1]])
    assert [pins(board.led_resource, i)[0] for i in range(len(board.led_pins))] == list(board.led_pins)
    block_bits = max(depth * width for depth, width in board.budget.bram_shapes)
    assert board.budget.bram_bits == board.budget.bram_blocks * block_bits


def test_unknown_board_is_a_clean_error(tmp_path):
    random_model(np.random.default_rng(0), [16, 8, 4]).save(tmp_path / "m.npz")
    assert_user_error(hwgen("build", "m.npz", "--board", "de10", cwd=tmp_path), "unknown board 'de10'", "icebreaker")


def test_build_clock_and_target_fps_options(tmp_path):
    """`hwgen build --no-pnr`: the PLL's real frequency in the report, the folds --target-fps picks,
    nextpnr's seed in the script when --seed names one, and clean errors for a clock the PLL
    cannot make and for --target-fps with explicit folds."""
    random_model(np.random.default_rng(4), [64, 32, 10]).save(tmp_path / "m.npz")
    result = hwgen("build", "m.npz", "--board", "icebreaker", "--clock", "48", "--target-fps", "400000",
                   "--no-pnr", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "hwgen_report.json").read_text())
    assert report["network_clock_mhz"] == 48 and report["network_clock_source"] == "PLL"
    assert report["folds"] == ["4x8", "1x4"] and report["cycles_per_image"] <= 48e6 / 400_000
    assert "SB_PLL40_2_PAD" in (tmp_path / "out" / "top.il").read_text()
    assert_user_error(hwgen("build", "m.npz", "--board", "icebreaker", "--clock", "300", "--no-pnr", cwd=tmp_path),
                      "--clock 300 MHz: the iCE40 PLL makes 16 to 275 MHz")
    assert_user_error(hwgen("build", "m.npz", "--board", "icebreaker", "--fold", "1x1,1x1", "--target-fps", "10",
                            "--no-pnr", cwd=tmp_path), "--target-fps picks the folds itself")
    board = hwgen("build", "m.npz", "--board", "icebreaker", "--clock", "board", "--fold", "auto", "--seed", "7",
                  "--no-pnr", "-o", "plain", cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    report = json.loads((tmp_path / "plain" / "hwgen_report.json").read_text())
    assert (report["network_clock_source"], report["nextpnr_seed"]) == ("board", 7)
    assert " --seed 7 " in (tmp_path / "plain" / "build_top.sh").read_text()
    assert " --seed " not in (tmp_path / "out" / "build_top.sh").read_text()
    assert_user_error(hwgen("build", "m.npz", "--board", "icebreaker", "--seed", "3", "--seeds", "2", "--no-pnr",
                            cwd=tmp_path), "--seed and --seeds: give one seed, or a number of seeds to try, not both")


def test_uart_divisor_checks_rate_error():
    assert uart_divisor(12e6, 115_200) == 104
    assert uart_divisor(25e6, 115_200) == 217
    with pytest.raises(ValueError, match="too fast"):
        uart_divisor(12e6, 4_000_000)
    with pytest.raises(ValueError, match="off at 12 MHz"):
        uart_divisor(12e6, 2_500_000)          # divisor 5 gives 2.4 Mbaud, 4 % slow
    with pytest.raises(ValueError, match="at least 4"):
        UARTReceiver(3)


def test_uart_loopback_bytes_and_frame_time():
    """Transmitter into receiver: every byte arrives, frames are exactly 10 bits of ``divisor`` cycles."""
    divisor, data = 6, [0x00, 0xFF, 0x55, 0xA3, 0x49, 0x3F]

    class Loop(wiring.Component):
        def __init__(self):
            self.tx, self.rx = UARTTransmitter(divisor), UARTReceiver(divisor)
            super().__init__({})

        def elaborate(self, platform):
            m = Module()
            m.submodules.tx, m.submodules.rx = self.tx, self.rx
            m.d.comb += self.rx.rx.eq(self.tx.tx)
            return m

    loop = Loop()
    received, taken = [], []
    sim = Simulator(loop)
    sim.add_clock(1e-6)

    async def bench(ctx):
        cycle = 0
        pending = list(data)
        while len(received) < len(data) and cycle < 2000:
            ctx.set(loop.tx.i.valid, bool(pending))
            ctx.set(loop.tx.i.payload, pending[0] if pending else 0)
            ctx.set(loop.rx.o.ready, 1)
            ready, valid, payload = ctx.get(loop.tx.i.ready), ctx.get(loop.rx.o.valid), ctx.get(loop.rx.o.payload)
            if pending and ready:
                taken.append(cycle)
                pending.pop(0)
            if valid:
                received.append(payload)
            await ctx.tick()
            cycle += 1

    sim.add_testbench(bench)
    sim.run()
    assert received == data
    assert set(np.diff(taken)) == {UARTTransmitter(divisor).cycles_per_byte} == {10 * divisor}
    assert not any(np.diff(taken) - 10 * divisor)


@pytest.fixture(scope="module")
def digits_board(tmp_path_factory):
    model = random_model(np.random.default_rng(7), [64, 32, 16, 10])     # 5 distinct classes on these images
    simulator = BoardSimulator(model, default_folds(model), tmp_path_factory.mktemp("board"), divisor=8, led_count=2)
    return model, simulator


def test_board_top_on_real_images_equals_golden(digits_board):
    """20 real test images as bytes on the UART line; class bytes, LEDs and timing exact."""
    model, simulator = digits_board
    images = load_dataset("digits").test_x[:24]
    run = simulator.classify(images)
    expected = golden.run(model, images).classes
    assert run.identity == identity(model)
    assert run.classes == expected.tolist()
    assert len(set(run.classes)) >= 4
    assert run.leds == [c & 3 for c in run.classes]
    assert not run.overrun
    # Commands arrive back to back, so replies leave exactly one image's line time apart.
    assert set(np.diff(run.class_cycles).tolist()) == {simulator.top.input_cycles_per_image} == {(1 + 64) * 10 * 8}


def test_board_top_with_the_network_on_its_own_clock(digits_board, tmp_path):
    """The network on a clock of its own (3.7 ns against the UART's 10 ns, as on a PLL), across
    the AsyncFIFOs: real images in, classes equal to golden. The crossing adds a few cycles of
    latency whose phase varies per image, so replies leave within two cycles of one line time apart."""
    model, _ = digits_board
    simulator = BoardSimulator(model, default_folds(model), tmp_path, divisor=8, led_count=2, network_period_ps=3700)
    images = load_dataset("digits").test_x[24:44]
    run = simulator.classify(images)
    assert run.identity == identity(model)
    assert run.classes == golden.run(model, images).classes.tolist()
    assert run.leds == [c & 3 for c in run.classes] and not run.overrun
    line = simulator.top.input_cycles_per_image
    assert all(abs(interval - line) <= 2 for interval in np.diff(run.class_cycles).tolist())


def test_board_top_of_a_cnn_that_takes_one_pixel_per_beat(tmp_path):
    """A one-channel convolution takes one pixel per beat, so the board top's packer passes
    pixels straight through (its handshake must not loop back on itself); on its own clock."""
    from helpers import random_cnn

    spec = dict(kernel=3, stride=1, padding=1, weights="binary", output="threshold", pool=2)
    model = random_cnn(np.random.default_rng(21), (8, 8, 1), [dict(spec, channels=4)], 10)
    simulator = BoardSimulator(model, default_folds(model), tmp_path, divisor=8, led_count=2, network_period_ps=6100)
    assert simulator.top.network.input_elements_per_beat == 1
    images = np.random.default_rng(22).integers(0, 256, (6, 64)).astype(np.uint8)
    run = simulator.classify(images)
    assert run.classes == golden.run(model, images).classes.tolist() and not run.overrun


def test_host_runs_against_the_simulated_board(digits_board):
    """`hwgen run`'s BoardLink over pyserial's socket:// URL to the board top in Verilator."""
    model, simulator = digits_board
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    thread = simulator.serve(port, max_images=6)
    images = load_dataset("digits").test_x[100:106]
    for _ in range(200):
        try:
            link = BoardLink(f"socket://127.0.0.1:{port}", 115_200, timeout=60)
            break
        except UserError:
            thread.join(0.1)
    with link:
        info = link.identify(model)
        result = link.classify(images, model)
    thread.join(120)
    assert info == {"digest": model.digest()[:4], "in_features": 64, "classes": 10, "weights": 0,
                    "weights_state": "ready"}
    assert result.classes.tolist() == golden.run(model, images).classes.tolist()
    assert thread.results is not None and not thread.results["overrun"]


def test_identity_parsing_rejects_other_devices():
    model = random_model(np.random.default_rng(0), [16, 8, 4])
    assert len(identity(model)) == IDENTITY_BYTES
    assert parse_identity(identity(model))["in_features"] == 16
    with pytest.raises(UserError, match="did not identify as hwgen"):
        parse_identity(b"Hello, world")


def test_bram_blocks_pick_the_cheapest_shape():
    ice40 = load_board("icebreaker").budget
    assert bram_blocks_for(MemoryShape("w", 784, 256, True), ice40) == 64      # 16 wide x 4 deep of 256x16
    assert bram_blocks_for(MemoryShape("w", 100352, 1, True), ice40) == 49     # 2048x2, depth-bound
    ecp5 = load_board("ulx3s-85f").budget
    assert bram_blocks_for(MemoryShape("w", 784, 256, True), ecp5) == 15       # 1024x18, 15 wide


def test_memories_go_where_yosys_memory_libmap_puts_them():
    """Logic unless a library memory is strictly cheaper (libmap costs: RAM bit 1, ROM bit 1/16,
    SB_RAM40_4K 64, DP16KD 128, TRELLIS_DPR16X4 4)."""
    ice40, ecp5 = load_board("icebreaker").budget, load_board("ulx3s-85f").budget
    assert memory_placement(MemoryShape("buffer", 4, 256, False), ice40, FAMILY_COSTS["ice40"]) == "logic"   # 1024 = 16 x 64
    assert memory_placement(MemoryShape("buffer", 8, 128, False), ice40, FAMILY_COSTS["ice40"]) == "block"   # 512 < 1024
    assert memory_placement(MemoryShape("w", 32, 256, True), ice40, FAMILY_COSTS["ice40"]) == "logic"        # 512 < 1024
    assert memory_placement(MemoryShape("w", 784, 256, True), ice40, FAMILY_COSTS["ice40"]) == "block"
    assert memory_placement(MemoryShape("buffer", 16, 32, False), ecp5, FAMILY_COSTS["ecp5"]) == "distributed"
    assert memory_placement(MemoryShape("w", 16, 32, True), ecp5, FAMILY_COSTS["ecp5"]) == "logic"   # LUT RAM takes no ROMs


def test_pll_settings_and_clock_errors():
    assert ice40_pll_settings(12e6, 30e6) == (0, 79, 5, 1, 30e6)          # icepll -i 12 -o 30
    assert ice40_pll_settings(12e6, 48e6) == (0, 63, 4, 1, 48e6)
    assert ecp5_pll_settings(25e6, 60e6) == (5, 12, 7, 60e6)                # VCO 420 MHz
    assert ecp5_pll_settings(25e6, 48e6).output_hz == 46.875e6              # the closest it makes
    icebreaker = load_board("icebreaker")
    assert network_clock_hz(icebreaker, None) == 30e6 and network_clock_hz(icebreaker, 48) == 48e6
    with pytest.raises(UserError, match=r"^--clock 500 MHz: the iCE40 PLL makes 16 to 275 MHz from the 12 MHz board clock$"):
        network_clock_hz(icebreaker, 500)
    assert network_clock_hz(load_board("arty-a7-35t"), None) is None        # no network_hz: the board clock
    with pytest.raises(UserError, match=r"^--clock: hwgen has no PLL for xc7 boards"):
        network_clock_hz(load_board("arty-a7-35t"), 50)


def test_target_fps_picks_the_cheapest_folding_that_reaches_it():
    model = random_model(np.random.default_rng(4), [64, 32, 10])
    board = load_board("icebreaker")
    fastest = auto_folds(model, board)
    est = auto_folds(model, board, target_fps=200_000)          # 60 cycles per image at 12 MHz
    assert [str(fold) for fold in est.folds] == ["4x16", "1x8"]  # 40 cycles; 2x16 (64) would miss it
    assert est.cycles_per_image == 40 and est.total.luts < fastest.total.luts
    with pytest.raises(UserError, match=r"^1e\+06 images/s on icebreaker needs an interval of 12 cycles at 12 MHz, "
                                        r"and no folding that fast fits: LUTs: estimated .*The fastest that fits "
                                        r"\(8x16,5x4\) makes 750,000 images/s$"):
        auto_folds(model, board, target_fps=1e6)
    with pytest.raises(UserError, match=r"takes at least 11 cycles per image even fully unfolded, at most 1,090,909 images/s$"):
        auto_folds(model, board, target_fps=2e7)


@pytest.mark.parametrize("convolutional", [True, False])
def test_ecp5_placer_timing_weight_only_for_cnns(tmp_path, convolutional):
    """nextpnr-ecp5 places convolutional networks with a higher timing weight (the reference CNN:
    97.5 -> 110.8 MHz) and MLPs at its default (the mixed MLP: 79.7 MHz at the default, 65.8 with
    it; the W1A1 MLP did not route with it)."""
    from hwgen.synth import ECP5_PLACER_OPTIONS

    rng = np.random.default_rng(6)
    if convolutional:
        model = random_cnn(rng, (6, 6, 1), [dict(channels=4, kernel=3, stride=1, padding=1, weights="binary",
                                                 output="threshold", pool=2)], 10)
    else:
        model = random_model(rng, [32, 16, 10])
    build_board(model, "m", load_board("ulx3s-85f"), default_folds(model), tmp_path / "out", run_tools=False)
    script = (tmp_path / "out" / "build_top.sh").read_text()
    assert "--router router2" in script
    assert (ECP5_PLACER_OPTIONS in script) == convolutional


def test_auto_fold_bounds_the_input_broadcast_on_ecp5():
    """A byte layer fanned out to many lanes does not route on the ULX3S however few LUTs it takes
    (784-256-256-10 at 32x98: 25,088 input wires to lanes, 39k LUT4, router2 still overused
    after 42 minutes): `--fold auto` keeps PE x SIMD x input bits within the family's bound."""
    model = random_model(np.random.default_rng(0), [784, 256, 256, 10])
    bound = FAMILY_COSTS["ecp5"].max_broadcast_sinks
    assert 16 * 98 * 8 <= bound < 32 * 98 * 8
    est = auto_folds(model, load_board("ulx3s-85f"))
    assert [str(fold) for fold in est.folds] == ["16x98", "4x128", "5x4"] and est.cycles_per_image == 128
    assert FAMILY_COSTS["ice40"].max_broadcast_sinks is None


def test_auto_fold_pads_a_simd_where_no_divisor_balances():
    """The mixed reference MLP (int8 first layer, binary hidden layer, int8 scores) on the ULX3S:
    its first layer sets the interval, 1,568 cycles at 8x16 (no PE x SIMD between 128 and 196
    divides 784 x 256, and 196 multipliers pass the DSP budget). At dividing folds the hidden
    layer takes 64 lanes for 1,024 cycles; 48 inputs per beat, the last of its six beats padded
    by 32 zeros, take 48 lanes for 1,536, and the network goes from 88 % to 96 % of its ideal II.
    Where the padded fold's deeper weight memory does not fit (the W1A1 MLP on the iCEBreaker,
    whose block RAM is full), the dividing folds are kept."""
    rng = np.random.default_rng(8)
    model = random_model(rng, [784, 256, 256, 10],
                         kinds=[("int8", "threshold"), ("binary", "threshold"), ("int8", "scores")])
    est = auto_folds(model, load_board("ulx3s-85f"))
    assert [str(fold) for fold in est.folds] == ["8x16", "1x48", "1x2"] and est.cycles_per_image == 1568
    lanes = sum(fold.pe * fold.simd for fold in est.folds)
    assert (784 * 256 + 256 * 256 + 256 * 10) / lanes / est.cycles_per_image > 0.96
    binary = random_model(rng, [784, 256, 256, 10])
    est = auto_folds(binary, load_board("icebreaker"))
    assert [str(fold) for fold in est.folds] == ["4x16", "4x8", "1x1"] and est.cycles_per_image == 3136


def test_too_big_for_icebreaker_then_auto_fold_fits(tmp_path):
    model = random_model(np.random.default_rng(2), [64, 128, 128, 10])
    board = load_board("icebreaker")
    with pytest.raises(UserError) as error:
        check_fit(estimate(model, default_folds(model), board))
    message = str(error.value)
    assert "does not fit icebreaker" in message and "LUTs: estimated" in message and "layer 'dense0'" in message
    assert "--fold auto" in message
    est = auto_folds(model, board)
    assert not est.over_budget(0.75)
    # No cheaper-per-image folding exists under the same budget: each faster one is over it.
    assert est.cycles_per_image < estimate(model, [Fold(1, 1)] * 3, board).cycles_per_image


def test_multiplies_past_the_dsp_budget_do_not_fit_ice40_or_ecp5():
    """yosys puts every multiply in a DSP block (tests/test_synth.py), so more products than the
    device has DSPs cannot place; the estimate says so and `--fold auto` stays within them."""
    model = random_model(np.random.default_rng(5), [64, 32, 10], kinds=[("int8", "threshold"), ("binary", "scores")])
    board = load_board("icebreaker")
    with pytest.raises(UserError, match=r"DSP multipliers: estimated 16 of 8 on icebreaker; layer 'dense0' alone needs 16"):
        check_fit(estimate(model, [Fold(4, 4), Fold(1, 32)], board))
    assert auto_folds(model, board).total.dsps <= 8 * 0.75
    assert estimate(model, [Fold(16, 16), Fold(1, 32)], load_board("arty-a7-35t")).total.dsps == 90   # Vivado spills


def test_no_folding_fits_names_what_no_folding_can_fix():
    """Two requantizers (4 DSPs each) and three 1x1 multipliers need 11 of the UP5K's 8 DSPs at
    any folding: the error says so, rather than listing the problems of some balanced folding."""
    model = random_model(np.random.default_rng(3), [32, 16, 16, 10],
                         kinds=[("int8", "requant"), ("int8", "requant"), ("int8", "scores")])
    with pytest.raises(UserError) as error:
        auto_folds(model, load_board("icebreaker"))
    assert str(error.value) == (
        "no folding fits icebreaker: these exceed it even at the folding that needs least of each: "
        "DSP multipliers: estimated 11 of 8 on icebreaker; layer 'dense0' alone needs 5. "
        "Use a larger board or a smaller network")


def test_icebreaker_build_places_routes_and_reports(tmp_path):
    """A real yosys + nextpnr-ice40 build with two placer seeds: bitstream, report with
    used/available and the Fmax of each seed, the best kept and named in the build script."""
    model = random_model(np.random.default_rng(4), [64, 32, 10])
    board = load_board("icebreaker")
    est = auto_folds(model, board)
    result = build_board(model, "random", board, est.folds, tmp_path / "ice", est=est, seeds=[1, 2])
    folder = result.folder
    tried = result.report["nextpnr_seeds_fmax_mhz"]
    assert sorted(tried) == ["1", "2"] and result.report["fmax_mhz"] == max(tried.values())
    best = result.report["nextpnr_seed"]
    assert tried[str(best)] == max(tried.values())
    assert f"--asc top.asc --seed {best}\n" in (folder / "build_top.sh").read_text()
    assert f"--asc top.asc --seed {best} || exit /b\n" in (folder / "build_top.bat").read_text()
    assert not (folder / "seeds").exists()
    assert (folder / "top.bin").stat().st_size > 100_000
    assert "set_io" in (folder / "top.pcf").read_text()
    report = json.loads((folder / "hwgen_report.json").read_text())
    assert report["placed"]["luts"]["available"] == 5280 and 0 < report["placed"]["luts"]["used"] < 5280
    assert report["placed"]["bram_blocks"]["available"] == 30
    # The estimate tracks the placement (bench/fit.py measures more shapes): LUTs within 15 %, block RAMs exactly.
    assert abs(est.total.luts / report["placed"]["luts"]["used"] - 1) <= 0.15
    assert est.total.bram_blocks == report["placed"]["bram_blocks"]["used"]
    assert report["fmax_mhz"] > 12
    assert report["network_clock_mhz"] == 30 and report["network_clock_source"] == "PLL"        # the board default
    assert report["meets_network_clock"] == (report["fmax_mhz"] >= 30)
    assert report["images_per_s_at_network_clock"] == 30e6 / report["cycles_per_image"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())     # no staging folder left


def test_asic_synthesis_reports_area_and_memories(tmp_path):
    model = random_model(np.random.default_rng(6), [32, 16, 10])
    result = build_asic(model, "random", default_folds(model), tmp_path / "asic")
    report = result.report
    assert report["area_nand2"] > 100
    assert report["memory_cells"] == len(report["memories"]) > 0
    assert report["memory_bits"] == sum(m["depth"] * m["width"] for m in report["memories"])
    assert (result.folder / "hwgen_network.v").is_file()
