"""Weights in iCE40UP SPRAM: placement, the weight image, the flash loader, the board top, a build."""
from __future__ import annotations

import json

import numpy as np
import pytest
from amaranth.sim import Simulator

from hwgen import golden
from hwgen.boards import load_board
from hwgen.build import WEIGHT_IMAGE_FILE, build_board
from hwgen.errors import UserError
from hwgen.fit import auto_folds, estimate, fit_folds, weight_placements
from hwgen.flash import FLASH_OFFSET, crc32_bzip2, weight_image
from hwgen.protocol import (WEIGHTS_CORRUPT, WEIGHTS_MISSING, WEIGHTS_OTHER_MODEL, WEIGHTS_READY, identity,
                            parse_identity)
from hwgen.rtl.dense import spram_load_words, weight_words
from hwgen.rtl.loader import READ_DATA, RELEASE_POWER_DOWN, SPIFlashLoader
from hwgen.rtl.network import Fold, NetworkTop
from hwgen.rtl.spram import SPRAMWeights
from helpers import random_images, random_model
from sim.board import BoardSimulator


def test_crc_is_crc32_bzip2():
    assert crc32_bzip2(b"123456789") == 0xFC891918          # the catalogue's check value
    assert crc32_bzip2(b"") == 0


def test_reference_mlp_fits_the_icebreaker_with_its_first_layer_in_spram():
    model = random_model(np.random.default_rng(3), [784, 256, 256, 10])
    board = load_board("icebreaker")
    assert weight_placements(model, board) == [["rom"] * 3, ["spram", "rom", "rom"], ["spram", "spram", "rom"],
                                               ["spram", "spram", "spram"]]
    with pytest.raises(UserError, match="no folding fits icebreaker.*block RAMs"):
        auto_folds(model, board, weight_memories=["rom"] * 3)
    est = auto_folds(model, board)
    assert est.weight_memories == ["spram", "rom", "rom"]
    # SPRAM reads 16 bits per block per cycle: the first layer's 4 blocks give it 64 weights per
    # cycle, so it takes 784 * 256 / 64 cycles per image, and the other layers need be no faster.
    assert [str(fold) for fold in est.folds] == ["4x16", "4x8", "1x1"]
    assert est.cycles_per_image == 784 * 256 // 64 and est.total.spram_blocks == 4
    assert not est.over_budget(0.75)
    # Explicit folds get the same placement; 8x16 would need 8 blocks.
    assert fit_folds(model, est.folds, board).weight_memories == ["spram", "rom", "rom"]
    assert estimate(model, [Fold(8, 16), Fold(4, 8), Fold(1, 1)], board, est.weight_memories).over_budget() == [
        "SPRAM blocks: estimated 8 of 4 on icebreaker; layer 'dense0' alone needs 8"]
    with pytest.raises(UserError, match="^ulx3s-85f has no SPRAM for weights"):
        estimate(model, est.folds, load_board("ulx3s-85f"), est.weight_memories)


def test_load_words_split_rows_into_16_bit_columns():
    model = random_model(np.random.default_rng(1), [40, 24, 10])
    layer = model.layers[0]
    rows = weight_words(layer, 4, 5)                       # 20-bit rows: two columns each
    words = spram_load_words(layer, 4, 5)
    assert words == [piece for row in rows for piece in (row & 0xFFFF, row >> 16)]
    top = NetworkTop(model, [Fold(4, 5), Fold(2, 4)], weight_memories=["spram", "rom"])
    image = weight_image(model, top)
    assert image.header == b"HWGW" + model.digest()[:4]
    assert np.frombuffer(image.payload, "<u2").tolist() == words and top.load_words == len(words)
    assert SPRAMWeights(20, 48).blocks == 2 and SPRAMWeights(16, 16385).blocks == 2


def run_loader(image: bytes, *, header: bytes, payload_bytes: int, expected_crc: int, offset: int = 0x1234,
               wake: bool = True):
    """The loader against a flash model in Amaranth's simulator: (done cycle, status, words, commands)."""
    dut = SPIFlashLoader(header=header, payload_bytes=payload_bytes, expected_crc=expected_crc, offset=offset,
                         wake_cycles=5)
    result = {"words": [], "commands": []}

    async def flash(ctx):
        powered_down, selected, clock, shift, count, data, address = True, 0, 0, 0, 0, None, 0
        cycle = 0
        while True:
            await ctx.tick()
            cycle += 1
            cs, sck, copi = ctx.get(dut.spi_cs), ctx.get(dut.spi_clk), ctx.get(dut.spi_copi)
            if not cs:
                selected, count, data = 0, 0, None
                ctx.set(dut.spi_cipo, 1)
            elif sck and not clock:                        # rising edge: take a bit
                shift, count = (shift << 1) | copi, count + 1
                if count == 8 and data is None:
                    result["commands"].append(shift & 0xFF)
                    powered_down &= (shift & 0xFF) != RELEASE_POWER_DOWN
                if count == 32 and (shift >> 24) & 0xFF == READ_DATA and not powered_down:
                    address, data = shift & 0xFFFFFF, []
            elif clock and not sck and data is not None:   # falling edge: present the next bit
                bit = len(data)
                index = address - offset + bit // 8
                value = image[index] if 0 <= index < len(image) else 0xFF
                ctx.set(dut.spi_cipo, (value >> (7 - bit % 8)) & 1)
                data.append(bit)
            clock = sck
            if ctx.get(dut.o_valid):
                result["words"].append(ctx.get(dut.o_data))
            if ctx.get(dut.done) and "done" not in result:
                result["done"], result["status"] = cycle, ctx.get(dut.status)
                return

    simulator = Simulator(dut)
    simulator.add_clock(1e-6)
    simulator.add_testbench(flash)
    simulator.run_until(1e-6 * 5000)
    return dut, result


