"""The UART board top in Verilator: real image bytes in on ``rx``, class bytes out on ``tx``."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwgen.ir import IntegerModel
from hwgen.protocol import IDENTIFY, IDENTITY_BYTES, encode_image
from hwgen.rtl.board import UARTBoardTop
from hwgen.rtl.clocks import NETWORK_DOMAIN
from hwgen.rtl.network import Fold, generate_verilog

from .runner import VerilatorDesign

BENCH_MODULE = "sim.uart_bench"
BOARD_TOP_NAME = "hwgen_board"


@dataclass
class BoardRun:
    """What one UART run of the board top returned."""

    identity: bytes
    classes: list[int]
    class_cycles: list[int]
    leds: list[int]
    overrun: bool
    cycles: int
    wall_seconds: float


class BoardSimulator:
    """A built simulator of :class:`UARTBoardTop`; runs byte streams or serves a TCP client.

    Parameters
    ----------
    model, folds
        The network and its folds.
    divisor : int
        Clock cycles per UART bit (small values keep simulations short; the logic is the same).
    led_count : int
    build_dir : path
    network_period_ps : int or None
        With a period, the network runs in a clock domain of its own at that period (the UART's
        clock has 10 ns), across the board top's clock-domain crossing, as on a PLL clock.
    """

    def __init__(self, model: IntegerModel, folds: list[Fold], build_dir: Path | str, *,
                 divisor: int = 8, led_count: int = 8, network_period_ps: int | None = None):
        self.model = model
        self.network_period_ps = network_period_ps
        domain = "sync" if network_period_ps is None else NETWORK_DOMAIN
        self.top = UARTBoardTop(model, folds, divisor=divisor, led_count=led_count, network_domain=domain)
        self.build_dir = Path(build_dir).resolve()
        self.design = VerilatorDesign(generate_verilog(self.top, BOARD_TOP_NAME), BOARD_TOP_NAME,
                                      self.build_dir / "verilator").build()
        self._runs = 0

    def _config(self, budget_images: int, **extra) -> tuple[dict, Path]:
        run_dir = self.build_dir / f"run{self._runs}"
        self._runs += 1
        run_dir.mkdir(parents=True, exist_ok=True)
        per_image = self.top.input_cycles_per_image + self.top.network.cycles_per_image
        config = {"divisor": self.top.divisor, "max_cycles": (budget_images + 2) * per_image * 2 + 10_000, **extra}
        if self.network_period_ps is not None:
            config["network_period_ps"] = self.network_period_ps
        return config, run_dir

    def classify(self, images: np.ndarray) -> BoardRun:
        """Send ``?`` and then every image back to back; collect the identity and one class per image."""
        payload = bytes([IDENTIFY]) + b"".join(encode_image(image, self.model) for image in images)
        config, run_dir = self._config(len(images))
        (run_dir / "send.bin").write_bytes(payload)
        config.update(send=str(run_dir / "send.bin"), replies=IDENTITY_BYTES + len(images))
        start = time.perf_counter()
        results = self.design.run(BENCH_MODULE, config, run_dir)
        wall = time.perf_counter() - start
        skip = IDENTITY_BYTES
        return BoardRun(bytes(results["replies"][:skip]), results["replies"][skip:], results["reply_cycles"][skip:],
                        results["leds"][skip:], bool(results["overrun"]), results["cycles"], wall)

    def serve(self, port: int, max_images: int) -> threading.Thread:
        """Simulate the board behind a TCP port (pyserial ``socket://127.0.0.1:PORT``) in a thread.

        The thread ends when the client disconnects; its results are in ``thread.results``.
        """
        config, run_dir = self._config(max_images, socket=["127.0.0.1", port])

        def target():
            thread.results = self.design.run(BENCH_MODULE, config, run_dir)

        thread = threading.Thread(target=target, daemon=True)
        thread.results = None
        thread.start()
        return thread
