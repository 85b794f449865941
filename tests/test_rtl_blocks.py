"""Each hardware block against its cycle formula and a plain model, in Amaranth's simulator."""
from __future__ import annotations

import re

import numpy as np
from amaranth.back import verilog as amaranth_verilog
import pytest

from hwgen import golden
from hwgen.ir import DenseLayer, Requant, element_bits
from hwgen.rtl import arith
from hwgen.rtl.dense import FoldedDense
from hwgen.rtl.multithreshold import MultiThreshold
from hwgen.rtl.requant import Requantizer
from hwgen.rtl.resize import PixelPacker, StreamResizer
from hwgen.rtl.scores import ScoreSerializer
from helpers import random_images, random_layer, random_model
from streams import run_streams


def pack(elements, width):
    return sum(int(e) << (k * width) for k, e in enumerate(elements))


def unpack(word, width, count, signed=False):
    values = [(word >> (k * width)) & ((1 << width) - 1) for k in range(count)]
    return [v - (1 << width) if signed and v >> (width - 1) else v for v in values]


def layer_beats(layer, simd, images):
    return [pack(image[k:k + simd], layer.input_bits) for image in images for k in range(0, layer.in_features, simd)]


def layer_inputs(rng, layer, count):
    if layer.input_kind == "bits":
        return rng.integers(0, 2, (count, layer.in_features)).astype(np.uint8)
    if layer.input_bits < 8:
        images = rng.integers(0, 1 << layer.input_bits, (count, layer.in_features)).astype(np.uint8)
        images[0], images[-1] = 0, (1 << layer.input_bits) - 1     # both ends of the input range
        return images
    images = random_images(rng, count, layer.in_features)
    return images.view(np.int8) if layer.input_kind == "int8" else images


@pytest.mark.parametrize("weight_kind, input_kind, output_kind, n_in, n_out, pe, simd", [
    ("binary", "bits", "threshold", 12, 6, 2, 3),
    ("binary", "bits", "scores", 8, 4, 4, 8),
    ("binary", "uint8", "threshold", 10, 4, 1, 5),
    ("binary", "uint8", "scores", 6, 3, 3, 1),
    ("binary", "bits", "threshold", 5, 1, 1, 1),
    ("int8", "uint8", "scores", 12, 4, 2, 3),
    ("int8", "int8", "threshold", 9, 6, 3, 9),
    ("int8", "bits", "scores", 10, 5, 5, 2),
    ("int8", "uint8", "requant", 8, 4, 4, 4),
    ("binary", "uint2", "scores", 12, 4, 2, 6),
    ("binary", "uint3", "multithreshold", 10, 4, 4, 5),
    ("binary", "uint8", "threshold", 10, 6, 6, 5),         # two copies of the pair sums, 4 and 2 lanes
    ("binary", "uint2", "scores", 8, 9, 9, 4),             # three copies
    ("binary", "uint4", "threshold", 9, 3, 1, 3),
    ("ternary", "uint2", "scores", 12, 6, 3, 4),
    ("ternary", "uint8", "multithreshold", 8, 4, 2, 8),
    ("int2", "uint2", "scores", 7, 2, 2, 7),
    ("int2", "uint4", "threshold", 16, 4, 4, 16),
])
def test_folded_dense_outputs_and_cycle_formulas(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd):
    check_folded_dense(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd)


@pytest.mark.parametrize("weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, tree_levels, stages", [
    ("binary", "uint8", "scores", 32, 4, 2, 16, 1, 3),      # 8 pair terms: 3 levels, one register each
    ("binary", "uint8", "threshold", 42, 4, 4, 21, 2, 2),   # 11 terms (one odd): 4 levels
    ("binary", "int8", "scores", 18, 2, 2, 9, 3, 1),
    ("binary", "bits", "threshold", 64, 4, 2, 64, 2, 3),
    ("int8", "uint8", "scores", 18, 4, 2, 9, 2, 2),
    ("int8", "bits", "threshold", 20, 2, 1, 20, 3, 2),
])
def test_folded_dense_pipelined_trees(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, tree_levels,
                                      stages):
    dut = check_folded_dense(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, tree_levels)
    assert dut.tree_stages == stages