def test_loader_reads_checks_and_meets_its_cycle_formula():
    payload = bytes([1, 2, 3, 4, 0xFE, 0xFF])
    header = b"HWGW\x01\x02\x03\x04"
    settings = dict(header=header, payload_bytes=len(payload), expected_crc=crc32_bzip2(payload))
    dut, good = run_loader(header + payload, **settings)
    assert good["status"] == WEIGHTS_READY and good["done"] == dut.load_cycles
    assert good["commands"] == [RELEASE_POWER_DOWN, READ_DATA]
    assert good["words"] == [0x0201, 0x0403, 0xFFFE]
    _, erased = run_loader(b"", **settings)
    assert erased["status"] == WEIGHTS_MISSING and erased["words"] == []
    _, other = run_loader(header[:4] + b"\x01\x02\x03\x05" + payload, **settings)
    assert other["status"] == WEIGHTS_OTHER_MODEL and other["words"] == []
    corrupt = bytearray(header + payload)
    corrupt[-2] ^= 0x10
    _, bad = run_loader(bytes(corrupt), **settings)
    assert bad["status"] == WEIGHTS_CORRUPT and bad["done"] == dut.load_cycles
    with pytest.raises(ValueError, match=r"^payload_bytes must be even \(16-bit words\), not 3$"):
        SPIFlashLoader(header=header, payload_bytes=3, expected_crc=0, offset=0, wake_cycles=1)
    with pytest.raises(ValueError, match=r"^offset must be a 24-bit flash address, not 16777216$"):
        SPIFlashLoader(header=header, payload_bytes=2, expected_crc=0, offset=1 << 24, wake_cycles=1)


@pytest.fixture(scope="module")
def spram_board(tmp_path_factory):
    model = random_model(np.random.default_rng(7), [48, 24, 10])
    folds = [Fold(4, 8), Fold(2, 4)]
    simulator = BoardSimulator(model, folds, tmp_path_factory.mktemp("spram_board"), led_count=2,
                               network_period_ps=7_000, weight_memories=["spram", "rom"])
    return model, simulator


def test_board_top_loads_weights_from_flash_then_classifies(spram_board):
    """Power-up, the flash read into SPRAM (the primitive's yosys model) on the PLL clock, then
    images over the UART on the board clock: every class equals golden."""
    model, simulator = spram_board
    images = random_images(np.random.default_rng(8), 12, 48)
    run = simulator.classify(images)
    assert run.weights == WEIGHTS_READY and run.flash["commands"] == [RELEASE_POWER_DOWN, READ_DATA]
    assert run.flash["bytes_read"] == len(simulator.image.data)
    assert run.identity == identity(model)
    assert run.classes == golden.run(model, images).classes.tolist()
    assert run.leds == [c & 3 for c in run.classes] and not run.overrun


@pytest.mark.parametrize("damage, state", [("payload", WEIGHTS_CORRUPT), ("erased", WEIGHTS_MISSING),
                                           ("digest", WEIGHTS_OTHER_MODEL)])
def test_board_top_refuses_images_without_good_weights(spram_board, damage, state):
    model, simulator = spram_board
    image = bytearray(simulator.image.data)
    if damage == "payload":
        image[-1] ^= 0x01
    elif damage == "digest":
        image[5] ^= 0xFF
    flash = b"" if damage == "erased" else bytes(image)
    images = random_images(np.random.default_rng(9), 2, 48)
    run = simulator.classify(images, flash=flash, replies=13)
    assert run.weights == state
    assert parse_identity(run.identity)["weights"] == state and run.identity == identity(model, state)
    assert run.classes == []                              # the images were taken and dropped, unanswered


def test_icebreaker_build_with_spram_places_what_the_estimate_says(tmp_path):
    """yosys + nextpnr-ice40: the SPRAM blocks placed equal the estimate's; the build folder holds the
    weight image and the report says how to write it and how long it takes to load."""
    model = random_model(np.random.default_rng(11), [64, 32, 10])
    board = load_board("icebreaker")
    est = fit_folds(model, [Fold(4, 8), Fold(1, 4)], board, ["spram", "rom"])
    result = build_board(model, "m.npz", board, est.folds, tmp_path / "out", est=est)
    report = result.report
    assert report["placed"]["spram_blocks"]["used"] == est.total.spram_blocks == 2
    assert report["weight_memories"] == {"dense0": "spram", "dense1": "rom"}
    image = (result.folder / WEIGHT_IMAGE_FILE).read_bytes()
    top = NetworkTop(model, est.folds, weight_memories=est.weight_memories)
    assert image == weight_image(model, top).data
    assert report["weight_image"]["program"] == ["iceprog top.bin", f"iceprog -o {FLASH_OFFSET // 1024}k weights.bin"]
    assert report["weight_image"]["load_ms_at_network_clock"] > 0
    assert json.loads((result.folder / "hwgen_report.json").read_text()) == report
    assert "iceprog -o 1024k weights.bin" in (result.folder / "REPORT.md").read_text()
