"""The weight image: what a board loads from its SPI flash into SPRAM at power-up.

Layout (``weights.bin``, written at :data:`FLASH_OFFSET` beside the bitstream):

- 4 bytes :data:`WEIGHT_IMAGE_MAGIC`;
- 4 bytes, the first of the model's digest (:meth:`hwgen.ir.IntegerModel.digest`);
- the payload: the network's 16-bit load words (:func:`hwgen.rtl.network.spram_load_image`),
  little-endian.

The board checks the magic (else: no image), the digest (else: another model's image) and the
payload's CRC-32/BZIP2 (polynomial 0x04C11DB7, MSB first, as the bits arrive from the flash)
against the value built into its bitstream (else: corrupt, or made for other folds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ir import IntegerModel
from .rtl.network import NetworkTop, spram_load_image

__all__ = ["WEIGHT_IMAGE_MAGIC", "FLASH_OFFSET", "CRC_POLYNOMIAL", "crc32_bzip2", "WeightImage", "weight_image",
           "loader_settings", "WAKE_SECONDS"]

WEIGHT_IMAGE_MAGIC = b"HWGW"
#: Where the image goes in the flash: 1 MiB, past any iCE40 bitstream (the UP5K's is 104 kB).
FLASH_OFFSET = 0x10_0000
CRC_POLYNOMIAL = 0x04C11DB7


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ CRC_POLYNOMIAL if crc & 0x8000_0000 else crc << 1) & 0xFFFF_FFFF
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc32_bzip2(data: bytes) -> int:
    """CRC-32/BZIP2 of ``data``: initial value and final XOR 0xFFFFFFFF, bits MSB first."""
    crc = 0xFFFF_FFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFF_FFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc ^ 0xFFFF_FFFF


@dataclass(frozen=True)
class WeightImage:
    """A network's weight image: the header the loader checks and the payload it writes to SPRAM."""

    header: bytes
    payload: bytes

    @property
    def crc(self) -> int:
        """CRC-32/BZIP2 of the payload, which the loader compares with what it read."""
        return crc32_bzip2(self.payload)

    @property
    def data(self) -> bytes:
        """The file's bytes: header, then payload."""
        return self.header + self.payload


def weight_image(model: IntegerModel, top: NetworkTop) -> WeightImage:
    """The image that loads ``top``'s SPRAM layers (``model`` is the network ``top`` was built from)."""
    words = np.asarray(spram_load_image(top), dtype="<u2")
    return WeightImage(WEIGHT_IMAGE_MAGIC + model.digest()[:4], words.tobytes())


#: How long the flash stays deselected after the wake command: its tRES1 (3 us on 25-series
#: flashes, the W25Q128 of the iCEBreaker among them) with a margin.
WAKE_SECONDS = 5e-6


def loader_settings(image: WeightImage, offset: int, clock_hz: float) -> dict:
    """The :class:`~hwgen.rtl.loader.SPIFlashLoader` parameters (besides the payload size) for
    ``image`` at flash address ``offset``, on a loader clocked at ``clock_hz``."""
    return {"header": image.header, "expected_crc": image.crc, "offset": offset,
            "wake_cycles": max(1, math.ceil(WAKE_SECONDS * clock_hz))}
