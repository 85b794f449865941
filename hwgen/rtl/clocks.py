"""The network's clock on a board: PLL settings for iCE40 and ECP5 and the PLL instances.

The settings follow the devices' documented ranges (the same searches as icestorm's ``icepll``
and prjtrellis's ``ecppll``): the closest output frequency to the request wins, and the report
gives the frequency the PLL really makes.
"""
from __future__ import annotations

from typing import NamedTuple

from amaranth.hdl import ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, ResetSignal, Signal
from amaranth.lib.cdc import AsyncFFSynchronizer

__all__ = ["Ice40PLLSettings", "Ecp5PLLSettings", "ice40_pll_settings", "ecp5_pll_settings", "pll_settings",
           "PLL_FAMILIES", "BoardPLL",
           "board_domains", "NETWORK_DOMAIN"]

#: Clock domain of the network when it runs on a PLL clock.
NETWORK_DOMAIN = "net"


class Ice40PLLSettings(NamedTuple):
    """SB_PLL40 dividers (iCE40 sysCLOCK PLL, "SIMPLE" feedback): ``f = f_in * (DIVF + 1) / ((DIVR + 1) * 2**DIVQ)``."""

    divr: int
    divf: int
    divq: int
    filter_range: int
    output_hz: float


class Ecp5PLLSettings(NamedTuple):
    """EHXPLLL dividers with CLKOP feedback: ``f = f_in * CLKFB_DIV / CLKI_DIV``, VCO ``f * CLKOP_DIV``."""

    clki_div: int
    clkfb_div: int
    clkop_div: int
    output_hz: float


def _check_request(input_hz: float, output_hz: float, low: float, high: float, family: str) -> None:
    if not low <= output_hz <= high:
        raise ValueError(f"--clock {output_hz / 1e6:g} MHz: the {family} PLL makes {low / 1e6:g} to "
                         f"{high / 1e6:g} MHz from the {input_hz / 1e6:g} MHz board clock")


def ice40_pll_settings(input_hz: float, output_hz: float) -> Ice40PLLSettings:
    """Dividers whose output is closest to ``output_hz`` (PFD 10-133 MHz, VCO 533-1066 MHz)."""
    _check_request(input_hz, output_hz, 16e6, 275e6, "iCE40")
    best = None
    for divr in range(16):
        pfd = input_hz / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533e6 <= vco <= 1066e6:
                continue
            for divq in range(1, 7):
                made = vco / 2 ** divq
                if best is None or abs(made - output_hz) < abs(best.output_hz - output_hz):
                    # The loop filter range follows the PFD frequency (iCE40 sysCLOCK PLL guide).
                    filter_range = next(index for index, top in enumerate((17e6, 26e6, 44e6, 66e6, 101e6, 133e6))
                                        if pfd < top) + 1
                    best = Ice40PLLSettings(divr, divf, divq, filter_range, made)
    return best


def ecp5_pll_settings(input_hz: float, output_hz: float) -> Ecp5PLLSettings:
    """Dividers whose output is closest to ``output_hz`` (PFD 3.125-400 MHz, VCO 400-800 MHz)."""
    _check_request(input_hz, output_hz, 10e6, 400e6, "ECP5")
    best = None
    for clki_div in range(1, 129):
        pfd = input_hz / clki_div
        if not 3.125e6 <= pfd <= 400e6:
            continue
        for clkfb_div in range(1, 81):
            made = pfd * clkfb_div
            for clkop_div in range(1, 129):
                if 400e6 <= made * clkop_div <= 800e6:
                    if best is None or abs(made - output_hz) < abs(best.output_hz - output_hz):
                        best = Ecp5PLLSettings(clki_div, clkfb_div, clkop_div, made)
                    break
    return best


def pll_settings(family: str, input_hz: float, output_hz: float) -> Ice40PLLSettings | Ecp5PLLSettings:
    """The PLL dividers of ``family`` closest to ``output_hz``; ValueError for a family without one."""
    if family not in _SETTINGS:
        raise ValueError(f"no PLL for family {family!r}; one of {', '.join(map(repr, _SETTINGS))}")
    return _SETTINGS[family](input_hz, output_hz)


