"""Huffman coding of a stream of small unsigned integer codes (canonical, at most 15 bits a code).

Low-bit weights and gap codes are far from uniform: in a pruned 3-bit ResNet-20 the codes near
the zero point are several times as frequent as the extreme ones, and short gaps outnumber long
ones. Coding each symbol with a prefix code of its own length (Huffman 1952), as the third stage
of Deep Compression does, takes their order-0 entropy plus under a bit per symbol; fixed-width
codes take ``log2(alphabet)`` bits each.

Stream layout (``uint8``):

- one byte ``k - 1``: code lengths follow for symbols ``0 .. k-1`` (the alphabet: ``2^width``
  for a stream of ``width``-bit codes, so the stream itself says its width; otherwise the largest
  symbol plus one; ``k`` at most 256);
- ``ceil(k / 2)`` bytes: each symbol's code length, 4 bits (0: the symbol does not occur), two to a
  byte, the first in the low nibble;
- the codes of the symbols in order, most significant bit first, bytes filled from their most
  significant bit; the unused low bits of the last byte are zero.

Codes are canonical: ordered by (length, symbol), each the previous plus one, shifted left when
the length grows; the lengths alone define them. A stream of one distinct symbol codes it with a
single bit. Lengths above 15 are avoided by halving the counts (keeping each at least 1) and
building again.

Decoding is vectorized: the symbol starting at every bit position is looked up at once; five
pointer doublings give the jump over 32 codes from every position, a walk along those from bit 0
finds every 32nd code start and 31 array steps fill in the starts between, so the work is
``O(bits + count)`` array operations and a Python loop over ``count / 32`` steps.

References:
  Huffman. A Method for the Construction of Minimum-Redundancy Codes. Proc. IRE 1952.
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
  Quantization and Huffman Coding. ICLR 2016.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from jaxcompress.errors import ConfigError

MAX_LENGTH = 15  # longest code; lengths are stored in 4 bits
MAX_SYMBOLS = 256


def code_lengths(counts: Any, limit: int = MAX_LENGTH) -> np.ndarray:
  """Huffman code lengths (0 for a symbol with count 0), none above ``limit``.

  Args:
    counts: occurrences of each symbol, non-negative integers.
    limit: the longest code allowed (lengths over it: counts halved, built again).

  Returns:
    ``int64[len(counts)]``.
  """
  counts = np.asarray(counts, np.int64)
  lengths = np.zeros(counts.size, np.int64)
  present = np.flatnonzero(counts > 0)
  if present.size == 1:
    lengths[present] = 1
  if present.size <= 1:
    return lengths
  weights = counts.copy()
  while True:
    # Heap of (weight, tie, symbols): merging the two lightest adds one bit to each member.
    heap = [(int(weights[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    lengths[:] = 0
    tie = counts.size
    while len(heap) > 1:
      wa, _, a = heapq.heappop(heap)
      wb, _, b = heapq.heappop(heap)
      lengths[a + b] += 1
      heapq.heappush(heap, (wa + wb, tie, a + b))
      tie += 1
    if lengths.max() <= limit:
      return lengths
    weights[present] = np.maximum(weights[present] // 2, 1)


def canonical_codes(lengths: Any) -> np.ndarray:
  """The canonical code of each symbol for these lengths (0 where the length is 0)."""
  lengths = np.asarray(lengths, np.int64)
  codes = np.zeros(lengths.size, np.int64)
  code, previous = 0, 0
  for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
    code <<= int(lengths[s]) - previous
    codes[s], previous = code, int(lengths[s])
    code += 1
  return codes


def _table_bytes(k: int) -> int:
  return 1 + (k + 1) // 2


def _counts(symbols: np.ndarray, alphabet: int | None) -> np.ndarray:
  """How often each symbol of the alphabet (``None``: up to the largest) occurs."""
  limit = MAX_SYMBOLS if alphabet is None else alphabet
  if not 1 <= limit <= MAX_SYMBOLS:
    raise ConfigError(f"huffman: alphabet is {alphabet}; it must lie in [1, {MAX_SYMBOLS}]")
  if not symbols.size:
    raise ConfigError("huffman: nothing to encode (an empty stream)")
  if symbols.min() < 0 or symbols.max() >= limit:
    raise ConfigError(f"huffman: symbols must lie in [0, {limit - 1}], got "
                      f"[{symbols.min()}, {symbols.max()}]")
  return np.bincount(symbols, minlength=alphabet or 1)


def coded_size(symbols: Any, alphabet: int | None = None) -> int:
  """Bytes :func:`encode` writes for ``symbols`` (without writing them)."""
  counts = _counts(np.asarray(symbols).reshape(-1).astype(np.int64), alphabet)
  lengths = code_lengths(counts)
  return _table_bytes(counts.size) + -(-int(np.dot(lengths, counts)) // 8)


def encode(symbols: Any, alphabet: int | None = None) -> np.ndarray:
  """Huffman-codes a stream of integers in ``[0, alphabet)`` (layout: the module docstring).

  Args:
    symbols: the integers.
    alphabet: how many symbols the table covers (``2^width`` for ``width``-bit codes; at most
      256); ``None``: up to the largest symbol.

  Raises:
    ConfigError: for an empty stream, a symbol outside ``[0, alphabet)``, or an alphabet outside
      ``[1, 256]``.
  """
  symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
  counts = _counts(symbols, alphabet)
  lengths = code_lengths(counts)
  codes = canonical_codes(lengths)
  table = np.zeros(2 * -(-counts.size // 2), np.uint8)
  table[:counts.size] = lengths
  head = np.concatenate([[counts.size - 1], table[0::2] | (table[1::2] << 4)]).astype(np.uint8)
  size, code = lengths[symbols], codes[symbols]
  start = np.cumsum(size) - size
  bits = np.zeros(int(size.sum()), np.uint8)
  for j in range(int(size.max())):  # bit j of every code at least j + 1 long
    has = size > j
    bits[start[has] + j] = (code[has] >> (size[has] - 1 - j)) & 1
  return np.concatenate([head, np.packbits(bits)])


def decode(data: Any, count: int, alphabet: int | None = None, *,
           where: str = "stream") -> np.ndarray:
  """Reads ``count`` symbols back from :func:`encode`'s bytes.

  Args:
    data: the stream's bytes (``uint8`` array or ``bytes``), exactly as :func:`encode` wrote.
    count: how many symbols it holds (at least 1).
    alphabet: the alphabet :func:`encode` was given, checked against the table; ``None``: any.
    where: what the stream is, for messages.

  Returns:
    ``int64[count]``.

  Raises:
    ConfigError: if the table is not for ``alphabet``, the lengths do not form a prefix code, a
      code is not in the table, the codes run past the data, or bytes are left over (a corrupted
      or mismatched stream).
  """
  data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else (
      np.asarray(data, np.uint8).reshape(-1))
  bad = lambda why: ConfigError(f"{where}: {why}; the artifact is corrupted")  # noqa: E731
  if data.size < 1 or data.size < _table_bytes(int(data[0]) + 1):
    raise bad("the Huffman table is truncated")
  k = int(data[0]) + 1
  if alphabet is not None and k != alphabet:
    raise bad(f"the Huffman table covers {k} symbols, the stream's codes {alphabet}")
  nibbles = data[1:_table_bytes(k)]
  lengths = np.stack([nibbles & 15, nibbles >> 4], 1).reshape(-1)[:k].astype(np.int64)
  if not lengths.any() or np.sum(2.0 ** -lengths[lengths > 0]) > 1:
    raise bad("the Huffman code lengths do not form a prefix code")
  longest = int(lengths.max())
  codes = canonical_codes(lengths)
  # table[w]: the symbol whose code starts the `longest`-bit window w, and its length (0: none).
  symbol_of = np.zeros(1 << longest, np.uint8)
  length_of = np.zeros(1 << longest, np.uint8)
  for s in np.flatnonzero(lengths):
    lo = int(codes[s]) << (longest - int(lengths[s]))
    hi = lo + (1 << (longest - int(lengths[s])))
    symbol_of[lo:hi], length_of[lo:hi] = s, lengths[s]
  bits = np.unpackbits(data[_table_bytes(k):])
  n = bits.size
  if not 1 <= count <= n:  # every code takes at least one bit
    raise bad(f"{count} symbols cannot be coded in {n} bits")
  index = np.int32 if n < 2**31 - 2 * MAX_LENGTH else np.int64  # bit positions
  padded = np.concatenate([bits, np.zeros(longest, np.uint8)])
  window = np.zeros(n, np.int32)
  for j in range(longest):
    window <<= 1
    window |= padded[j:j + n]
  length = length_of[window]
  # jump[p]: where the next code starts if one starts at p (n: past the end or no code at p).
  jump = np.arange(n + 1, dtype=index)
  jump[:n] += length
  np.minimum(jump, n, out=jump)
  jump[:n][length == 0] = n
  # starts[i] = jump^i(0): every L-th (L = 2^doublings) by walking jump^L from 0, then L - 1
  # single jumps from each of them (doubling until all of them are known costs log2(count)
  # passes over every bit position, more than the walk).
  doublings = 5
  far = jump
  for _ in range(doublings):
    far = far[far]
  anchors = np.zeros(-(-count >> doublings), index)
  for i in range(1, anchors.size):
    anchors[i] = far[anchors[i - 1]]
  del far
  starts = np.empty((1 << doublings, anchors.size), index)
  starts[0] = anchors
  for j in range(1, 1 << doublings):
    starts[j] = jump[starts[j - 1]]
  starts = starts.T.reshape(-1)[:count]
  if np.any(starts >= n):
    raise bad(f"the Huffman codes of {count} symbols run past the stream's {n} bits")
  if np.any(length[starts] == 0):
    raise bad("a Huffman code is not in the table")
  end = int(starts[-1] + length[starts[-1]])
  if end > n or -(-end // 8) != -(-n // 8) or padded[end:n].any():
    raise bad(f"the Huffman stream's {n} bits do not end with its {count} codes")
  return symbol_of[window[starts]].astype(np.int64)