@pytest.mark.parametrize("weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, banks", [
    ("binary", "bits", "threshold", 60, 12, 2, 3, 8),      # 120 words of 6 bits: banks of 16, the last padded
    ("binary", "uint8", "scores", 20, 28, 7, 1, 5),        # 80 words of 7 bits
    ("int8", "uint8", "scores", 34, 8, 2, 2, 9),           # 68 words of 32 bits: banks of 8
    ("int8", "bits", "threshold", 30, 3, 1, 1, 6),         # 90 words of 8 bits
    ("binary", "uint8", "scores", 12, 12, 3, 1, 3),        # 48 words in LUTs: tables of 16
    ("int8", "int8", "threshold", 20, 6, 3, 2, 2),         # 20 words in LUTs: tables of 16 and 4
])
def test_folded_dense_banked_weights(monkeypatch, weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, banks):
    """A weight ROM split into banks, each with output registers: outputs and formulas exact, one
    pipeline stage more than unbanked for LUT tables, two for block RAMs."""
    monkeypatch.setattr(arith, "ROM_BANK_SHAPES", ((8, 16), (32, 8)))
    dut = check_folded_dense(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, banked_weights=True)
    assert dut.weight_banks == banks
    unbanked = FoldedDense(dut.layer, pe=pe, simd=simd)
    assert dut.pipeline_stages == unbanked.pipeline_stages + (1 if arith.rom_in_luts(dut.weight_depth) else 2)
    depth = dut.weight_depth
    bank_depths = [depth] if arith.rom_in_luts(depth) else [arith.rom_bank_depth(depth, dut.weight_width)] * banks
    assert [shape.depth for shape in dut.memories if shape.name.startswith("weights")] == bank_depths


@pytest.mark.parametrize("shapes, single_bank_blocks, banks, slices",
                         [(((8, 16), (32, 8)), 11, 9, 2), (((32, 128),), 11, 1, 1), (((32, 128),), 1, 1, 2)])
def test_folded_dense_bank_memories_side_by_side(monkeypatch, shapes, single_bank_blocks, banks, slices):
    """A bank wider than ROM_SLICE_BLOCKS blocks (ROM_SINGLE_BANK_SLICE_BLOCKS for a ROM of one
    bank) is several memories, each reading its own copy of the address: exact, and as many
    address copies as memories."""
    monkeypatch.setattr(arith, "ROM_BANK_SHAPES", shapes)
    monkeypatch.setattr(arith, "ROM_SLICE_BLOCKS", 1)
    monkeypatch.setattr(arith, "ROM_SINGLE_BANK_SLICE_BLOCKS", single_bank_blocks)
    dut = check_folded_dense("binary", "bits", "threshold", 72, 40, 5, 8, banked_weights=True)
    assert (dut.weight_depth, dut.weight_width, dut.weight_banks) == (72, 40, banks)     # 40 bits: 32 + 8
    assert arith.rom_bank_slices(dut.weight_depth, dut.weight_width) == slices
    text = amaranth_verilog.convert(dut, name="dense", emit_src=False)
    assert len(set(re.findall(r"weight_addr_copy(\d+)", text))) == slices * banks


@pytest.mark.parametrize("depth, width, slice_blocks, slices", [
    (128, 1568, 11, 4),      # the W1A1 MLP's first layer at 16x98: one bank of 44 blocks
    (128, 512, 8, 2),        # its second layer at 4x128: 15 blocks as 8 + 7
    (2048, 784, 11, 8),      # the int8 MLP's first layer at 1x98: one bank of 88 blocks of 2048 x 9
    (1568, 1024, 11, 11),    # the mixed MLP's at 8x16: one bank of 114 blocks, 10 x 11 + 4
])
def test_rom_slices_of_the_reference_layers(depth, width, slice_blocks, slices):
    assert (arith.rom_slice_blocks(depth, width), arith.rom_bank_slices(depth, width)) == (slice_blocks, slices)


