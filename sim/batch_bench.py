"""cocotb test: whole images through ``hwgen_harness``; Python never waits on a clock edge.

The harness (``rtl_templates/stream_harness.v.j2``) runs the clock inside the simulation and does
the per-beat stream handshakes; this test hands it one whole image per write (the next one as
soon as the harness has taken the last) and reads each completed batch of results in one read.

Configuration (JSON at ``HWGEN_SIM_CONFIG``): ``beats`` (path of a ``.npy`` uint8 array
``(images, beats_per_image, bytes_per_beat)``), ``batch``, ``words_per_image``, ``stall_in`` and
``stall_out`` (probabilities), ``max_cycles`` (the run fails as hung after that many cycles).
Results (JSON at ``HWGEN_SIM_RESULTS``): the output words as one ``.npy`` (``words``, uint32,
``(images, words_per_image)``), each image's last-output cycle, the first input cycle, the cycle
count and the harness's protocol error count.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cocotb
import numpy as np
from cocotb.triggers import Timer, with_timeout

CLOCK_NS = 10  # the harness's `always #5 clk = ~clk`


def _unsigned(handle) -> int:
    return int(handle.value)


@cocotb.test()
async def stream_batches(dut):
    config = json.loads(Path(os.environ["HWGEN_SIM_CONFIG"]).read_text())
    beats = np.load(config["beats"], allow_pickle=False)
    images = len(beats)
    batch, words_per_image = int(config["batch"]), int(config["words_per_image"])
    dut.in_valid.value = 0
    dut.in_flush.value = 0
    dut.stall_in.value = round(float(config["stall_in"]) * 65536)
    dut.stall_out.value = round(float(config["stall_out"]) * 65536)

    words = np.zeros((images, words_per_image), np.uint32)
    out_cycles = np.zeros(images, np.int64)
    collected = 0

    async def collect():
        nonlocal collected
        while collected < images:
            await dut.out_batches.value_change
            count = _unsigned(dut.out_count)
            data = _unsigned(dut.out_data).to_bytes(batch * words_per_image * 4, "little")
            cycles = _unsigned(dut.out_cycles).to_bytes(batch * 4, "little")
            words[collected:collected + count] = np.frombuffer(data, "<u4")[:count * words_per_image].reshape(
                count, words_per_image)
            out_cycles[collected:collected + count] = np.frombuffer(cycles, "<u4")[:count]
            collected += count

    collector = cocotb.start_soon(collect())
    for image in beats:
        dut.in_data.value = int.from_bytes(image.tobytes(), "little")
        dut.in_valid.value = 1
        await dut.in_images.value_change
    dut.in_valid.value = 0
    dut.in_flush.value = 1
    hung = False
    try:
        await with_timeout(collector, int(config["max_cycles"]) * CLOCK_NS, "ns")
    except TimeoutError:
        hung = True
        collector.cancel()
    words_path = Path(os.environ["HWGEN_SIM_RESULTS"]).with_name("words.npy")
    np.save(words_path, words[:collected], allow_pickle=False)
    results = {
        "words": str(words_path),
        "out_last": out_cycles[:collected].tolist(),
        "first_input_cycle": _unsigned(dut.first_input_cycle),
        "cycles": _unsigned(dut.cycle),
        "protocol_errors": _unsigned(dut.protocol_errors),
        "hung": hung,
    }
    Path(os.environ["HWGEN_SIM_RESULTS"]).write_text(json.dumps(results))
