"""The UART board top in Verilator: real image bytes in on ``rx``, class bytes out on ``tx``."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwgen.flash import FLASH_OFFSET, WeightImage, loader_settings, weight_image
from hwgen.ir import IntegerModel
from hwgen.protocol import IDENTIFY, IDENTITY_BYTES, encode_image
from hwgen.rtl.board import UARTBoardTop
from hwgen.rtl.clocks import NETWORK_DOMAIN
from hwgen.rtl.network import Fold, NetworkTop, generate_verilog

from .primitives import primitive_models
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
    weights: int | None = None          # the weights' state once no longer loading (SPRAM layers)
    weights_cycle: int | None = None    # the UART-clock cycle it was seen
    flash: dict | None = None           # the flash model's log: commands, bytes read


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
    weight_memories : list of str, optional
        Per dense/conv layer, ``"rom"`` or ``"spram"``. With SPRAM layers the board top loads them
        from a behavioural SPI flash holding :attr:`image` at :data:`~hwgen.flash.FLASH_OFFSET`
        (or other bytes, see :meth:`classify`), through the SPRAM primitive's yosys model.
    """

    def __init__(self, model: IntegerModel, folds: list[Fold], build_dir: Path | str, *,
                 divisor: int = 8, led_count: int = 8, network_period_ps: int | None = None,
                 weight_memories: list[str] | None = None):
        self.model = model
        self.network_period_ps = network_period_ps
        domain = "sync" if network_period_ps is None else NETWORK_DOMAIN
        network = NetworkTop(model, folds, weight_memories=weight_memories)
        self.image: WeightImage | None = weight_image(model, network) if network.load_words else None
        loader = None
        if self.image is not None:
            loader = loader_settings(self.image, FLASH_OFFSET, 1e12 / (network_period_ps or 10_000))
        self.top = UARTBoardTop(model, folds, divisor=divisor, led_count=led_count, network_domain=domain,
                                weight_memories=weight_memories, loader=loader, blink_bit=4)
        self.build_dir = Path(build_dir).resolve()
        verilog = generate_verilog(self.top, BOARD_TOP_NAME)
        self.design = VerilatorDesign(verilog + primitive_models(verilog), BOARD_TOP_NAME,
                                      self.build_dir / "verilator").build()
        self._runs = 0

    def _config(self, budget_images: int, **extra) -> tuple[dict, Path]:
        run_dir = self.build_dir / f"run{self._runs}"
        self._runs += 1
        run_dir.mkdir(parents=True, exist_ok=True)
        per_image = self.top.input_cycles_per_image + self.top.network.cycles_per_image
        loading = 0 if self.top.loader is None else self.top.loader.load_cycles * (self.network_period_ps or 10_000) // 10_000
        config = {"divisor": self.top.divisor, "max_cycles": (budget_images + 2) * per_image * 2 + 2 * loading + 10_000,
                  **extra}
        if self.network_period_ps is not None:
            config["network_period_ps"] = self.network_period_ps
        return config, run_dir

    def classify(self, images: np.ndarray, *, flash: bytes | None = None, replies: int | None = None) -> BoardRun:
        """Send ``?`` and then every image back to back; collect the identity and one class per image.

        With SPRAM layers the flash holds ``flash`` (default: :attr:`image`'s bytes) at
        :data:`~hwgen.flash.FLASH_OFFSET`, and nothing is sent until the weights are loaded or
        failed. ``replies`` is how many reply bytes to wait for (default: the identity and a
        class per image).
        """
        payload = bytes([IDENTIFY]) + b"".join(encode_image(image, self.model) for image in images)
        config, run_dir = self._config(len(images))
        (run_dir / "send.bin").write_bytes(payload)
        config.update(send=str(run_dir / "send.bin"),
                      replies=IDENTITY_BYTES + len(images) if replies is None else replies)
        if self.image is not None:
            (run_dir / "flash.bin").write_bytes(self.image.data if flash is None else flash)
            config.update(flash=str(run_dir / "flash.bin"), flash_base=FLASH_OFFSET)
        start = time.perf_counter()
        results = self.design.run(BENCH_MODULE, config, run_dir)
        wall = time.perf_counter() - start
        skip = IDENTITY_BYTES
        return BoardRun(bytes(results["replies"][:skip]), results["replies"][skip:], results["reply_cycles"][skip:],
                        results["leds"][skip:], bool(results["overrun"]), results["cycles"], wall,
                        results.get("weights"), results.get("weights_cycle"), results.get("flash"))

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
