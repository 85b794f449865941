"""The serial protocol between a host and a board running a network (8N1 UART, binary).

Host to board:

- ``?`` (0x3F): identify. The board answers with :func:`identity` of its model and the state of
  its weights (``WEIGHTS_*``: in the bitstream or loaded from flash and checked, still loading,
  or why they could not be loaded).
- ``I`` (0x49) and then the image's ``in_features`` bytes, pixels in raster order with channels
  innermost (for a network whose input is bits, each byte's bit 0). The board answers with one
  byte, the class index, and shows it on its LEDs. A board whose weights are not ready takes the
  image's bytes and answers nothing (ask ``?`` why); its LEDs blink while its weights are bad.

Other bytes between commands are ignored, so a host can resynchronize a board left inside an
image by sending ``in_features`` zero bytes, then ``?``. Replies come in request order.
"""
from __future__ import annotations

import numpy as np

from .errors import UserError
from .ir import IntegerModel

__all__ = ["IDENTIFY", "IMAGE", "IDENTITY_BYTES", "identity", "parse_identity", "encode_image", "WEIGHTS_READY",
           "WEIGHTS_LOADING", "WEIGHTS_MISSING", "WEIGHTS_OTHER_MODEL", "WEIGHTS_CORRUPT", "WEIGHTS_STATES"]

IDENTIFY = 0x3F
IMAGE = 0x49
#: Version 2 of the reply added the weights' state.
MAGIC = b"HWG2"
#: Length of the identity reply: magic, model digest (4), input elements (3), classes (1), weights (1).
IDENTITY_BYTES = len(MAGIC) + 4 + 3 + 1 + 1

#: The weights' state in the identity reply: ready (in the bitstream, or loaded and checked)...
WEIGHTS_READY = 0
#: ... being read from the SPI flash (a few milliseconds after configuration) ...
WEIGHTS_LOADING = 1
#: ... or not loaded, and why: the flash holds no weight image at the offset, ...
WEIGHTS_MISSING = 2
#: ... the image there belongs to another model, ...
WEIGHTS_OTHER_MODEL = 3
#: ... or its contents do not match this build (corrupt, or written for other folds).
WEIGHTS_CORRUPT = 4
WEIGHTS_STATES = {
    WEIGHTS_READY: "ready",
    WEIGHTS_LOADING: "loading from flash",
    WEIGHTS_MISSING: "no weight image in the flash",
    WEIGHTS_OTHER_MODEL: "the flash holds another model's weight image",
    WEIGHTS_CORRUPT: "the flash's weight image does not match this build (corrupt, or built for other folds)",
}


def identity(model: IntegerModel, weights: int = WEIGHTS_READY) -> bytes:
    """The board's answer to ``?``: magic, the first 4 bytes of the model digest, sizes (little-endian),
    and the weights' state."""
    if model.in_features >= 1 << 24 or model.classes > 256:
        raise UserError(f"the board protocol carries at most 2**24 - 1 input bytes and 256 classes; "
                        f"the model has {model.in_features} and {model.classes}")
    return (MAGIC + model.digest()[:4] + model.in_features.to_bytes(3, "little") + bytes([model.classes])
            + bytes([weights]))


def parse_identity(reply: bytes) -> dict:
    """Decode an identity reply; a wrong length or magic raises :class:`UserError`."""
    if len(reply) != IDENTITY_BYTES or not reply.startswith(MAGIC):
        raise UserError(f"the board did not identify as hwgen (got {reply!r}); check the port, the baud rate "
                        "and that the board was programmed with a bitstream from this version of `hwgen build`")
    weights = reply[12]
    return {"digest": reply[4:8], "in_features": int.from_bytes(reply[8:11], "little"), "classes": reply[11],
            "weights": weights, "weights_state": WEIGHTS_STATES.get(weights, f"unknown state {weights}")}


def encode_image(image: np.ndarray, model: IntegerModel) -> bytes:
    """The command that classifies ``image`` (uint8, the model's input shape)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.size != model.in_features:
        raise UserError(f"an image for this model is {model.in_features} uint8 values "
                        f"(shape {tuple(model.input_shape)}), not {image.size} of {image.dtype}")
    return bytes([IMAGE]) + image.tobytes()
