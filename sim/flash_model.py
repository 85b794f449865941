"""A behavioural SPI NOR flash for cocotb: the commands the weight loader sends, mode 0.

It answers what a 25-series flash (the iCEBreaker's W25Q128) answers to them: release from deep
power-down (0xAB) and read data (0x03, 24-bit address, then bytes until deselected). It starts
in deep power-down, where it ignores reads (its output stays high), so a loader that does not
wake it reads only ones. Addresses outside the stored image read as erased (0xFF).
"""
from __future__ import annotations

from cocotb.triggers import FallingEdge, First, RisingEdge

__all__ = ["spi_flash", "RELEASE_POWER_DOWN", "READ_DATA"]

RELEASE_POWER_DOWN = 0xAB
READ_DATA = 0x03


async def spi_flash(dut, contents: bytes, base: int, log: dict) -> None:
    """Serve ``contents`` at flash address ``base`` on the ``flash_*`` ports of ``dut`` (chip
    select active high) forever; ``log`` counts the commands (``"commands"``) and bytes read."""
    powered_down = True
    log.setdefault("commands", [])
    log.setdefault("bytes_read", 0)
    dut.flash_cipo.value = 1
    while True:
        if not int(dut.flash_cs.value):
            await RisingEdge(dut.flash_cs)
        command = 0
        for _ in range(8):
            await RisingEdge(dut.flash_clk)
            command = (command << 1) | int(dut.flash_copi.value)
        log["commands"].append(command)
        if command == RELEASE_POWER_DOWN:
            powered_down = False
        elif command == READ_DATA and not powered_down:
            address = 0
            for _ in range(24):
                await RisingEdge(dut.flash_clk)
                address = (address << 1) | int(dut.flash_copi.value)
            selected = True
            while selected:
                offset = address - base
                value = contents[offset] if 0 <= offset < len(contents) else 0xFF
                for bit in range(7, -1, -1):
                    await First(FallingEdge(dut.flash_clk), FallingEdge(dut.flash_cs))
                    if not int(dut.flash_cs.value):
                        selected = False
                        break
                    dut.flash_cipo.value = (value >> bit) & 1
                else:
                    log["bytes_read"] += 1
                address += 1
            dut.flash_cipo.value = 1
            continue
        if int(dut.flash_cs.value):
            await FallingEdge(dut.flash_cs)