def board_domains() -> list[ClockDomain]:
    """The domains :class:`BoardPLL` drives, for its parent to define."""
    return [ClockDomain("sync", reset_less=True), ClockDomain(NETWORK_DOMAIN)]


_SETTINGS = {"ice40": ice40_pll_settings, "ecp5": ecp5_pll_settings}
#: Families whose board top can put the network on a PLL clock.
PLL_FAMILIES = tuple(_SETTINGS)


class BoardPLL(Elaboratable):
    """Drives the board's ``sync`` clock from its oscillator and the :data:`NETWORK_DOMAIN` clock
    from a PLL; a parent defines both domains (:func:`board_domains`).

    The network domain is held in reset until the PLL reports lock (synchronized to that domain).
    The ``sync`` domain has no reset: its registers start from their initial values at configuration.

    Parameters
    ----------
    family : str
        ``"ice40"`` (SB_PLL40_2_PAD: port A passes the pad's clock through, port B the PLL output;
        the iCEBreaker's oscillator pin is the PLL's pad) or ``"ecp5"`` (EHXPLLL on the clock input).
    clock_pin
        The oscillator's pad (iCE40) or input buffer output (ECP5).
    input_hz, output_hz : float
    """

    def __init__(self, family: str, clock_pin, input_hz: float, output_hz: float):
        self.settings = pll_settings(family, input_hz, output_hz)
        self.family = family
        self.clock_pin = clock_pin
        self.input_hz = input_hz

    @property
    def output_hz(self) -> float:
        return self.settings.output_hz

    def elaborate(self, platform):
        m = Module()
        locked = Signal()
        s = self.settings
        if self.family == "ice40":
            m.submodules.pll = Instance(
                "SB_PLL40_2_PAD",
                p_FEEDBACK_PATH="SIMPLE", p_PLLOUT_SELECT_PORTB="GENCLK",
                p_DIVR=Const(s.divr, 4), p_DIVF=Const(s.divf, 7), p_DIVQ=Const(s.divq, 3),
                p_FILTER_RANGE=Const(s.filter_range, 3),
                i_PACKAGEPIN=self.clock_pin, i_RESETB=Const(1), i_BYPASS=Const(0),
                o_PLLOUTGLOBALA=ClockSignal("sync"), o_PLLOUTGLOBALB=ClockSignal(NETWORK_DOMAIN), o_LOCK=locked)
        else:
            feedback = Signal()
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{self.input_hz / 1e6:g}", a_FREQUENCY_PIN_CLKOP=f"{s.output_hz / 1e6:g}",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
                p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_CLKOP_ENABLE="ENABLED",
                p_CLKI_DIV=s.clki_div, p_CLKFB_DIV=s.clkfb_div, p_CLKOP_DIV=s.clkop_div,
                p_CLKOP_CPHASE=s.clkop_div - 1, p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP",
                i_CLKI=self.clock_pin, i_CLKFB=feedback, i_RST=Const(0), i_STDBY=Const(0),
                i_PHASESEL0=Const(0), i_PHASESEL1=Const(0), i_PHASEDIR=Const(0), i_PHASESTEP=Const(0),
                i_PHASELOADREG=Const(0), i_PLLWAKESYNC=Const(0), i_ENCLKOP=Const(0),
                o_CLKOP=feedback, o_LOCK=locked)
            m.d.comb += [ClockSignal(NETWORK_DOMAIN).eq(feedback), ClockSignal("sync").eq(self.clock_pin)]
        # The network's reset, released in step with its clock once the PLL has locked. It
        # reaches only the network's per-stage reset registers (:class:`~.network.NetworkTop`),
        # so fabric routing serves it; a global network (DCCA) for it failed to route in a
        # 39k-LUT ECP5 design.
        m.submodules.net_reset = AsyncFFSynchronizer(~locked, ResetSignal(NETWORK_DOMAIN), o_domain=NETWORK_DOMAIN,
                                                     async_edge="pos")
        return m
