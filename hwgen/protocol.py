"""The serial protocol between a host and a board running a network (8N1 UART, binary).

Host to board:

- ``?`` (0x3F): identify. The board answers with :func:`identity` of its model.
- ``I`` (0x49) and then the image's ``in_features`` bytes, pixels in raster order with channels
  innermost (for a network whose input is bits, each byte's bit 0). The board answers with one
  byte, the class index, and shows it on its LEDs.

Other bytes between commands are ignored, so a host can resynchronize a board left inside an
image by sending ``in_features`` zero bytes, then ``?``. Replies come in request order.
"""
from __future__ import annotations

import numpy as np

from .errors import UserError
from .ir import IntegerModel

__all__ = ["IDENTIFY", "IMAGE", "IDENTITY_BYTES", "identity", "parse_identity", "encode_image"]

IDENTIFY = 0x3F
IMAGE = 0x49
MAGIC = b"HWG1"
#: Length of the identity reply: magic, model digest (4), input elements (3), classes (1).
IDENTITY_BYTES = len(MAGIC) + 4 + 3 + 1


def identity(model: IntegerModel) -> bytes:
    """The board's answer to ``?``: magic, the first 4 bytes of the model digest, sizes (little-endian)."""
    if model.in_features >= 1 << 24 or model.classes > 256:
        raise UserError(f"the board protocol carries at most 2**24 - 1 input bytes and 256 classes; "
                        f"the model has {model.in_features} and {model.classes}")
    return MAGIC + model.digest()[:4] + model.in_features.to_bytes(3, "little") + bytes([model.classes])


def parse_identity(reply: bytes) -> dict:
    """Decode an identity reply; a wrong length or magic raises :class:`UserError`."""
    if len(reply) != IDENTITY_BYTES or not reply.startswith(MAGIC):
        raise UserError(f"the board did not identify as hwgen (got {reply!r}); check the port, the baud rate "
                        "and that the board was programmed with an `hwgen build` bitstream")
    return {"digest": reply[4:8], "in_features": int.from_bytes(reply[8:11], "little"), "classes": reply[11]}


def encode_image(image: np.ndarray, model: IntegerModel) -> bytes:
    """The command that classifies ``image`` (uint8, the model's input shape)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.size != model.in_features:
        raise UserError(f"an image for this model is {model.in_features} uint8 values "
                        f"(shape {tuple(model.input_shape)}), not {image.size} of {image.dtype}")
    return bytes([IMAGE]) + image.tobytes()
