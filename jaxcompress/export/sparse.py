"""Sparse storage of one tensor: where its non-zero entries are, and their values, packed.

A tensor of ``n`` entries, ``nnz`` of them non-zero, values stored at ``bits`` bits each (``32``:
raw float32), is written in whichever of these takes the fewest bytes:

- ``dense``: every value, ``ceil(n * bits / 8)`` bytes, no positions;
- ``bitmap``: one bit per entry (1 = non-zero, :mod:`.packing` order), then the non-zero values:
  ``ceil(n / 8) + ceil(nnz * bits / 8)``;
- ``gaps`` with ``w``-bit codes, ``w`` in 2..8 (relative indices, Han et al. 2016): walking the
  flat entries in row-major order, each non-zero entry is preceded by the number ``g`` of zeros
  skipped since the previous one. A gap of ``g >= M = 2^w - 1`` zeros is written as ``g // M``
  filler codes ``M`` (each means "skip ``M`` zeros", and carries no value) followed by the code
  ``g % M``. Zeros after the last non-zero entry need no code. Size
  ``ceil(codes * w / 8) + ceil(nnz * bits / 8)`` with ``codes = nnz + sum(g // M)``.

Ties go to the earlier of dense, bitmap, gaps 2..8. Values always follow the row-major order of
their entries.

References:
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
  Quantization and Huffman Coding. ICLR 2016 (relative-index storage with filler entries).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxcompress.errors import ConfigError, unknown
from jaxcompress.export.packing import pack_bits, packed_size, unpack_bits

ENCODINGS = ("dense", "bitmap", "gaps")
GAP_WIDTHS = tuple(range(2, 9))
FLOAT_BITS = 32  # values stored as raw little-endian float32


class Sparse(NamedTuple):
  """One encoded tensor.

  Invariants: ``positions`` is empty for ``dense``; ``gap_bits`` is 0 unless ``gaps``;
  ``codes`` is the number of gap codes (non-zero entries plus fillers) for ``gaps``, else 0;
  ``values`` holds ``nnz`` values (``n`` for ``dense``) packed at ``bits``.
  """
  encoding: str
  gap_bits: int
  codes: int
  nnz: int
  positions: np.ndarray  # uint8
  values: np.ndarray  # uint8

  @property
  def nbytes(self) -> int:
    return int(self.positions.size + self.values.size)


def value_bytes(count: int, bits: int) -> int:
  """Bytes of ``count`` values at ``bits`` bits (``32``: float32)."""
  return 4 * count if bits == FLOAT_BITS else packed_size(count, bits)


def gaps_of(nonzero: np.ndarray) -> np.ndarray:
  """Zeros skipped before each non-zero entry of a flat boolean array."""
  idx = np.flatnonzero(nonzero)
  return np.diff(idx, prepend=-1) - 1


def num_gap_codes(gaps: np.ndarray, gap_bits: int) -> int:
  """Codes needed for these gaps at ``gap_bits`` bits: one per entry plus ``g // (2^w - 1)``."""
  return int(gaps.size + np.sum(gaps // ((1 << gap_bits) - 1)))


def sizes(nonzero: Any, bits: int, *, allow_dense: bool = True) -> dict[str, int]:
  """Bytes of every encoding of a tensor with this non-zero pattern and value width.

  Args:
    nonzero: boolean array, any shape.
    bits: value width (32: float32).
    allow_dense: include ``dense`` (not possible when a zero entry has no value code).

  Returns:
    ``{"dense": ..., "bitmap": ..., "gaps2": ..., ..., "gaps8": ...}``.
  """
  nonzero = np.asarray(nonzero, bool).reshape(-1)
  n, nnz = nonzero.size, int(nonzero.sum())
  gaps = gaps_of(nonzero)
  out = {"dense": value_bytes(n, bits)} if allow_dense else {}
  out["bitmap"] = packed_size(n, 1) + value_bytes(nnz, bits)
  for w in GAP_WIDTHS:
    out[f"gaps{w}"] = packed_size(num_gap_codes(gaps, w), w) + value_bytes(nnz, bits)
  return out


def _pack_values(values: np.ndarray, bits: int) -> np.ndarray:
  if bits == FLOAT_BITS:
    return np.frombuffer(values.astype("<f4").tobytes(), np.uint8).copy()
  return pack_bits(values, bits)


def _unpack_values(data: np.ndarray, bits: int, count: int) -> np.ndarray:
  if bits == FLOAT_BITS:
    if data.size != 4 * count:
      raise ConfigError(f"sparse values: {count} float32 values need {4 * count} bytes, got "
                        f"{data.size}")
    return np.frombuffer(data.tobytes(), "<f4").astype(np.float32)
  return unpack_bits(data, bits, count)


def gap_codes(nonzero: np.ndarray, gap_bits: int) -> np.ndarray:
  """The gap code stream of a flat boolean array (see the module docstring)."""
  m = (1 << gap_bits) - 1
  gaps = gaps_of(nonzero)
  fillers = gaps // m
  # Entry i becomes fillers[i] codes M followed by gaps[i] % M.
  out = np.full(int(gaps.size + fillers.sum()), m, np.uint8)
  ends = np.cumsum(fillers + 1) - 1
  out[ends] = gaps % m
  return out


def gap_positions(codes: np.ndarray, gap_bits: int) -> np.ndarray:
  """Flat indices of the non-zero entries a gap code stream describes."""
  m = (1 << gap_bits) - 1
  codes = codes.astype(np.int64)
  entry = codes != m
  advance = codes + entry  # a filler skips M zeros; an entry skips its gap, then itself
  start = np.cumsum(advance) - advance
  return (start + codes)[entry]


def encode(values: Any, nonzero: Any, bits: int, *, allow_dense: bool = True) -> Sparse:
  """Encodes a tensor in its smallest form.

  Args:
    values: the per-entry values, any shape: unsigned integer codes below ``2^bits``, or floats
      when ``bits == 32``. Entries where ``nonzero`` is false are not stored (unless dense wins).
    nonzero: boolean array of ``values``' shape.
    bits: value width, 1..8, or 32 for float32.
    allow_dense: consider ``dense``; pass ``False`` when zero entries have no valid value code
      (k-means indices of pruned weights).

  Returns:
    The :class:`Sparse` encoding with the fewest bytes (see :func:`sizes`).
  """
  values = np.asarray(values).reshape(-1)
  nonzero = np.asarray(nonzero, bool).reshape(-1)
  size = sizes(nonzero, bits, allow_dense=allow_dense or bool(nonzero.all()))
  best = min(size, key=size.get)  # dicts keep insertion order: ties go to the earlier form
  empty = np.zeros(0, np.uint8)
  if best == "dense":
    return Sparse("dense", 0, 0, values.size, empty, _pack_values(values, bits))
  kept = _pack_values(values[nonzero], bits)
  nnz = int(nonzero.sum())
  if best == "bitmap":
    return Sparse("bitmap", 0, 0, nnz, pack_bits(nonzero, 1), kept)
  w = int(best[len("gaps"):])
  codes = gap_codes(nonzero, w)
  return Sparse("gaps", w, int(codes.size), nnz, pack_bits(codes, w), kept)


def expected_bytes(encoding: str, *, n: int, nnz: int, bits: int, gap_bits: int = 0,
                   codes: int = 0) -> tuple[int, int]:
  """``(position bytes, value bytes)`` that a well-formed encoding must have."""
  if encoding not in ENCODINGS:
    raise unknown("encoding", encoding, ENCODINGS)
  if encoding == "dense":
    return 0, value_bytes(n, bits)
  pos = packed_size(n, 1) if encoding == "bitmap" else packed_size(codes, gap_bits)
  return pos, value_bytes(nnz, bits)


def decode(sparse: Sparse, n: int, bits: int, *, where: str = "tensor") -> tuple[np.ndarray,
                                                                                   np.ndarray]:
  """Inverse of :func:`encode`.

  Args:
    sparse: the encoding.
    n: number of entries of the tensor.
    bits: value width, as encoded.
    where: name of the tensor, for messages.

  Returns:
    ``(nonzero, values)``: ``bool[n]`` and the ``nnz`` stored values in row-major order
    (``uint8`` codes, or ``float32`` for ``bits == 32``; all ``n`` for ``dense``).

  Raises:
    ConfigError: if the byte counts, the number of non-zero entries or a position disagree with
      ``n`` (a corrupted or mismatched artifact).
  """
  pos_bytes, val_bytes = expected_bytes(sparse.encoding, n=n, nnz=sparse.nnz, bits=bits,
                                        gap_bits=sparse.gap_bits, codes=sparse.codes)
  if (sparse.positions.size, sparse.values.size) != (pos_bytes, val_bytes):
    raise ConfigError(f"{where}: {sparse.encoding} encoding of {n} entries ({sparse.nnz} non-zero, "
                      f"{bits}-bit values) needs {pos_bytes} + {val_bytes} bytes, the artifact has "
                      f"{sparse.positions.size} + {sparse.values.size}; it is corrupted or does "
                      "not match its spec")
  if sparse.encoding == "dense":
    return np.ones(n, bool), _unpack_values(sparse.values, bits, n)
  if sparse.encoding == "bitmap":
    nonzero = unpack_bits(sparse.positions, 1, n).astype(bool)
  else:
    idx = gap_positions(unpack_bits(sparse.positions, sparse.gap_bits, sparse.codes),
                        sparse.gap_bits)
    if idx.size and idx[-1] >= n:
      raise ConfigError(f"{where}: gap codes point at entry {int(idx[-1])} of a tensor with {n} "
                        "entries; the artifact is corrupted or does not match its spec")
    nonzero = np.zeros(n, bool)
    nonzero[idx] = True
  if int(nonzero.sum()) != sparse.nnz:
    raise ConfigError(f"{where}: the positions mark {int(nonzero.sum())} non-zero entries, the "
                      f"spec says {sparse.nnz}; the artifact is corrupted")
  return nonzero, _unpack_values(sparse.values, bits, sparse.nnz)
