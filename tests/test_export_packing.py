"""Sub-byte packing: round trips for every width and odd lengths, the byte layout by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.errors import ConfigError
from jaxcompress.export.packing import pack_bits, packed_size, unpack_bits


@st.composite
def codes_and_width(draw):
  bits = draw(st.integers(1, 8))
  codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=67))
  return np.array(codes, np.int64), bits


@settings(max_examples=300, deadline=None)
@given(codes_and_width())
def test_unpack_inverts_pack_for_every_width_and_length(case):
  codes, bits = case
  packed = pack_bits(codes, bits)
  assert packed.dtype == np.uint8
  assert packed.size == -(-codes.size * bits // 8) == packed_size(codes.size, bits)
  np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size), codes)
  np.testing.assert_array_equal(unpack_bits(packed.tobytes(), bits, codes.size), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_width())
def test_stream_bits_are_the_codes_bits_least_significant_first(case):
  """Oracle: the stream written out bit by bit in Python."""
  codes, bits = case
  stream = [(int(c) >> k) & 1 for c in codes for k in range(bits)]
  stream += [0] * (-len(stream) % 8)
  expected = [sum(b << i for i, b in enumerate(stream[j:j + 8])) for j in range(0, len(stream), 8)]
  assert pack_bits(codes, bits).tolist() == expected


def test_layouts_by_hand():
  # Two 4-bit codes a byte, first in the low nibble: 0x21, then 0x03 with a zero high nibble.
  assert pack_bits([1, 2, 3], 4).tolist() == [0x21, 0x03]
  # Four 2-bit codes a byte: 3 + (0 << 2) + (1 << 4) + (2 << 6) = 147.
  assert pack_bits([3, 0, 1, 2], 2).tolist() == [147]
  # 3-bit codes cross bytes: 5 | 7 << 3 | 6 << 6 = 0b10_111_101 = 189, then 6 >> 2 = 1.
  assert pack_bits([5, 7, 6], 3).tolist() == [189, 1]
  # 1-bit flags are np.packbits little-endian.
  flags = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1])
  assert pack_bits(flags, 1).tolist() == np.packbits(flags, bitorder="little").tolist()
  assert pack_bits([255, 0, 7], 8).tolist() == [255, 0, 7]


@pytest.mark.parametrize("codes,bits", [([16], 4), ([-1], 4), ([4], 2), ([256], 8)])
def test_codes_that_do_not_fit_raise(codes, bits):
  with pytest.raises(ConfigError, match=f"codes must lie in \\[0, {(1 << bits) - 1}\\]"):
    pack_bits(np.array(codes), bits)


@pytest.mark.parametrize("bits", [0, 9, True, 2.0])
def test_bad_width_raises(bits):
  with pytest.raises(ConfigError, match="bits must be an integer in \\[1, 8\\]"):
    pack_bits([0], bits)


def test_truncated_stream_raises():
  packed = pack_bits(np.arange(7) % 8, 3)  # 21 bits -> 3 bytes
  with pytest.raises(ConfigError, match="7 codes of 3 bits need 3 bytes, got 2; the stream is "
                                        "truncated"):
    unpack_bits(packed[:2], 3, 7)
