"""Sub-byte packing: unsigned integer codes of 1..8 bits as a little-endian bitstream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, least significant bit
first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. So two 4-bit codes share a byte
(the first in the low nibble), four 2-bit codes likewise, eight 1-bit flags make a byte exactly as
``np.packbits(..., bitorder="little")`` does, and 3-, 5-, 6-, 7-bit codes run across byte
boundaries. ``n`` codes of ``bits`` bits take ``ceil(n * bits / 8)`` bytes; the unused high bits
of the last byte are zero.

Example:
  >>> pack_bits(np.array([1, 2, 3]), 4)
  array([33,  3], dtype=uint8)
  >>> unpack_bits(np.array([33, 3], np.uint8), 4, 3)
  array([1, 2, 3], dtype=uint8)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxcompress.errors import ConfigError, invalid

MIN_WIDTH, MAX_WIDTH = 1, 8


def check_width(bits: Any, field: str = "bits") -> int:
  """Returns ``bits`` as an int, or raises :class:`ConfigError` unless it is in 1..8."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      MIN_WIDTH <= bits <= MAX_WIDTH):
    raise invalid(field, bits, f"an integer in [{MIN_WIDTH}, {MAX_WIDTH}]")
  return int(bits)


def packed_size(count: int, bits: int) -> int:
  """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count * bits / 8)``."""
  return -(-count * bits // 8)


def pack_bits(codes: Any, bits: int) -> np.ndarray:
  """Packs unsigned integer codes into a ``bits``-wide little-endian bitstream.

  Args:
    codes: integers in ``[0, 2^bits)``, any shape (flattened in row-major order).
    bits: code width, 1..8.

  Returns:
    ``uint8[ceil(n * bits / 8)]``.

  Raises:
    ConfigError: for a width outside 1..8 or a code that does not fit in ``bits`` bits.
  """
  bits = check_width(bits)
  codes = np.asarray(codes).reshape(-1)
  if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
    raise ConfigError(f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got "
                      f"values in [{codes.min()}, {codes.max()}]")
  codes = codes.astype(np.uint8)
  if bits == 8:
    return codes.copy()
  # One row of `bits` bits per code, least significant first, then one flat bitstream.
  planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(data: Any, bits: int, count: int) -> np.ndarray:
  """Reads ``count`` codes of ``bits`` bits back from :func:`pack_bits`'s stream.

  Args:
    data: ``uint8`` bytes of the stream (a NumPy array or ``bytes``).
    bits: code width, 1..8.
    count: how many codes to read.

  Returns:
    ``uint8[count]``.

  Raises:
    ConfigError: if ``data`` holds fewer than ``ceil(count * bits / 8)`` bytes.
  """
  bits = check_width(bits)
  data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else (
      np.asarray(data, np.uint8).reshape(-1))
  need = packed_size(count, bits)
  if data.size < need:
    raise ConfigError(f"unpack_bits: {count} codes of {bits} bits need {need} bytes, got "
                      f"{data.size}; the stream is truncated")
  if bits == 8:
    return data[:count].copy()
  planes = np.unpackbits(data[:need], count=count * bits, bitorder="little")
  weights = (1 << np.arange(bits)).astype(np.uint8)
  return (planes.reshape(count, bits) * weights).sum(axis=1, dtype=np.uint8)
