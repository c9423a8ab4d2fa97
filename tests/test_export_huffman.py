"""Huffman coding of code streams: optimal lengths against brute force, a stream worked by hand,
round trips, the entropy bound, corrupted streams, and artifacts that store Huffman-coded
segments."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import (LayerTensor, decode_layer, encode_layer, huffman, load, read_spec,
                                recode, size_report)
from test_export_artifact import X8, ConvBN, convbn  # noqa: F401  (module-scoped fixture)


def _optimal_cost(counts):
  """Brute force: the least sum(count * length) over all prefix codes (Kraft sum <= 1)."""
  present = [c for c in counts if c]
  if len(present) == 1:
    return present[0]
  best = None
  for lengths in itertools.product(range(1, len(present)), repeat=len(present)):
    if sum(2.0 ** -l for l in lengths) <= 1:
      cost = sum(c * l for c, l in zip(present, lengths))
      best = cost if best is None else min(best, cost)
  return best


@pytest.mark.parametrize("seed", range(12))
def test_code_lengths_are_optimal_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(0, 40, int(rng.integers(2, 7)))
  counts[int(rng.integers(counts.size))] += 1  # at least one symbol occurs
  lengths = huffman.code_lengths(counts)
  assert np.all((lengths == 0) == (counts == 0))
  assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1
  assert int(np.dot(lengths, counts)) == _optimal_cost(counts.tolist())


def test_a_stream_worked_by_hand():
  # Counts 5, 2, 1, 1: merge 1 + 1, then 2 + 2, then 5 + 4 -> lengths 1, 2, 3, 3 (cost 15; the
  # only optimum: 2, 2, 2, 2 costs 18). Canonical codes 0, 10, 110, 111.
  symbols = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3])
  np.testing.assert_array_equal(huffman.code_lengths(np.bincount(symbols)), [1, 2, 3, 3])
  np.testing.assert_array_equal(huffman.canonical_codes([1, 2, 3, 3]), [0b0, 0b10, 0b110, 0b111])
  # Header: k - 1 = 3, then the lengths as nibbles, low first: 0x21, 0x33. Payload: 0 0 0 0 0
  # 10 10 110 111 = 000001010110111 (15 bits), one zero pad bit: 0x05, 0x6E.
  data = huffman.encode(symbols)
  np.testing.assert_array_equal(data, [3, 0x21, 0x33, 0x05, 0x6E])
  assert huffman.coded_size(symbols) == 5
  np.testing.assert_array_equal(huffman.decode(data, symbols.size), symbols)


def test_a_table_over_the_whole_alphabet_says_the_code_width():
  # The stream worked by hand as 3-bit codes: the table covers symbols 0..7, the four absent
  # ones with length 0 (two more zero bytes); decoding it as 4-bit codes fails.
  symbols = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3])
  data = huffman.encode(symbols, 8)
  np.testing.assert_array_equal(data, [7, 0x21, 0x33, 0, 0, 0x05, 0x6E])
  assert huffman.coded_size(symbols, 8) == 7
  np.testing.assert_array_equal(huffman.decode(data, symbols.size, 8), symbols)
  with pytest.raises(ConfigError, match="covers 8 symbols, the stream's codes 16"):
    huffman.decode(data, symbols.size, 16)
  with pytest.raises(ConfigError, match=r"must lie in \[0, 2\]"):
    huffman.encode(symbols, 3)


def test_one_distinct_symbol_takes_one_bit_each():
  data = huffman.encode(np.full(20, 5))
  # k = 6 symbols described (0..5): 1 + 3 table bytes, then 20 zero bits in 3 bytes.
  assert data.size == 1 + 3 + 3
  np.testing.assert_array_equal(huffman.decode(data, 20), np.full(20, 5))


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_and_the_entropy_bound(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 257))
  n = int(rng.integers(1, 5000))
  symbols = rng.choice(k, n, p=rng.dirichlet(np.full(k, 0.3)))
  data = huffman.encode(symbols)
  assert data.size == huffman.coded_size(symbols)
  np.testing.assert_array_equal(huffman.decode(data, n), symbols)
  # Payload bits within [n * H, n * (H + 1)), H the empirical order-0 entropy (NumPy).
  counts = np.bincount(symbols)
  p = counts[counts > 0] / n
  entropy = float(-(p * np.log2(p)).sum())
  payload = 8 * (data.size - 1 - (int(data[0]) + 2) // 2)
  assert n * entropy - 1e-9 <= payload < n * (entropy + 1) + 8


def _decode_bit_by_bit(data, count):
  """Reference decoder: the canonical codes from the table, read one bit at a time."""
  k = int(data[0]) + 1
  lengths = [(int(data[1 + s // 2]) >> 4 * (s % 2)) & 15 for s in range(k)]
  symbol_of, code, previous = {}, 0, 0
  for s in sorted((s for s in range(k) if lengths[s]), key=lambda s: (lengths[s], s)):
    code <<= lengths[s] - previous
    symbol_of[lengths[s], code], previous = s, lengths[s]
    code += 1
  bits = [int(b) >> (7 - i) & 1 for b in data[1 + (k + 1) // 2:] for i in range(8)]
  out, at = [], 0
  while len(out) < count:
    length = value = 0
    while (length, value) not in symbol_of:
      value, length, at = 2 * value + bits[at], length + 1, at + 1
    out.append(symbol_of[length, value])
  return out


@pytest.mark.parametrize("count", [1, 2, 31, 32, 33, 63, 64, 65, 1023, 1024, 1025, 40000])
def test_decode_reads_the_codes_one_after_another(count):
  # Codes of 1 to 12 bits; counts around the decoder's blocks of 32 codes.
  rng = np.random.default_rng(count)
  p = 0.5 ** np.arange(1, 14)
  symbols = rng.choice(13, count, p=p / p.sum())
  data = huffman.encode(symbols, 16)
  np.testing.assert_array_equal(huffman.decode(data, count, 16), symbols)
  np.testing.assert_array_equal(_decode_bit_by_bit(data, count), symbols)


def test_lengths_stay_within_fifteen_bits():
  counts = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584,
                     4181, 6765, 10946])  # Fibonacci: an unlimited Huffman code is 20 bits deep
  assert huffman.code_lengths(counts, limit=100).max() == counts.size - 1
  lengths = huffman.code_lengths(counts)
  assert lengths.max() <= huffman.MAX_LENGTH
  assert np.sum(2.0 ** -lengths) <= 1
  symbols = np.repeat(np.arange(counts.size), counts)
  np.random.default_rng(0).shuffle(symbols)
  np.testing.assert_array_equal(huffman.decode(huffman.encode(symbols), symbols.size), symbols)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:2], "table is truncated"),
    (lambda d: np.append(d, 0), "do not end with its"),
    (lambda d: d[:-1], "run past"),
    (lambda d: np.concatenate([[d[0], 0x11], d[2:]]), "prefix code"),
])
def test_damaged_streams_are_one_line_errors(damage, message):
  symbols = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3] * 3)
  with pytest.raises(ConfigError, match=message) as e:
    huffman.decode(damage(huffman.encode(symbols)), symbols.size, where="layer 'x'")
  assert "\n" not in str(e.value) and "layer 'x'" in str(e.value)
  with pytest.raises(ConfigError, match="cannot be coded"):
    huffman.decode(huffman.encode(symbols), 10**9)


def test_the_artifact_codes_its_skewed_streams_and_recodes_to_fixed_width(convbn, tmp_path):
  """The 60 %-pruned 4-bit ``body`` kernel's values are Huffman-coded; re-encoding with fixed
  widths (``compress=False``) gives the same model, and more bytes for those values."""
  spec = read_spec(convbn["out"])
  body = next(m for m in spec["layers"] if m["path"] == "params/body/kernel")
  assert body["huffman"] == ["values"]
  fixed = str(tmp_path / "fixed")
  recode(convbn["out"], fixed, compress=False)
  plain = next(m for m in read_spec(fixed)["layers"] if m["path"] == "params/body/kernel")
  assert "huffman" not in plain
  assert plain["segments"]["values"] == -(-body["nnz"] * 4 // 8)  # nnz 4-bit codes, packed
  assert body["segments"]["values"] < plain["segments"]["values"]
  want = np.asarray(convbn["loaded"].logits(X8))
  np.testing.assert_array_equal(np.asarray(load(fixed, ConvBN()).logits(X8)), want)
  again = str(tmp_path / "again")
  report = recode(fixed, again)
  assert report["total_bytes"] == sum(os.path.getsize(os.path.join(again, f))
                                      for f in os.listdir(again))
  assert report["total_bytes"] == size_report(convbn["out"])["total_bytes"]
  np.testing.assert_array_equal(np.asarray(load(again, ConvBN()).logits(X8)), want)


def _layer(codes, **kw):
  """An int layer of 3-bit codes (qmin -4, zero point 0) with per-channel scales."""
  return LayerTensor("params/w/kernel", "int", codes.astype(np.int32), 3, -4, None,
                     np.full(codes.shape[-1], 0.5, np.float32), None, None, None, None,
                     kw.get("group_axes"), 32)


@pytest.mark.parametrize("pattern", ["gaps", "nm"])
def test_position_and_value_streams_round_trip(pattern):
  rng = np.random.default_rng(0)
  shape = (3, 3, 16, 32) if pattern == "gaps" else (64, 32)  # a Dense kernel: no blocks
  # Skewed non-zero codes: -1 and 1 most of the time, the extremes rarely.
  values = rng.choice([-4, -3, -2, -1, 1, 2, 3], size=shape, p=[.02, .05, .13, .3, .3, .15, .05])
  if pattern == "gaps":  # 90 % zeros: gap-coded positions, mostly short gaps
    codes = np.where(rng.random(shape) < 0.1, values, 0)
    layer = _layer(codes)
  else:  # 2:4 along the inputs, mostly the first two of each group: skewed positions
    pairs = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], bool)
    groups = rng.choice(4, size=(16, 32), p=[.85, .05, .05, .05])
    keep = np.moveaxis(pairs[groups], -1, 1).reshape(shape)  # group g: inputs 4g..4g+3
    codes = np.where(keep, values, 0)
    layer = _layer(codes, group_axes=(0,))
  meta, segments = encode_layer(layer, huffman=True)
  assert meta["encoding"] == pattern
  assert sorted(meta["huffman"]) == ["positions", "values"]
  plain_meta, plain = encode_layer(layer)
  assert "huffman" not in plain_meta and plain_meta["encoding"] == pattern
  for name in ("positions", "values"):
    assert segments[name].size < plain[name].size
  back = decode_layer(meta, segments)
  np.testing.assert_array_equal(back.codes, codes)
  np.testing.assert_array_equal(decode_layer(plain_meta, plain).codes, codes)
  for bad in (["values", "values"], ["scale"], "values"):
    with pytest.raises(ConfigError, match="huffman lists"):
      decode_layer({**meta, "huffman": bad}, segments)


def test_a_changed_code_width_of_a_coded_stream_is_an_error():
  """A Huffman-coded stream decodes to the same codes whatever width the spec claims, so the
  table, which covers all ``2^bits`` codes, is what catches a changed ``bits``."""
  codes = np.where(np.random.default_rng(1).random((3, 3, 16, 32)) < 0.5, 1, 0)
  meta, segments = encode_layer(_layer(codes), huffman=True)
  assert "values" in meta["huffman"]
  for bits, message in ((2, "covers 8 symbols"), (4, "covers 8 symbols"),
                        (10**11, "code width of segment 'values'")):  # not a 2^(10^11) table
    with pytest.raises(ConfigError, match=message) as e:
      decode_layer({**meta, "bits": bits}, segments)
    assert "\n" not in str(e.value)

