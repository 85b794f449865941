"""Stream helpers for Amaranth-simulator tests: producer and consumer as separate testbenches.

A wrapper adds a free-running cycle counter so each transfer is stamped with its cycle.
"""
from __future__ import annotations

import random

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator


class Stamped(wiring.Component):
    """Wraps a component with ``i``/``o`` streams and counts cycles since reset."""

    def __init__(self, dut: wiring.Component):
        self.dut = dut
        self.cycle = Signal(32)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        m.d.sync += self.cycle.eq(self.cycle + 1)
        return m


def run_streams(dut: wiring.Component, beats: list[int], expected_count: int, *,
                stall_in: float = 0.0, stall_out: float = 0.0, seed: int = 0, deadline: int = 100_000):
    """Drive ``beats`` into ``dut.i`` and collect ``expected_count`` payloads from ``dut.o``.

    Returns ``(outputs, in_cycles, out_cycles)``: payload values and the cycle of each transfer.
    """
    top = Stamped(dut)
    rng_in, rng_out = random.Random(seed), random.Random(seed + 1)
    in_cycles, out_cycles, outputs = [], [], []

    async def producer(ctx):
        for beat in beats:
            while rng_in.random() < stall_in:
                await ctx.tick()
            ctx.set(dut.i.payload, beat)
            ctx.set(dut.i.valid, 1)
            (cycle,) = await ctx.tick().sample(top.cycle).until(dut.i.ready)
            in_cycles.append(cycle)
            ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        while len(outputs) < expected_count:
            ready = rng_out.random() >= stall_out
            ctx.set(dut.o.ready, ready)
            _, _, valid, payload, cycle = await ctx.tick().sample(dut.o.valid, dut.o.payload, top.cycle)
            if ready and valid:
                outputs.append(payload if isinstance(payload, int) else payload.as_value().value)
                out_cycles.append(cycle)
            if cycle > deadline:
                raise AssertionError(f"only {len(outputs)} of {expected_count} outputs by cycle {deadline}")

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return outputs, in_cycles, out_cycles
