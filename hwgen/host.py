"""Host side of a programmed board: images out over a serial port, classes back (pyserial)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UserError
from .ir import IntegerModel
from .protocol import IDENTIFY, IDENTITY_BYTES, WEIGHTS_READY, encode_image, parse_identity

__all__ = ["BoardLink", "RunResult"]


@dataclass
class RunResult:
    classes: np.ndarray
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.classes) / self.seconds if self.seconds else float("inf")


class BoardLink:
    """A serial connection to a board running :class:`hwgen.rtl.board.UARTBoardTop`.

    Parameters
    ----------
    port : str
        A device (``/dev/ttyUSB1``, ``COM3``) or any pyserial URL (``socket://host:port``).
    baud : int
    timeout : float
        Seconds to wait for a reply byte before giving up.
    """

    def __init__(self, port: str, baud: int, timeout: float = 5.0):
        import serial

        try:
            self._serial = serial.serial_for_url(port, baudrate=baud, timeout=timeout)
        except (serial.SerialException, ValueError) as error:
            raise UserError(f"cannot open serial port {port!r}: {error}") from None
        self._port = port

    def close(self) -> None:
        self._serial.close()

    def __enter__(self) -> "BoardLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, count: int, what: str) -> bytes:
        data = self._serial.read(count)
        if len(data) != count:
            raise UserError(f"{self._port}: timed out waiting for {what} ({len(data)} of {count} bytes); is the "
                            "board programmed with an `hwgen build` bitstream, at this baud rate?")
        return data

    def identify(self, model: IntegerModel | None = None) -> dict:
        """Ask the board which network it runs; with ``model``, insist that it is that one."""
        self._serial.reset_input_buffer()
        self._serial.write(bytes([IDENTIFY]))
        info = parse_identity(self._read(IDENTITY_BYTES, "the identity reply"))
        if model is not None and info["digest"] != model.digest()[:4]:
            raise UserError(f"the board runs a different network (digest {info['digest'].hex()}, the model file's "
                            f"is {model.digest()[:4].hex()}); rebuild with `hwgen build` for this model")
        if info["weights"] != WEIGHTS_READY:
            raise UserError(f"the board's weights are not ready: {info['weights_state']}. Write the build's weight "
                            "image to the flash with the command in its REPORT.md, then power-cycle the board")
        return info

    def classify(self, images: np.ndarray, model: IntegerModel, *, in_flight: int = 2,
                 progress: Callable[[int], None] | None = None) -> RunResult:
        """Classify ``images``, keeping at most ``in_flight`` unanswered (the board buffers two)."""
        if not 1 <= in_flight <= 2:
            raise UserError("in_flight must be 1 or 2: the board holds one image computing and one arriving")
        commands = [encode_image(image, model) for image in images]
        classes = np.zeros(len(images), dtype=np.int64)
        start = time.perf_counter()
        sent = 0
        for index in range(len(images)):
            while sent < len(images) and sent < index + in_flight:
                self._serial.write(commands[sent])
                sent += 1
            classes[index] = self._read(1, f"the class of image {index}")[0]
            if progress:
                progress(1)
        return RunResult(classes, time.perf_counter() - start)
