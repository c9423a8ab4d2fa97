"""Sparse storage: round trips (hypothesis), the size of every encoding by hand, bad data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.errors import ConfigError
from jaxcompress.export import sparse
from jaxcompress.export.packing import unpack_bits


@st.composite
def tensors(draw):
  n = draw(st.integers(1, 400))
  density = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]))
  bits = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 32]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  nonzero = rng.random(n) < density
  if bits == 32:
    values = rng.standard_normal(n).astype(np.float32)
  else:
    values = rng.integers(0, 1 << bits, n)
  return values, nonzero, bits


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_decode_inverts_encode_and_the_smallest_form_wins(case):
  values, nonzero, bits = case
  enc = sparse.encode(values, nonzero, bits)
  got_nonzero, got_values = sparse.decode(enc, values.size, bits)
  if enc.encoding == "dense":
    np.testing.assert_array_equal(got_values, values)
  else:
    np.testing.assert_array_equal(got_nonzero, nonzero)
    np.testing.assert_array_equal(got_values, values[nonzero])
  assert enc.nbytes == min(sparse.sizes(nonzero, bits).values())


def test_sizes_and_gap_codes_by_hand():
  # 20 entries, non-zero at 0, 10, 11, 19: gaps 0, 9, 0, 7; 4-bit values.
  nonzero = np.zeros(20, bool)
  nonzero[[0, 10, 11, 19]] = True
  assert sparse.sizes(nonzero, 4) == {
      "dense": 10,  # 20 * 4 bits
      "bitmap": 3 + 2,  # ceil(20 / 8) + ceil(4 * 4 / 8)
      "gaps2": 3 + 2,  # M = 3: 4 entries + 3 + 2 fillers = 9 codes -> 18 bits
      "gaps3": 3 + 2,  # M = 7: 4 + 1 + 1 = 6 codes -> 18 bits
      "gaps4": 2 + 2,  # M = 15: 4 codes -> 16 bits
      "gaps5": 3 + 2, "gaps6": 3 + 2, "gaps7": 4 + 2, "gaps8": 4 + 2}
  assert sparse.gap_codes(nonzero, 2).tolist() == [0, 3, 3, 3, 0, 0, 3, 3, 1]
  assert sparse.gap_codes(nonzero, 3).tolist() == [0, 7, 2, 0, 7, 0]
  enc = sparse.encode(np.arange(20) % 16, nonzero, 4)
  assert (enc.encoding, enc.gap_bits, enc.codes, enc.nnz) == ("gaps", 4, 4, 4)
  assert unpack_bits(enc.positions, 4, 4).tolist() == [0, 9, 0, 7]
  assert unpack_bits(enc.values, 4, 4).tolist() == [0, 10, 11, 3]


def test_ties_and_full_tensors_prefer_dense_and_kmeans_never_dense():
  full = np.ones(10, bool)
  assert sparse.encode(np.arange(10) % 4, full, 2).encoding == "dense"
  half = np.arange(64) % 2 == 0  # 4-bit: dense 32 B; bitmap 8 + 16 = 24 B; gaps2 16 + 16
  enc = sparse.encode(np.arange(64) % 16, half, 4)
  assert enc.encoding == "bitmap" and enc.nbytes == 24
  dense_ok = sparse.encode(np.ones(16, int), np.arange(16) < 15, 8)
  assert dense_ok.encoding == "dense"
  assert sparse.encode(np.ones(16, int), np.arange(16) < 15, 8,
                       allow_dense=False).encoding != "dense"


def test_an_all_zero_kernel_round_trips_with_group_axes():
  # A conv kernel whose every input channel was removed (the layer before lost its outputs).
  nonzero = np.zeros((3, 3, 16, 16), bool)
  enc = sparse.encode(np.zeros(nonzero.shape, int), nonzero, 8, group_axes=(2,))
  assert enc.encoding != "nm" and enc.nnz == 0
  got_nonzero, got_values = sparse.decode(enc, nonzero.size, 8, shape=nonzero.shape)
  assert not got_nonzero.any() and got_values.size == 0


def test_blocks_by_hand():
  # A [2, 1, 2, 3] kernel: windows of 2 entries, 6 kernels; kernels 1 and 4 hold non-zero
  # entries (kernel 4 only in its second entry), 3-bit codes, zero's code 3.
  codes = np.full((2, 1, 2, 3), 3)
  codes[0, 0, 0, 1], codes[1, 0, 0, 1] = 5, 6  # kernel (in 0, out 1)
  codes[1, 0, 1, 1] = 0  # kernel (in 1, out 1)
  nonzero = codes != 3
  size = sparse.sizes(nonzero, 3)
  assert size["blocks"] == 1 + 2  # ceil(6 / 8) + ceil(2 kernels * 2 entries * 3 bits / 8)
  assert size["bitmap"] == 2 + 2  # ceil(12 / 8) + ceil(3 * 3 / 8)
  enc = sparse.encode(codes, nonzero, 3)
  assert (enc.encoding, enc.nnz, enc.nbytes) == ("blocks", 4, 3)
  assert unpack_bits(enc.positions, 1, 6).tolist() == [0, 1, 0, 0, 1, 0]
  # Row-major: window entry 0 of kernels 1 and 4, then entry 1 of both; the zero's code stored.
  assert unpack_bits(enc.values, 3, 4).tolist() == [5, 3, 6, 0]
  got_nonzero, got_values = sparse.decode(enc, codes.size, 3, shape=codes.shape)
  assert np.flatnonzero(got_nonzero).tolist() == [1, 4, 7, 10]
  assert got_values.tolist() == [5, 3, 6, 0]


@pytest.mark.parametrize("seed", range(6))
def test_blocks_round_trip_kernel_pruned_tensors(seed):
  rng = np.random.default_rng(seed)
  shape = [(3, 3, 8, 16), (5, 5, 3, 4), (2, 7, 5), (3, 1, 1, 9)][seed % 4]
  bits = [2, 3, 4, 8, 32, 3][seed]
  kept = rng.random(shape[-2:]) < rng.choice([0.05, 0.2, 0.5])
  nonzero = np.broadcast_to(kept, shape) & (rng.random(shape) < 0.9)  # zeros in kept kernels
  values = (rng.standard_normal(shape).astype(np.float32) if bits == 32
            else rng.integers(0, 1 << bits, shape))
  zero = 0 if bits == 32 else 1
  values = np.where(nonzero, values, zero)
  enc = sparse.encode(values, nonzero, bits)
  assert enc.nbytes == min(sparse.sizes(nonzero, bits).values())
  got_nonzero, got_values = sparse.decode(enc, values.size, bits, shape=shape)
  rebuilt = np.full(values.size, zero, values.dtype)
  rebuilt[got_nonzero] = got_values
  np.testing.assert_array_equal(rebuilt.reshape(shape), values)
  if shape == (3, 3, 8, 16) and bits < 32:  # 128 kernels of 9, 7-14 % kept: blocks win
    assert enc.encoding == "blocks"


def test_blocks_only_for_kernels_with_a_window_and_values_for_zeros():
  nonzero = np.zeros((1, 1, 8, 8), bool)
  nonzero[0, 0, 0, :2] = True
  assert "blocks" not in sparse.sizes(nonzero, 4)  # a 1x1 window: single entries already
  assert "blocks" not in sparse.sizes(np.zeros((8, 8), bool), 4)
  conv = np.zeros((3, 3, 4, 4), bool)
  conv[:, :, 0, 0] = True
  assert "blocks" in sparse.sizes(conv, 4)
  assert "blocks" not in sparse.sizes(conv, 4, allow_dense=False)  # k-means: no zero code


def test_float_values_are_stored_as_float32():
  x = np.array([0, 1.5, 0, 0, 0, 0, 0, 0, 0, 0, -2.25, 0], np.float32)
  enc = sparse.encode(x, x != 0, 32)
  assert enc.values.size == 8
  nonzero, values = sparse.decode(enc, x.size, 32)
  assert values.tolist() == [1.5, -2.25] and np.flatnonzero(nonzero).tolist() == [1, 10]


def test_corrupted_encodings_raise():
  nonzero = np.zeros(50, bool)
  nonzero[[3, 40]] = True
  enc = sparse.encode(np.full(50, 2), nonzero, 4)
  assert enc.encoding == "gaps"
  with pytest.raises(ConfigError, match="needs .* bytes, the artifact has"):
    sparse.decode(enc._replace(values=enc.values[:-1]), 50, 4)
  with pytest.raises(ConfigError, match="gap codes point at entry 40 of a tensor with 30"):
    sparse.decode(enc, 30, 4)
  bitmap = sparse.encode(np.full(16, 2), np.arange(16) % 2 == 0, 8)._replace(nnz=7)
  assert bitmap.encoding == "bitmap"
  with pytest.raises(ConfigError, match="needs"):
    sparse.decode(bitmap, 16, 8)
  bitmap = bitmap._replace(values=bitmap.values[:7])
  with pytest.raises(ConfigError, match="the positions mark 8 non-zero entries, the spec says 7"):
    sparse.decode(bitmap, 16, 8)
  conv = np.zeros((3, 3, 2, 2), bool)
  conv[:, :, 1, 0] = True
  blocks = sparse.encode(np.ones(conv.shape, int), conv, 4)
  assert blocks.encoding == "blocks" and blocks.nnz == 9
  with pytest.raises(ConfigError, match="blocks encoding needs a tensor of 3 axes or more"):
    sparse.decode(blocks, 36, 4, shape=(6, 6))
  with pytest.raises(ConfigError, match="the positions mark 1 kernels of 9 entries, the spec says "
                     "18 values"):
    sparse.decode(blocks._replace(nnz=18, values=np.zeros(9, np.uint8)), 36, 4, shape=conv.shape)
