"""cocotb test: stream images into ``s_axis_*`` and collect ``m_axis_*`` words, with random stalls.

Configuration (JSON at ``HWGEN_SIM_CONFIG``):

``beats``
    path of a ``.npy`` uint8 array ``(images, beats_per_image, bytes_per_beat)``; each beat is the
    little-endian value for ``s_axis_tdata``.
``words_per_image``
    output words that make one image's result; ``m_axis_tlast`` (if the design has it) must be set
    on the last word of each image and only there.
``stall_in``, ``stall_out``, ``seed``
    probability that the source idles on a cycle before presenting a beat, probability that the
    sink holds ``tready`` low on a cycle, and the seed of both.
``max_cycles``
    cycles after which the run fails as hung.
``probes`` (optional)
    layer names whose ``probe_<layer>_data`` is recorded on every cycle ``probe_<layer>_valid``
    is high (a top built with ``probes=True``).
``drain_cycles`` (optional)
    cycles to keep running once the last word is out and every input beat is in, so that hidden
    layers finish streams the output did not wait for (a convolution's rows that no later window
    reads). An output word in that time is an error.

Both ends follow the stream rules: the source keeps ``tvalid`` and ``tdata`` until the transfer; a
transfer happens on a rising edge where ``tvalid`` and ``tready`` are both high. Signals are driven
on the falling edge and sampled once settled, so one coroutine handles both ends per cycle.
Results (JSON at ``HWGEN_SIM_RESULTS``): per image the output words and the cycle numbers of its
first/last input and first/last output transfer; the recorded probe beats.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly


@cocotb.test()
async def stream_images(dut):
    config = json.loads(Path(os.environ["HWGEN_SIM_CONFIG"]).read_text())
    beats = np.load(config["beats"], allow_pickle=False)
    images, beats_per_image = beats.shape[:2]
    values = [int.from_bytes(beat.tobytes(), "little") for beat in beats.reshape(-1, beats.shape[2])]
    words_per_image = int(config["words_per_image"])
    stall_in, stall_out = float(config["stall_in"]), float(config["stall_out"])
    rng = random.Random(int(config["seed"]))
    has_tlast = hasattr(dut, "m_axis_tlast")
    probes = {name: (getattr(dut, f"probe_{name}_valid"), getattr(dut, f"probe_{name}_data"))
              for name in config.get("probes", [])}
    probe_beats: dict[str, list[int]] = {name: [] for name in probes}

    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.s_axis_tvalid.value = 0
    dut.m_axis_tready.value = 0
    if hasattr(dut, "s_axis_tlast"):
        dut.s_axis_tlast.value = 0
    await ClockCycles(dut.clk, 3)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    in_cycles: list[list[int]] = [[] for _ in range(images)]
    out_cycles: list[list[int]] = [[] for _ in range(images)]
    words: list[list[int]] = [[]]
    errors: list[str] = []
    next_beat, presenting, cycle = 0, False, 0
    held = None  # (tdata, tlast) offered on m_axis but not taken: must stay until taken
    max_cycles = int(config["max_cycles"])
    drain_cycles, drained = int(config.get("drain_cycles", 0)), 0
    while (len(words) <= images or drained < drain_cycles) and cycle <= max_cycles:
        await FallingEdge(dut.clk)
        cycle += 1
        if len(words) > images and next_beat == len(values):
            drained += 1
        if not presenting and next_beat < len(values) and rng.random() >= stall_in:
            dut.s_axis_tdata.value = values[next_beat]
            if hasattr(dut, "s_axis_tlast"):
                dut.s_axis_tlast.value = int(next_beat % beats_per_image == beats_per_image - 1)
            presenting = True
        dut.s_axis_tvalid.value = int(presenting)
        ready = rng.random() >= stall_out
        dut.m_axis_tready.value = int(ready)
        await ReadOnly()
        if presenting and dut.s_axis_tready.value:
            in_cycles[next_beat // beats_per_image].append(cycle)
            next_beat += 1
            presenting = False
        for name, (probe_valid, probe_data) in probes.items():
            if probe_valid.value:
                probe_beats[name].append(int(probe_data.value))
        valid = bool(dut.m_axis_tvalid.value)
        if held is not None:
            now = (int(dut.m_axis_tdata.value), int(dut.m_axis_tlast.value) if has_tlast else 0)
            if not valid or now != held:
                errors.append(f"cycle {cycle}: m_axis dropped or changed a beat before it was taken "
                              f"(valid={int(valid)}, was {held}, now {now})")
        held = None
        if valid and not ready:
            held = (int(dut.m_axis_tdata.value), int(dut.m_axis_tlast.value) if has_tlast else 0)
        if ready and valid:
            image = len(words) - 1
            if image >= images:
                errors.append(f"cycle {cycle}: an output word after the last image's")
                continue
            words[-1].append(int(dut.m_axis_tdata.value))
            out_cycles[image].append(cycle)
            closing = len(words[-1]) == words_per_image
            if has_tlast and int(dut.m_axis_tlast.value) != int(closing):
                errors.append(f"image {image}: m_axis_tlast={int(dut.m_axis_tlast.value)} on word "
                              f"{len(words[-1]) - 1} of {words_per_image}")
            if closing:
                words.append([])
    words.pop()
    results = {
        "words": words,
        "cycles": cycle,
        "in_first": [c[0] if c else None for c in in_cycles],
        "in_last": [c[-1] if c else None for c in in_cycles],
        "out_first": [c[0] if c else None for c in out_cycles],
        "out_last": [c[-1] if c else None for c in out_cycles],
        "errors": errors,
        "hung": len(words) < images,
        "probes": probe_beats,
    }
    with open(os.environ["HWGEN_SIM_RESULTS"], "w") as handle:
        json.dump(results, handle)
