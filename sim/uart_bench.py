"""cocotb test: a board top's UART line driven bit by bit, its replies decoded bit by bit.

Configuration (JSON at ``HWGEN_SIM_CONFIG``):

``divisor``
    clock cycles per UART bit.
``send``
    path of a file of bytes to send back to back (each frame starts as the previous one's stop
    bit ends), with ``replies`` the count of reply bytes to wait for; or
``socket``
    ``[host, port]`` to listen on: bytes from the one client that connects are sent on ``rx``
    and reply bytes go back to it, until the client closes the connection (a serial port over
    TCP, as pyserial's ``socket://`` URLs speak it).
``max_cycles``
    cycles after which the run stops as hung.
``network_period_ps``
    (optional) the period of ``net_clk`` for a board top whose network has its own clock
    domain; ``clk`` (the UART's) runs at 10 ns. Both resets are released together.
``flash``, ``flash_base``
    (optional, for a board top with SPRAM layers) a file of bytes a behavioural SPI flash
    (:mod:`sim.flash_model`) holds at address ``flash_base``. Nothing is sent until the board
    says its weights are no longer loading (its ``weights`` port), as a host polling ``?`` would.

Results (JSON at ``HWGEN_SIM_RESULTS``): the reply bytes, the cycle at which each reply's start
bit began, the LED value after each reply, whether the receiver overran, and the cycle count;
with a flash, the cycle the weights' state left "loading", that state, and the flash's log.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, Timer
from cocotb.utils import get_sim_time

from sim.flash_model import spi_flash

PERIOD_NS = 10
#: The board's ``weights`` port while the loader reads the flash (hwgen.protocol.WEIGHTS_LOADING).
WEIGHTS_LOADING = 1


def _cycle() -> int:
    return int(get_sim_time("ns")) // PERIOD_NS


async def send_byte(dut, value: int, divisor: int) -> None:
    """One 8N1 frame on ``rx``: start bit, data LSB first, stop bit, each ``divisor`` cycles."""
    for bit in [0] + [(value >> k) & 1 for k in range(8)] + [1]:
        dut.rx.value = bit
        await ClockCycles(dut.clk, divisor)


async def receive_byte(dut, divisor: int) -> tuple[int, int]:
    """Wait for a start bit on ``tx`` and sample each bit mid-way; returns (byte, start cycle)."""
    await FallingEdge(dut.tx)
    start = _cycle()
    await ClockCycles(dut.clk, divisor // 2)
    if dut.tx.value != 0:
        raise AssertionError(f"cycle {start}: tx start bit did not last half a bit")
    value = 0
    for k in range(8):
        await ClockCycles(dut.clk, divisor)
        value |= int(dut.tx.value) << k
    await ClockCycles(dut.clk, divisor)
    if dut.tx.value != 1:
        raise AssertionError(f"cycle {start}: tx stop bit is 0")
    return value, start


@cocotb.test()
async def uart_board(dut):
    config = json.loads(Path(os.environ["HWGEN_SIM_CONFIG"]).read_text())
    divisor = int(config["divisor"])
    max_cycles = int(config["max_cycles"])
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    network_clock = "network_period_ps" in config
    if network_clock:
        cocotb.start_soon(Clock(dut.net_clk, int(config["network_period_ps"]), unit="ps").start())
        dut.net_rst.value = 1
    dut.rst.value = 1
    dut.rx.value = 1
    flash_log: dict = {}
    if "flash" in config:      # listening before the loader leaves reset
        cocotb.start_soon(spi_flash(dut, Path(config["flash"]).read_bytes(), int(config["flash_base"]), flash_log))
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    if network_clock:
        dut.net_rst.value = 0
    await ClockCycles(dut.clk, 2 * divisor)

    weights = {}
    if "flash" in config:
        while int(dut.weights.value) == WEIGHTS_LOADING and _cycle() < max_cycles:
            await ClockCycles(dut.clk, 64)
        weights = {"weights_cycle": _cycle(), "weights": int(dut.weights.value), "flash": flash_log}

    replies: list[int] = []
    reply_cycles: list[int] = []
    leds: list[int] = []
    client = None

    async def monitor():
        while True:
            value, start = await receive_byte(dut, divisor)
            replies.append(value)
            reply_cycles.append(start)
            leds.append(int(dut.leds.value))
            if client is not None:
                client.sendall(bytes([value]))

    cocotb.start_soon(monitor())

    if "send" in config:
        payload = Path(config["send"]).read_bytes()
        expected = int(config["replies"])

        async def driver():
            for value in payload:
                await send_byte(dut, value, divisor)

        cocotb.start_soon(driver())
        while len(replies) < expected and _cycle() < max_cycles:
            await ClockCycles(dut.clk, 10 * divisor)
        await ClockCycles(dut.clk, 12 * divisor)     # a stray extra reply would show here
    else:
        host, port = config["socket"]
        with socket.create_server((host, int(port))) as server:
            server.settimeout(120)
            client, _ = server.accept()
            client.setblocking(False)
            with client:
                while _cycle() < max_cycles:
                    try:
                        chunk = client.recv(4096)
                    except BlockingIOError:
                        await ClockCycles(dut.clk, 10 * divisor)
                        continue
                    if not chunk:
                        break
                    for value in chunk:
                        await send_byte(dut, value, divisor)
            client = None
        await Timer(1, unit="ns")

    results = {"replies": replies, "reply_cycles": reply_cycles, "leds": leds,
               "overrun": int(dut.overrun.value), "cycles": _cycle(), "hung": _cycle() >= max_cycles, **weights}
    with open(os.environ["HWGEN_SIM_RESULTS"], "w") as handle:
        json.dump(results, handle)
