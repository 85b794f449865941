"""Board descriptions (``boards/*.toml``): device, clock, pins in use and the resource budget."""
from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass
from importlib import resources

from .errors import UserError

__all__ = ["Board", "Budget", "load_board", "board_names", "ASIC"]

#: The pseudo-board that selects generic (ASIC) synthesis instead of an FPGA build.
ASIC = "asic"


@dataclass(frozen=True)
class Budget:
    """What a device offers: LUTs (of the family's size), flip-flops, DSP multipliers, block RAM."""

    luts: int
    ffs: int
    dsps: int
    bram_blocks: int
    bram_bits: int
    bram_shapes: tuple[tuple[int, int], ...]
    spram_blocks: int = 0
    spram_bits: int = 0


@dataclass(frozen=True)
class Board:
    """One board file, validated."""

    name: str
    description: str
    family: str
    device: str
    package: str
    platform: str
    toolchain: str
    clock_resource: str
    clock_hz: int
    clock_pin: str
    network_hz: int | None          # the network's default PLL clock (None: the board clock, no PLL)
    uart_resource: str
    uart_pins: tuple[str, str]
    led_resource: str
    led_pins: tuple[str, ...]
    budget: Budget
    flash_resource: str | None = None   # the SPI flash beside the FPGA (weights loaded at power-up)
    flash_offset: int | None = None     # where in it the weight image goes

    @property
    def open_flow(self) -> bool:
        """Whether yosys and nextpnr (YoWASP) can take this board to a bitstream."""
        return self.toolchain == "yowasp"

    def amaranth_platform(self):
        """An instance of the amaranth-boards platform class this board names."""
        module_name, _, class_name = self.platform.partition(":")
        return getattr(importlib.import_module(module_name), class_name)()


_FAMILIES = ("ice40", "ecp5", "xc7")
_TOOLCHAINS = ("yowasp", "vivado")


def board_names() -> list[str]:
    """Every board with a description file, and ``asic``."""
    folder = resources.files("boards")
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml")) + [ASIC]


def load_board(name: str) -> Board:
    """Read and check ``boards/NAME.toml``; an unknown name or a bad field raises :class:`UserError`."""
    entry = resources.files("boards") / f"{name}.toml"
    if name == ASIC or not entry.is_file():
        raise UserError(f"unknown board {name!r}; choose one of {', '.join(board_names())}")
    where = f"boards/{name}.toml"
    try:
        data = tomllib.loads(entry.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{where}: not valid TOML ({error})") from None

    def field(table: dict, key: str, kind: type, path: str):
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: field {path}{key} must be a {kind.__name__}, not {value!r}")
        return value

    try:
        family = field(data, "family", str, "")
        if family not in _FAMILIES:
            raise UserError(f"{where}: family {family!r} is not one of {', '.join(_FAMILIES)}")
        toolchain = field(data, "toolchain", str, "")
        if toolchain not in _TOOLCHAINS:
            raise UserError(f"{where}: toolchain {toolchain!r} is not one of {', '.join(_TOOLCHAINS)}")
        clock, uart, leds = (field(data, key, dict, "") for key in ("clock", "uart", "leds"))
        budget = field(data, "budget", dict, "")
        flash = field(data, "flash", dict, "") if "flash" in data else None
        shapes = tuple((int(depth), int(width)) for depth, width in field(budget, "bram_shapes", list, "budget."))
        return Board(
            name=field(data, "name", str, ""), description=field(data, "description", str, ""),
            family=family, device=field(data, "device", str, ""), package=field(data, "package", str, ""),
            platform=field(data, "platform", str, ""), toolchain=toolchain,
            clock_resource=field(clock, "resource", str, "clock."), clock_hz=field(clock, "hz", int, "clock."),
            clock_pin=field(clock, "pin", str, "clock."),
            network_hz=field(clock, "network_hz", int, "clock.") if "network_hz" in clock else None,
            uart_resource=field(uart, "resource", str, "uart."),
            uart_pins=(field(uart, "rx", str, "uart."), field(uart, "tx", str, "uart.")),
            led_resource=field(leds, "resource", str, "leds."),
            led_pins=tuple(field(leds, "pins", list, "leds.")),
            flash_resource=field(flash, "resource", str, "flash.") if flash else None,
            flash_offset=field(flash, "offset", int, "flash.") if flash else None,
            budget=Budget(**{key: field(budget, key, int, "budget.")
                             for key in ("luts", "ffs", "dsps", "bram_blocks", "bram_bits",
                                         "spram_blocks", "spram_bits")}, bram_shapes=shapes),
        )
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: {error}") from None