def test_rom_slices_take_no_block_more_than_one_memory():
    """Memories are whole blocks wide (the last one what is left), so a sliced bank takes as many
    blocks as the fit estimate counts for the unsliced ROM."""
    for depth in (100, 512, 1500, 4096):
        for width in range(2, 2000, 7):
            block = arith.rom_block_width(depth, width)
            slice_bits = arith.rom_slice_blocks(depth, width) * block
            pieces = [min(slice_bits, width - low) for low in range(0, width, slice_bits)]
            assert len(pieces) == arith.rom_bank_slices(depth, width)
            assert sum(-(-piece // block) for piece in pieces) == -(-width // block), (depth, width)


def test_folded_dense_single_bank_block_ram_weights(monkeypatch):
    """A block-RAM weight ROM of one bank takes the banks' two output registers too."""
    monkeypatch.setattr(arith, "ROM_BANK_SHAPES", ((8, 128),))
    dut = check_folded_dense("int8", "bits", "threshold", 30, 3, 1, 1, banked_weights=True)
    assert (dut.weight_depth, dut.weight_banks, dut.weight_bank_stages) == (90, 1, 2)
    assert dut.pipeline_stages == FoldedDense(dut.layer, pe=1, simd=1).pipeline_stages + 2
    assert [(shape.name, shape.depth) for shape in dut.memories if shape.name.startswith("weights")] == \
        [("weights", 90)]


@pytest.mark.parametrize("input_kind, n_in, n_out, pe, simd", [("uint8", 30, 6, 3, 5), ("int8", 24, 4, 2, 12)])
def test_folded_dense_carried_products(input_kind, n_in, n_out, pe, simd):
    """Multiplying lanes with a second product register: exact, one pipeline stage more."""
    dut = check_folded_dense("int8", input_kind, "scores", n_in, n_out, pe, simd, carried_products=True)
    assert dut.lane_stages == 2
    assert dut.pipeline_stages == FoldedDense(dut.layer, pe=pe, simd=simd).pipeline_stages + 1


def test_folded_dense_pair_sum_copies():
    """Each group of four pair lanes reads its own registered copy of the shared pair sums."""
    rng = np.random.default_rng(3)
    layer = random_layer(rng, "d", "uint8", "threshold", 10, 12, "binary")
    assert [FoldedDense(layer, pe=pe, simd=5).pair_sum_copies for pe in (1, 4, 6, 12)] == [1, 1, 2, 3]
    text = amaranth_verilog.convert(FoldedDense(layer, pe=12, simd=5), name="dense", emit_src=False)
    # Two pairs and the odd element, each copied three times (the odd one once per copy).
    assert sorted(set(re.findall(r"reg .*?(pair_\w+_copy\d+)\b", text))) == sorted(
        f"{name}_copy{c}" for name in ("pair_sum0", "pair_difference0", "pair_sum1", "pair_difference1",
                                       "pair_odd") for c in range(3))
    assert FoldedDense(random_layer(rng, "d", "bits", "threshold", 10, 12, "binary"), pe=12, simd=5).pair_sum_copies == 0


def test_folded_dense_input_word_copies():
    """Each multiplying lane reads its own registered copy of the input word, at no extra stage."""
    rng = np.random.default_rng(4)
    layer = random_layer(rng, "d", "uint8", "scores", 10, 12, "int8")
    assert [FoldedDense(layer, pe=pe, simd=5).input_word_copies for pe in (1, 4, 12)] == [1, 4, 12]
    assert FoldedDense(layer, pe=4, simd=5).pipeline_stages == FoldedDense(layer, pe=1, simd=5).pipeline_stages
    text = amaranth_verilog.convert(FoldedDense(layer, pe=4, simd=5), name="dense", emit_src=False)
    assert sorted(set(re.findall(r"reg .*?(input_word\w*)\b", text))) == [f"input_word_copy{c}" for c in range(4)]
    binary = random_layer(rng, "d", "bits", "threshold", 10, 12, "binary")
    assert FoldedDense(binary, pe=12, simd=5).input_word_copies == 1


def check_folded_dense(weight_kind, input_kind, output_kind, n_in, n_out, pe, simd, tree_levels=3, *,
                       banked_weights=False, carried_products=False):
    """Outputs equal golden's on random images; latency and II equal their formulas."""
    rng = np.random.default_rng(n_in * 7 + n_out)
    layer = random_layer(rng, "d", input_kind, output_kind, n_in, n_out, weight_kind)
    images = layer_inputs(rng, layer, 4)
    acc = golden.accumulate(layer, images)
    # A multi-threshold layer's FoldedDense emits its accumulators (MultiThreshold counts them).
    want = (acc >= layer.thresholds).astype(np.int64) if output_kind == "threshold" else acc
    dut = FoldedDense(layer, pe=pe, simd=simd, tree_levels=tree_levels, banked_weights=banked_weights,
                      carried_products=carried_products)
    # Integer inputs: a product register (int8 weights; two when carried), or pair sums, their
    # copies beyond four lanes, and pair terms (±1 weights); ternary and int2 products go straight
    # into the trees.
    lane_stages = {"binary": 2 + (pe > 4), "int8": 1 + carried_products}.get(weight_kind, 0)
    assert dut.pipeline_stages == 5 + dut.weight_bank_stages + dut.tree_stages + (input_kind != "bits") * lane_stages
    beats = [pack(image[k:k + simd].astype(np.int64) & 0xFF, layer.input_bits)
             for image in images for k in range(0, n_in, simd)]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, 4 * dut.output_beats)
    got = [v for word in outputs for v in unpack(word, dut.output_element_bits, pe, signed=output_kind != "threshold")]
    assert got == want.reshape(-1).tolist()
    # The first image enters an idle layer: latency formula from its last input to its last output.
    assert out_cycles[dut.output_beats - 1] - in_cycles[dut.input_beats - 1] == dut.latency
    # Inputs arrive faster than the layer computes, so consecutive images finish II cycles apart.
    finish = out_cycles[dut.output_beats - 1::dut.output_beats]
    assert [b - a for a, b in zip(finish, finish[1:])] == [dut.cycles_per_image] * 3
    return dut


@pytest.mark.parametrize("input_kind", ["uint8", "int8"])
@pytest.mark.parametrize("output_kind", ["threshold", "scores"])
def test_byte_lanes_at_their_extremes(input_kind, output_kind):
    """Byte inputs on ±1 weights at both ends: all-+1 and all--1 rows, images of only the least or
    only the greatest byte, thresholds at both clip ends. The lanes sum signed bytes (a uint8 less
    128) in pairs and the accumulators wrap on the way: the results must still be exact."""
    n_in, n_out, pe, simd = 14, 6, 3, 7
    weights = np.random.default_rng(1).integers(0, 2, (n_out, n_in)).astype(np.uint8)
    weights[0], weights[1] = 1, 0
    probe = DenseLayer("d", input_kind, "scores", weights, None, "binary")
    lo, hi = probe.channel_acc_bounds
    thresholds = None
    if output_kind == "threshold":
        thresholds = np.array([lo[0], hi[1] + 1, hi[2], lo[3] + 1, 0, hi[5] + 1], dtype=np.int64)
    layer = DenseLayer("d", input_kind, output_kind, weights, thresholds, "binary")
    least, greatest = (0, 255) if input_kind == "uint8" else (-128, 127)
    images = np.array([[least] * n_in, [greatest] * n_in, [least, greatest] * (n_in // 2),
                       [greatest, least] * (n_in // 2)], dtype=np.int64)
    images = images.astype(np.uint8) if input_kind == "uint8" else images.astype(np.int8)
    acc = golden.accumulate(layer, images)
    # A multi-threshold layer's FoldedDense emits its accumulators (MultiThreshold counts them).
    want = (acc >= layer.thresholds).astype(np.int64) if output_kind == "threshold" else acc
    dut = FoldedDense(layer, pe=pe, simd=simd)
    beats = [pack(image[k:k + simd].astype(np.int64) & 0xFF, 8) for image in images for k in range(0, n_in, simd)]
    outputs, _, _ = run_streams(dut, beats, len(images) * dut.output_beats)
    got = [v for word in outputs for v in unpack(word, dut.output_element_bits, pe, signed=output_kind != "threshold")]
    assert got == want.reshape(-1).tolist()


def test_folded_dense_under_stalls():
    rng = np.random.default_rng(5)
    layer = random_layer(rng, "d", "bits", "threshold", 16, 8)
    images = rng.integers(0, 2, (6, 16)).astype(np.uint8)
    want = (golden.accumulate(layer, images) >= layer.thresholds).astype(np.int64)
    dut = FoldedDense(layer, pe=4, simd=4)
    outputs, _, _ = run_streams(dut, layer_beats(layer, 4, images), 6 * 2, stall_in=0.5, stall_out=0.5, seed=3)
    assert [v for w in outputs for v in unpack(w, 1, 4)] == want.reshape(-1).tolist()


@pytest.mark.parametrize("count", [1, 5, 40])      # 40 slots: three copies of the element
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_pixel_packer_keeps_order_and_its_formulas(count, stall):
    dut = PixelPacker(8, count)
    values = [(37 * k + 11) % 256 for k in range(3 * count)]
    outputs, in_cycles, out_cycles = run_streams(dut, values, 3, stall_in=stall, stall_out=stall, seed=count)
    assert [v for word in outputs for v in unpack(word, 8, count)] == values
    if stall == 0.0:
        assert out_cycles[-1] - in_cycles[-1] == dut.latency
        assert out_cycles[-1] - out_cycles[-2] == dut.cycles_per_word == count + 3
    text = amaranth_verilog.convert(dut, name="packer", emit_src=False)
    # A copy of the element and of its take flag per 16 slots: each slot's enable and data come
    # from registers of its group.
    assert len(set(re.findall(r"element_copy(\d+)", text))) == -(-count // 16)
    assert len(set(re.findall(r"taken_copy(\d+)", text))) == -(-count // 16)


@pytest.mark.parametrize("in_count, out_count", [(2, 6), (6, 2), (4, 4), (1, 8), (8, 1)])
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_resizer_keeps_order_and_rate(in_count, out_count, stall):
    elements = 24
    dut = StreamResizer(3, in_count, out_count, elements)
    values = [(7 * k + 3) % 8 for k in range(2 * elements)]
    beats = [pack(values[k:k + in_count], 3) for k in range(0, len(values), in_count)]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, len(values) // out_count,
                                                 stall_in=stall, stall_out=stall, seed=in_count)
    assert [v for word in outputs for v in unpack(word, 3, out_count)] == values
    if stall == 0.0:
        assert out_cycles[-1] - in_cycles[-1] == dut.latency
        assert out_cycles[-1] - out_cycles[len(outputs) // 2 - 1] == dut.cycles_per_image


@pytest.mark.parametrize("in_count, out_count, elements", [(2, 6, 10), (1, 4, 5), (8, 24, 256)])
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_resizer_pads_an_images_last_word(in_count, out_count, elements, stall):
    """Gathering into beats that do not divide an image: each image's last beat carries what is
    left and zeros (the padding a SIMD that does not divide a layer's inputs needs)."""
    images = 3
    dut = StreamResizer(3, in_count, out_count, elements)
    assert dut.padding == -elements % out_count and dut.out_beats == -(-elements // out_count)
    values = [(5 * k + 1) % 8 or 7 for k in range(images * elements)]        # no zero among them
    beats = [pack(values[k:k + in_count], 3) for k in range(0, len(values), in_count)]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, images * dut.out_beats,
                                                 stall_in=stall, stall_out=stall, seed=out_count)
    padded = [v for n in range(images) for v in values[n * elements:(n + 1) * elements] + [0] * dut.padding]
    assert [v for word in outputs for v in unpack(word, 3, out_count)] == padded
    if stall == 0.0:
        assert out_cycles[-1] - in_cycles[-1] == dut.latency
        assert out_cycles[-1] - out_cycles[-1 - dut.out_beats] == dut.cycles_per_image == elements // in_count


@pytest.mark.parametrize("pe", [1, 2, 5])
def test_score_serializer_words_ties_and_rate(pe):
    classes, width = 10, 6
    images = [[3, -5, 7, 7, 0, -32, 31, 31, 2, 1], [-4] * 10, [-32, -31, 0, 0, 0, 0, 0, 0, 0, -1]]
    beats = [pack([s & 63 for s in image[k:k + pe]], width) for image in images for k in range(0, classes, pe)]
    dut = ScoreSerializer(classes, width, pe)
    outputs, in_cycles, out_cycles = run_streams(dut, beats, 3 * (classes + 1))
    words = [(o & 0xFFFFFFFF, o >> 32) for o in outputs]
    for n, image in enumerate(images):
        chunk = words[n * 11:(n + 1) * 11]
        assert [d - (1 << 32) if d >> 31 else d for d, _ in chunk[:10]] == image
        assert chunk[10] == (int(np.argmax(image)), 1) and all(last == 0 for _, last in chunk[:10])
    assert out_cycles[10] - in_cycles[classes // pe - 1] == dut.latency
    assert out_cycles[-1] - out_cycles[-12] == dut.cycles_per_image


@pytest.mark.parametrize("pe, lanes, stall", [(1, 1, 0.0), (4, 1, 0.0), (4, 1, 0.5), (4, 2, 0.0), (8, 4, 0.5), (8, 8, 0.0)])
@pytest.mark.parametrize("n_in", [16, 1024])      # accumulators of 17 and 26 bits: one or two pieces per product
def test_requantizer_equals_golden_and_formulas(pe, lanes, stall, n_in):
    rng = np.random.default_rng(pe)
    layer = random_layer(rng, "r", "uint8", "requant", n_in, 8, "int8")
    lo, hi = layer.channel_acc_bounds
    accs = np.concatenate([rng.integers(lo, hi + 1, (5, 8)), lo[None, :], hi[None, :]])  # extremes too
    width = Requantizer(layer, pe)._acc_bits
    beats = [pack(row[k:k + pe] & ((1 << width) - 1), width) for row in accs for k in range(0, 8, pe)]
    dut = Requantizer(layer, pe, lanes=lanes)
    outputs, in_cycles, out_cycles = run_streams(dut, beats, accs.size // lanes, stall_in=stall, stall_out=stall,
                                                 seed=pe)
    elements = [(word >> (8 * lane)) & 0xFF for word in outputs for lane in range(lanes)]
    want = golden.layer_output(layer, accs).reshape(-1)
    signed = layer.requant.out_kind == "int8"
    assert [v - 256 if signed and v > 127 else v for v in elements] == want.tolist()
    assert dut.cycles_per_image == 8 // lanes and dut.latency == pe // lanes + 6 + 2   # six stages, then the output queue's two
    if stall == 0.0:
        per_image = 8 // lanes
        assert out_cycles[per_image - 1] - in_cycles[8 // pe - 1] == dut.latency
        assert out_cycles[-1] - out_cycles[-1 - per_image] == dut.cycles_per_image


@pytest.mark.parametrize("pe, lanes, stall", [(1, 1, 0.0), (4, 1, 0.0), (4, 2, 0.5), (8, 8, 0.0), (8, 4, 0.3)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_multithreshold_equals_golden_and_formulas(pe, lanes, stall, bits):
    """Levels equal golden's at random accumulators, at every threshold and one below it, and at
    both ends of the range; latency and II equal their formulas."""
    rng = np.random.default_rng(pe * 10 + bits)
    layer = random_layer(rng, "m", "uint2", "multithreshold", 40, 8, "ternary", bits)
    lo, hi = layer.channel_acc_bounds
    on_thresholds = np.clip(layer.thresholds.T, lo, hi)
    accs = np.concatenate([rng.integers(lo, hi + 1, (4, 8)), lo[None, :], hi[None, :], on_thresholds,
                           np.clip(on_thresholds - 1, lo, hi)])
    dut = MultiThreshold(layer, pe, lanes=lanes)
    width = dut._acc_bits
    beats = [pack(row[k:k + pe] & ((1 << width) - 1), width) for row in accs for k in range(0, 8, pe)]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, accs.size // lanes, stall_in=stall, stall_out=stall,
                                                 seed=pe)
    levels = [(word >> (bits * lane)) & ((1 << bits) - 1) for word in outputs for lane in range(lanes)]
    assert levels == golden.layer_output(layer, accs).reshape(-1).tolist()
    assert dut.levels == (1 << bits) - 1 and dut.comparators == dut.levels * lanes
    assert dut.cycles_per_image == 8 // lanes and dut.latency == pe // lanes + 3 + 2
    if stall == 0.0:
        per_image = 8 // lanes
        assert out_cycles[per_image - 1] - in_cycles[8 // pe - 1] == dut.latency
        assert out_cycles[-1] - out_cycles[-1 - per_image] == dut.cycles_per_image


@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
def test_requantizer_rounds_exact_ties_by_its_mode(rounding):
    """Power-of-two multipliers put many accumulators exactly on a tie; both modes match golden."""
    rng = np.random.default_rng(7)
    base = random_layer(rng, "r", "uint8", "requant", 16, 8, "int8")
    shifts = np.array([-2, -3, -4, -5, -6, -1, -2, -3], np.int64)     # divide by 2**3 ... 2**7
    requant = Requant(np.full(8, 1 << 30, np.int64), shifts, 3, "int8", -128, 127, rounding)
    layer = DenseLayer("r", "uint8", "requant", base.weights, None, "int8", base.bias, requant)
    divisor = 1 << (1 - shifts)                                       # acc / divisor is the real value
    accs = np.arange(-6, 6)[:, None] * divisor[None, :] + np.where(np.arange(12)[:, None] % 3 == 0, 0, divisor[None, :] // 2)
    width = Requantizer(layer, 2)._acc_bits
    beats = [pack(row[k:k + 2] & ((1 << width) - 1), width) for row in accs for k in range(0, 8, 2)]
    outputs, _, _ = run_streams(Requantizer(layer, 2), beats, accs.size, stall_in=0.3, stall_out=0.3, seed=1)
    want = golden.layer_output(layer, accs).reshape(-1)
    assert [v - 256 if v > 127 else v for v in outputs] == want.tolist()
    ties = (accs * (1 << 30)) % (1 << (31 - shifts))[None, :] == (1 << (30 - shifts))[None, :]
    assert ties.sum() >= 20
    # half-even and half-up disagree on every tie whose floor is even: the test can tell them apart.
    other = golden.requantize(accs, requant.multiplier, shifts, 3, -128, 127,
                              "half_up" if rounding == "half_even" else "half_even").reshape(-1)
    assert (other != want).sum() >= 10


@pytest.mark.parametrize("rounding", ["half_up", "half_even"])
@pytest.mark.parametrize("out_kind, zero_point, lo, hi, narrow_bits", [
    ("int8", -128, -128, 127, 10), ("uint8", 0, 0, 255, 10), ("int8", 5, -20, 30, 7), ("uint8", 200, 200, 200, 2)])
def test_requantizer_clamps_around_its_narrow_width_as_golden(rounding, out_kind, zero_point, lo, hi, narrow_bits):
    """With ``M0 = 2**30`` and ``s = 0`` the halved product is the accumulator itself: every halved
    value from well below ``-2**(n - 1)`` to well above ``2**(n - 1)`` equals golden, so the narrow
    rounding and the saturation of wider values agree with the full-width computation."""
    rng = np.random.default_rng(11)
    base = random_layer(rng, "r", "uint8", "requant", 1024, 8, "int8")
    requant = Requant(np.full(8, 1 << 30, np.int64), np.zeros(8, np.int64), zero_point, out_kind, lo, hi, rounding)
    layer = DenseLayer("r", "uint8", "requant", base.weights, None, out_kind, base.bias, requant)
    dut = Requantizer(layer, 8, lanes=8)
    assert dut.narrow_bits == narrow_bits
    edge = 1 << (narrow_bits + 1)
    accs = np.concatenate([np.arange(-edge - 4, edge + 4), [-(1 << 20), 1 << 20, -(1 << 25), (1 << 25) - 1]])
    accs = np.concatenate([accs, np.zeros(-accs.size % 8, np.int64)]).reshape(-1, 8)
    width = dut._acc_bits
    beats = [pack(row & ((1 << width) - 1), width) for row in accs]
    outputs, _, _ = run_streams(dut, beats, accs.shape[0], stall_in=0.2, stall_out=0.2, seed=3)
    elements = [(word >> (8 * lane)) & 0xFF for word in outputs for lane in range(8)]
    want = golden.layer_output(layer, accs).reshape(-1)
    assert [v - 256 if out_kind == "int8" and v > 127 else v for v in elements] == want.tolist()
    assert {lo, hi} <= set(want.tolist())


def test_parameter_validation_messages():
    layer = DenseLayer("dense1", "bits", "scores", np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match=r"^layer 'dense1': SIMD=5 does not divide in_features=12, as a "
                                         r"convolution's SIMD must; valid SIMD values: \[1, 2, 3, 4, 6, 12\]$"):
        FoldedDense(layer, pe=1, simd=5, vectors=4)
    with pytest.raises(ValueError, match=r"^layer 'dense1': SIMD=13 exceeds in_features=12$"):
        FoldedDense(layer, pe=1, simd=13)
    assert (FoldedDense(layer, pe=1, simd=5).padding, FoldedDense(layer, pe=1, simd=5).input_beats) == (3, 3)
    with pytest.raises(ValueError, match=r"^layer 'dense1': PE=4 does not divide out_features=10; "
                                         r"valid PE values: \[1, 2, 5, 10\]$"):
        FoldedDense(layer, pe=4, simd=1)
    with pytest.raises(TypeError, match=r"^pe must be a positive integer, not 0$"):
        FoldedDense(layer, pe=0, simd=1)
    with pytest.raises(TypeError, match=r"^simd must be a positive integer, not True$"):
        FoldedDense(layer, pe=1, simd=True)
    with pytest.raises(ValueError, match=r"^cannot regroup 4 elements per beat into 6: one count must divide the other$"):
        StreamResizer(1, 4, 6, 12)
    with pytest.raises(ValueError, match=r"^scores of 33 bits do not fit the 32-bit output word$"):
        ScoreSerializer(10, 33, 1)
    with pytest.raises(ValueError, match=r"^pe \(3\) must divide classes \(10\)$"):
        ScoreSerializer(10, 8, 3)
    with pytest.raises(ValueError, match=r"^layer 'dense1' has output 'scores'; a Requantizer needs 'requant'$"):
        Requantizer(layer, 1)
    with pytest.raises(ValueError, match=r"^layer 'dense1' has output 'scores'; a MultiThreshold needs "
                                         r"'multithreshold'$"):
        MultiThreshold(layer, 1)
    levels = random_layer(np.random.default_rng(0), "m", "uint2", "multithreshold", 8, 6, "binary")
    with pytest.raises(ValueError, match=r"^layer 'm': 4 multi-threshold lanes do not divide PE=6; "
                                         r"valid lane counts: \[1, 2, 3, 6\]$"):
        MultiThreshold(levels, 6, lanes=4)
    with pytest.raises(ValueError, match=r"^layer 'm': PE=4 does not divide out_features=6"):
        MultiThreshold(levels, 4)
    requant = random_layer(np.random.default_rng(0), "dense2", "uint8", "requant", 16, 8, "int8")
    with pytest.raises(ValueError, match=r"^layer 'dense2': 3 requantizer lanes do not divide PE=4; "
                                         r"valid lane counts: \[1, 2, 4\]$"):
        Requantizer(requant, 4, lanes=3)


@pytest.mark.parametrize("height, width, channels, kernel, stride, padding", [
    (5, 6, 2, 3, 1, 1), (7, 5, 1, 3, 2, 0), (6, 6, 3, 1, 1, 0), (9, 7, 1, 5, 2, 1), (4, 4, 2, 2, 2, 0), (5, 5, 1, 5, 1, 0)])
@pytest.mark.parametrize("stall", [0.0, 0.4])
def test_sliding_window_emits_every_window_pixel(height, width, channels, kernel, stride, padding, stall):
    from hwgen.rtl.window import SlidingWindow

    rng = np.random.default_rng(height * width + kernel)
    images = rng.integers(0, 256, (3, height, width, channels))
    dut = SlidingWindow((height, width, channels), kernel, stride, padding, 8)
    beats = [pack(pixel, 8) for image in images for row in image for pixel in row]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, 3 * dut.output_beats,
                                                 stall_in=stall, stall_out=stall, seed=kernel)
    want = golden.windows(images, kernel, stride, padding)        # (images, Ho, Wo, K*K*C)
    got = np.array([unpack(word, 8, channels) for word in outputs]).reshape(want.shape)
    assert np.array_equal(got, want)
    if stall == 0.0:
        per_image = out_cycles[dut.output_beats - 1::dut.output_beats]
        assert per_image[2] - per_image[1] == dut.cycles_per_image


@pytest.mark.parametrize("kind", ["bits", "uint8", "int8", "uint2", "uint3"])
@pytest.mark.parametrize("height, width, kernel", [(4, 6, 2), (7, 5, 2), (6, 6, 3), (8, 7, 3), (3, 5, 1)])
@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_max_pool_equals_golden(kind, height, width, kernel, stall):
    from hwgen.ir import MaxPool2dLayer
    from hwgen.rtl.pool import MaxPool

    rng = np.random.default_rng(height + width + kernel)
    channels, bits = 3, element_bits(kind)
    low, high = {"bits": (0, 2), "uint8": (0, 256), "int8": (-128, 128)}.get(kind, (0, 1 << bits))
    maps = rng.integers(low, high, (3, height, width, channels))
    layer = MaxPool2dLayer("p", (height, width, channels), kernel, kind)
    want = golden._layer(layer, maps.reshape(3, -1)).reshape(-1, channels)
    dut = MaxPool((height, width, channels), kernel, kind)
    beats = [pack(pixel & ((1 << bits) - 1), bits) for image in maps for row in image for pixel in row]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, len(want), stall_in=stall, stall_out=stall, seed=kernel)
    got = [unpack(word, bits, channels, signed=kind == "int8") for word in outputs]
    assert got == want.tolist()
    if stall == 0.0:
        # A block's max leaves `latency` cycles after its last pixel; an image every H * W cycles.
        per_image = len(want) // 3
        last_pixel = (height // kernel) * kernel * width - width + (width // kernel) * kernel - 1
        assert out_cycles[per_image - 1] - in_cycles[last_pixel] == dut.latency
        assert out_cycles[2 * per_image - 1] - out_cycles[per_image - 1] == dut.cycles_per_image


def test_network_takes_its_first_beat_once_every_stage_has_left_reset():
    """Every stage resets from a register of its own: ``s_axis_tready`` stays low in the cycle after
    reset, then an image offered at the first chance comes out equal to golden."""
    from amaranth.hdl import ClockDomain, Module
    from amaranth.sim import Simulator

    from hwgen.rtl.network import NetworkTop, default_folds

    rng = np.random.default_rng(3)
    model = random_model(rng, [12, 6, 4])
    image = random_images(rng, 1, 12)
    top = NetworkTop(model, default_folds(model))
    m = Module()
    m.domains.sync = domain = ClockDomain("sync")
    m.submodules.top = top
    beats = [int.from_bytes(image[0, k:k + 12 // top.input_beats].tobytes(), "little")
             for k in range(0, 12, 12 // top.input_beats)]
    ready_after_reset, words = [], []

    async def bench(ctx):
        ctx.set(domain.rst, 1)
        await ctx.delay(3e-6)       # three clock edges in reset (a tick would raise DomainReset)
        ctx.set(domain.rst, 0)
        ctx.set(top.m_axis_tready, 1)
        for _ in range(3):
            ready_after_reset.append(ctx.get(top.s_axis_tready))
            await ctx.tick()
        pending = list(beats)
        for _ in range(200):
            if pending:
                ctx.set(top.s_axis_tdata, pending[0])
                ctx.set(top.s_axis_tvalid, 1)
            _, _, ready, valid, data = await ctx.tick().sample(top.s_axis_tready, top.m_axis_tvalid, top.m_axis_tdata)
            if pending and ready:
                pending.pop(0)
                ctx.set(top.s_axis_tvalid, 0)
            if valid:
                words.append(data)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert ready_after_reset == [0, 1, 1]
    expected = golden.run(model, image)
    scores = [word - (1 << 32) if word >> 31 else word for word in words[:-1]]
    assert scores == expected.outputs[-1][0].tolist()
    assert words[-1] == int(expected.classes[0])


@pytest.mark.parametrize("stall_in, stall_out", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.7, 0.7)])
def test_register_slice_keeps_order_rate_and_latency(stall_in, stall_out):
    from hwgen.rtl.slice import RegisterSlice

    dut = RegisterSlice(5, 16)
    beats = [(11 * k + 7) % 32 for k in range(48)]
    outputs, in_cycles, out_cycles = run_streams(dut, beats, len(beats), stall_in=stall_in, stall_out=stall_out,
                                                 seed=3)
    assert outputs == beats
    if stall_in == stall_out == 0.0:
        assert [b - a for a, b in zip(in_cycles, out_cycles)] == [dut.latency] * len(beats)
        assert out_cycles[-1] - out_cycles[-1 - 16] == dut.cycles_per_image


def test_register_slice_parameters_are_checked():
    from hwgen.rtl.slice import RegisterSlice

    with pytest.raises(TypeError, match="^width must be a positive integer, not 0$"):
        RegisterSlice(0, 4)
    with pytest.raises(TypeError, match="^beats must be a positive integer, not -1$"):
        RegisterSlice(4, -1)
