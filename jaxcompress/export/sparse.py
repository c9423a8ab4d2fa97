"""Sparse storage of one tensor: where its non-zero entries are, and their values, packed.

A tensor of ``n`` entries, ``nnz`` of them non-zero, values stored at ``bits`` bits each (``32``:
raw float32), is written in whichever of these takes the fewest bytes:

- ``dense``: every value, ``ceil(n * bits / 8)`` bytes, no positions;
- ``nm`` (only when the caller names the tensor's reduction axes, ``group_axes``, and their
  flattened length is a multiple of ``M = 4``): the entries are taken in groups of 4 consecutive
  along the reduction axes (the other axes outermost, row-major); each group stores ``k`` slots,
  ``k`` the most non-zero entries any group holds (``k = 2`` for 2:4 sparsity), as ``k`` values
  and ``k`` 2-bit positions in the group (ascending): ``ceil(g * k * 2 / 8) +
  ceil(g * k * bits / 8)`` bytes for ``g`` groups. A group with fewer non-zero entries fills its
  slots with zero entries (their stored value is the zero's code). This is the compressed layout
  of NVIDIA's 2:4 sparse tensor cores (values plus 2-bit metadata per group of 4 along the
  reduction axis); only ``k < 4`` is offered;
- ``blocks`` (tensors of 3 axes or more whose leading axes hold more than one entry): a *kernel*
  is the entries sharing their index on the last two axes (a Conv kernel ``[*window, in, out]``'s
  window for one input and output channel). One bit per kernel (1 = some entry is non-zero,
  row-major over the last two axes), then every entry of the marked kernels, zeros included (their
  stored value is the zero's code), in row-major order: ``ceil(r / 8) + ceil(k * s * bits / 8)``
  for ``k`` of ``r`` kernels marked, ``s`` entries each. Whole pruned kernels
  (:func:`jaxcompress.pruning.kernels`) cost one bit where single entries cost one each. When the
  caller names the tensor's window axes (``window_axes``: a conv stacked by ``nn.scan``,
  ``[steps, kh, kw, in, out]``, has its window on axes 1 and 2), kernels over them are
  considered too: one bit per index of the other axes (row-major), the smaller of the two kept;
- ``bitmap``: one bit per entry (1 = non-zero, :mod:`.packing` order), then the non-zero values:
  ``ceil(n / 8) + ceil(nnz * bits / 8)``;
- ``gaps`` with ``w``-bit codes, ``w`` in 2..8 (relative indices, Han et al. 2016): walking the
  flat entries in row-major order, each non-zero entry is preceded by the number ``g`` of zeros
  skipped since the previous one. A gap of ``g >= M = 2^w - 1`` zeros is written as ``g // M``
  filler codes ``M`` (each means "skip ``M`` zeros", and carries no value) followed by the code
  ``g % M``. Zeros after the last non-zero entry need no code. Size
  ``ceil(codes * w / 8) + ceil(nnz * bits / 8)`` with ``codes = nnz + sum(g // M)``.

Ties go to the earlier of dense, nm, blocks, bitmap, gaps 2..8: at 2:4 with exactly two non-zero
entries in every group, nm and bitmap both spend 4 bits of positions per group and nm, the
hardware's layout, is kept. Values follow the row-major order of their entries, except ``nm``'s,
which follow the group order.

References:
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
  Quantization and Huffman Coding. ICLR 2016 (relative-index storage with filler entries).
  Mao, Han, Pool, Li, Liu, Wang, Dally. Exploring the Granularity of Sparsity in Convolutional
  Neural Networks. CVPR Workshops 2017 (coarser sparsity needs fewer index bits).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxcompress.errors import ConfigError, unknown
from jaxcompress.export.packing import pack_bits, packed_size, unpack_bits

ENCODINGS = ("dense", "nm", "blocks", "bitmap", "gaps")
NM_GROUP, NM_INDEX_BITS = 4, 2  # entries per nm group, bits of a position in it
GAP_WIDTHS = tuple(range(2, 9))
FLOAT_BITS = 32  # values stored as raw little-endian float32
HALF_BITS = 16  # values stored as raw little-endian float16 (float tensors only)
FLOAT_DTYPES = {FLOAT_BITS: "<f4", HALF_BITS: "<f2"}  # bits -> stored little-endian dtype


class Sparse(NamedTuple):
  """One encoded tensor.

  Invariants: ``positions`` is empty for ``dense``; ``gap_bits`` is 0 unless ``gaps``;
  ``codes`` is the number of gap codes (non-zero entries plus fillers) for ``gaps``, else 0;
  ``values`` holds ``nnz`` values (``n`` for ``dense``; the slots, ``groups * group_n``, for
  ``nm``) packed at ``bits``; ``group_n`` (slots per group) and ``group_axes`` (the reduction axes
  the groups run along) are set for ``nm`` only; ``window_axes`` for ``blocks`` over other axes
  than the leading ones (empty: every axis but the last two).
  """
  encoding: str
  gap_bits: int
  codes: int
  nnz: int
  positions: np.ndarray  # uint8
  values: np.ndarray  # uint8
  group_n: int = 0
  group_axes: tuple = ()
  window_axes: tuple = ()

  @property
  def nbytes(self) -> int:
    return int(self.positions.size + self.values.size)


def value_bytes(count: int, bits: int) -> int:
  """Bytes of ``count`` values at ``bits`` bits (``32``: float32, ``16``: float16)."""
  return bits // 8 * count if bits in FLOAT_DTYPES else packed_size(count, bits)


def gaps_of(nonzero: np.ndarray) -> np.ndarray:
  """Zeros skipped before each non-zero entry of a flat boolean array."""
  idx = np.flatnonzero(nonzero)
  return np.diff(idx, prepend=-1) - 1


def num_gap_codes(gaps: np.ndarray, gap_bits: int) -> int:
  """Codes needed for these gaps at ``gap_bits`` bits: one per entry plus ``g // (2^w - 1)``."""
  return int(gaps.size + np.sum(gaps // ((1 << gap_bits) - 1)))


def _grouped(a: np.ndarray, axes: tuple) -> np.ndarray:
  """``a`` with ``axes`` moved last (in order), as rows of :data:`NM_GROUP` entries."""
  rest = [i for i in range(a.ndim) if i not in axes]
  return np.transpose(a, rest + list(axes)).reshape(-1, NM_GROUP)


def nm_axes(shape: tuple, group_axes: Any) -> tuple | None:
  """``group_axes`` as non-negative ints if nm can encode this shape along them, else None."""
  if not group_axes or not all(-len(shape) <= int(a) < len(shape) for a in group_axes):
    return None
  axes = tuple(int(a) % len(shape) for a in group_axes)
  if len(set(axes)) != len(axes) or int(np.prod([shape[a] for a in axes])) % NM_GROUP:
    return None
  return axes


def kernel_grid(shape: tuple, window_axes: Any = None) -> tuple[int, int] | None:
  """``(entries per kernel, kernels)`` if ``blocks`` can encode this shape over these window axes
  (``None`` or empty: every axis but the last two), else None."""
  if window_axes:
    axes = window_axes_of(shape, window_axes)
    if axes is None:
      return None
    window = int(np.prod([shape[a] for a in axes]))
    return (window, int(np.prod(shape)) // window) if window > 1 else None
  if len(shape) < 3 or int(np.prod(shape[:-2])) < 2:
    return None
  return int(np.prod(shape[:-2])), int(np.prod(shape[-2:]))


def window_axes_of(shape: tuple, window_axes: Any) -> tuple | None:
  """``window_axes`` as distinct non-negative axes of ``shape`` with at least one axis outside
  them, or None."""
  if not all(-len(shape) <= int(a) < len(shape) for a in window_axes):
    return None
  axes = tuple(sorted(int(a) % len(shape) for a in window_axes))
  return axes if len(set(axes)) == len(axes) < len(shape) else None


def marked_kernels(nonzero: np.ndarray, window_axes: Any = None) -> np.ndarray:
  """``bool[kernels]``: which kernels of a ``blocks``-encodable pattern hold a non-zero entry
  (row-major over the axes outside the window, as ``blocks`` marks them)."""
  if window_axes:
    return nonzero.any(window_axes_of(nonzero.shape, window_axes)).reshape(-1)
  window, kernels = kernel_grid(nonzero.shape)
  return nonzero.reshape(window, kernels).any(0)


def _kept_entries(marked: np.ndarray, shape: tuple, window_axes: Any) -> np.ndarray:
  """Flat row-major mask of the entries of the marked kernels."""
  if window_axes:
    axes = window_axes_of(shape, window_axes)
    kernel_shape = [1 if a in axes else d for a, d in enumerate(shape)]
    return np.broadcast_to(marked.reshape(kernel_shape), shape).reshape(-1)
  return np.tile(marked, kernel_grid(shape)[0])


def sizes(nonzero: Any, bits: int, *, allow_dense: bool = True,
          group_axes: Any = None, window_axes: Any = None) -> dict[str, int]:
  """Bytes of every encoding of a tensor with this non-zero pattern and value width.

  Args:
    nonzero: boolean array of the tensor's shape.
    bits: value width (32: float32, 16: float16).
    allow_dense: include ``dense``, ``nm`` and ``blocks`` (not possible when a zero entry has no
      value code).
    group_axes: the tensor's reduction axes: include ``nm`` if they fit (see the module docstring).
    window_axes: the tensor's window axes: ``blocks`` also over them (the smaller of the two).

  Returns:
    ``{"dense": ..., "nm": ..., "blocks": ..., "bitmap": ..., "gaps2": ..., ..., "gaps8": ...}``.
  """
  nonzero = np.asarray(nonzero, bool)
  axes = nm_axes(nonzero.shape, group_axes) if allow_dense and nonzero.ndim else None
  out = {"dense": value_bytes(nonzero.size, bits)} if allow_dense else {}
  if axes is not None:
    rows = _grouped(nonzero, axes)
    k = int(rows.sum(1).max()) if rows.size else 0
    if 0 < k < NM_GROUP:  # an all-zero tensor has no slots to store: a gap code stream does
      out["nm"] = packed_size(rows.shape[0] * k, NM_INDEX_BITS) + value_bytes(rows.shape[0] * k,
                                                                              bits)
  found = _blocks(nonzero, bits, window_axes) if allow_dense else None
  if found is not None:
    out["blocks"] = found[0]
  nonzero = nonzero.reshape(-1)
  n, nnz = nonzero.size, int(nonzero.sum())
  gaps = gaps_of(nonzero)
  out["bitmap"] = packed_size(n, 1) + value_bytes(nnz, bits)
  for w in GAP_WIDTHS:
    out[f"gaps{w}"] = packed_size(num_gap_codes(gaps, w), w) + value_bytes(nnz, bits)
  return out


def _blocks(nonzero: np.ndarray, bits: int, window_axes: Any) -> tuple[int, tuple] | None:
  """``(bytes, window axes)`` of the smaller ``blocks`` encoding (the leading axes as window,
  ``()``, or ``window_axes``), or None where neither fits the shape."""
  candidates = [()]
  if window_axes:
    axes = window_axes_of(nonzero.shape, window_axes)
    if axes is not None and axes != tuple(range(nonzero.ndim - 2)):
      candidates.append(axes)
  best = None
  for axes in candidates:
    grid = kernel_grid(nonzero.shape, axes)
    if grid is not None:
      marked = marked_kernels(nonzero, axes)
      size = packed_size(marked.size, 1) + value_bytes(int(marked.sum()) * grid[0], bits)
      if best is None or size < best[0]:
        best = (size, axes)
  return best


def float_bytes(values: Any, bits: int = FLOAT_BITS) -> np.ndarray:
  """``values`` as little-endian float32 (``bits=32``) or float16 (``16``) bytes, ``uint8``."""
  return np.frombuffer(np.asarray(values, FLOAT_DTYPES[bits]).tobytes(), np.uint8).copy()


def float_values(data: np.ndarray, bits: int = FLOAT_BITS) -> np.ndarray:
  """The float32 values of :func:`float_bytes` ``data`` stored at ``bits``."""
  return np.frombuffer(data.tobytes(), FLOAT_DTYPES[bits]).astype(np.float32)


def _pack_values(values: np.ndarray, bits: int) -> np.ndarray:
  if bits in FLOAT_DTYPES:
    return float_bytes(values, bits)
  return pack_bits(values, bits)


def _unpack_values(data: np.ndarray, bits: int, count: int) -> np.ndarray:
  if bits in FLOAT_DTYPES:
    if data.size != bits // 8 * count:
      raise ConfigError(f"sparse values: {count} float{bits} values need {bits // 8 * count} "
                        f"bytes, got {data.size}")
    return float_values(data, bits)
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


def _nm_encode(values: np.ndarray, nonzero: np.ndarray, bits: int, axes: tuple) -> Sparse:
  rows, vals = _grouped(nonzero, axes), _grouped(values, axes)
  k = int(rows.sum(1).max())
  # Per group: its non-zero entries, then zero entries as fillers, k in all, in ascending order.
  slots = np.sort(np.argsort(~rows, axis=1, kind="stable")[:, :k], axis=1)
  kept = np.take_along_axis(vals, slots, 1)
  return Sparse("nm", 0, 0, int(slots.size), pack_bits(slots, NM_INDEX_BITS),
                _pack_values(kept.reshape(-1), bits), k, axes)


def _nm_decode(sparse: Sparse, shape: tuple, bits: int, where: str) -> tuple[np.ndarray,
                                                                              np.ndarray]:
  """``nm`` slots as (flat row-major mask, values in row-major order)."""
  n, k = int(np.prod(shape)), sparse.group_n
  axes = nm_axes(shape, sparse.group_axes)
  if axes is None or not 0 < k < NM_GROUP or sparse.nnz != n // NM_GROUP * k:
    raise ConfigError(f"{where}: nm encoding with {k} slots per group along axes "
                      f"{list(sparse.group_axes)} and {sparse.nnz} values does not fit shape "
                      f"{list(shape)}; the artifact is corrupted or does not match its spec")
  slots = unpack_bits(sparse.positions, NM_INDEX_BITS, sparse.nnz).astype(np.int64).reshape(-1, k)
  if np.any(np.diff(slots, axis=1) <= 0):
    raise ConfigError(f"{where}: nm positions within a group are not strictly ascending; the "
                      "artifact is corrupted")
  flat = _grouped(np.arange(n).reshape(shape), axes)  # row-major index of every grouped entry
  index = np.take_along_axis(flat, slots, 1).reshape(-1)
  order = np.argsort(index)
  nonzero = np.zeros(n, bool)
  nonzero[index] = True
  return nonzero, _unpack_values(sparse.values, bits, sparse.nnz)[order]


def encode(values: Any, nonzero: Any, bits: int, *, allow_dense: bool = True,
           group_axes: Any = None, window_axes: Any = None) -> Sparse:
  """Encodes a tensor in its smallest form.

  Args:
    values: the per-entry values, any shape: unsigned integer codes below ``2^bits``, or floats
      when ``bits`` is 32 (float32) or 16 (float16). Entries where ``nonzero`` is false are not
      stored (unless dense wins).
    nonzero: boolean array of ``values``' shape.
    bits: value width, 1..8, or 32 for float32, 16 for float16.
    allow_dense: consider ``dense``, ``nm`` and ``blocks``; pass ``False`` when zero entries have
      no valid value code (k-means indices of pruned weights).
    group_axes: the tensor's reduction axes, to consider ``nm`` (groups of 4 along them).
    window_axes: the tensor's window axes, to consider ``blocks`` over them.

  Returns:
    The :class:`Sparse` encoding with the fewest bytes (see :func:`sizes`).
  """
  values = np.asarray(values)
  nonzero = np.asarray(nonzero, bool)
  size = sizes(nonzero, bits, allow_dense=allow_dense or bool(nonzero.all()),
               group_axes=group_axes, window_axes=window_axes)
  best = min(size, key=size.get)  # dicts keep insertion order: ties go to the earlier form
  if best == "nm":
    return _nm_encode(values, nonzero, bits, nm_axes(nonzero.shape, group_axes))
  if best == "blocks":
    axes = _blocks(nonzero, bits, window_axes)[1]
    marked = marked_kernels(nonzero, axes)
    stored = _kept_entries(marked, nonzero.shape, axes)
    return Sparse("blocks", 0, 0, int(stored.sum()), pack_bits(marked, 1),
                  _pack_values(values.reshape(-1)[stored], bits), window_axes=axes)
  values, nonzero = values.reshape(-1), nonzero.reshape(-1)
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
                   codes: int = 0, kernels: int = 0) -> tuple[int, int]:
  """``(position bytes, value bytes)`` that a well-formed encoding must have (``kernels``: the
  tensor's kernel count, for ``blocks``)."""
  if encoding not in ENCODINGS:
    raise unknown("encoding", encoding, ENCODINGS)
  if encoding == "dense":
    return 0, value_bytes(n, bits)
  if encoding == "nm":
    return packed_size(nnz, NM_INDEX_BITS), value_bytes(nnz, bits)
  if encoding == "blocks":
    return packed_size(kernels, 1), value_bytes(nnz, bits)
  pos = packed_size(n, 1) if encoding == "bitmap" else packed_size(codes, gap_bits)
  return pos, value_bytes(nnz, bits)


def decode(sparse: Sparse, n: int, bits: int, *, where: str = "tensor",
           shape: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of :func:`encode`.

  Args:
    sparse: the encoding.
    n: number of entries of the tensor.
    bits: value width, as encoded.
    where: name of the tensor, for messages.
    shape: the tensor's shape (needed by ``nm`` and ``blocks``; default ``(n,)``).

  Returns:
    ``(nonzero, values)``: ``bool[n]`` and the ``nnz`` stored values in row-major order
    (``uint8`` codes, or ``float32`` for float ``bits``; all ``n`` for ``dense``).

  Raises:
    ConfigError: if the byte counts, the number of non-zero entries or a position disagree with
      ``n`` (a corrupted or mismatched artifact).
  """
  shape = (n,) if shape is None else tuple(shape)
  grid = kernel_grid(shape, sparse.window_axes) if sparse.encoding == "blocks" else None
  if sparse.encoding == "blocks" and (grid is None or int(np.prod(shape)) != n):
    need = (f"window axes {list(sparse.window_axes)} of more than one entry and an axis "
            "outside them" if sparse.window_axes else
            "a tensor of 3 axes or more with more than one entry per kernel")
    raise ConfigError(f"{where}: blocks encoding needs {need}, not shape {list(shape)}; the "
                      "artifact is corrupted or does not match its spec")
  pos_bytes, val_bytes = expected_bytes(sparse.encoding, n=n, nnz=sparse.nnz, bits=bits,
                                        gap_bits=sparse.gap_bits, codes=sparse.codes,
                                        kernels=grid[1] if grid else 0)
  if (sparse.positions.size, sparse.values.size) != (pos_bytes, val_bytes):
    raise ConfigError(f"{where}: {sparse.encoding} encoding of {n} entries ({sparse.nnz} non-zero, "
                      f"{bits}-bit values) needs {pos_bytes} + {val_bytes} bytes, the artifact has "
                      f"{sparse.positions.size} + {sparse.values.size}; it is corrupted or does "
                      "not match its spec")
  if sparse.encoding == "dense":
    return np.ones(n, bool), _unpack_values(sparse.values, bits, n)
  if sparse.encoding == "nm":
    return _nm_decode(sparse, shape, bits, where)
  if sparse.encoding == "blocks":
    window, kernels = grid
    marked = unpack_bits(sparse.positions, 1, kernels).astype(bool)
    if int(marked.sum()) * window != sparse.nnz:
      raise ConfigError(f"{where}: the positions mark {int(marked.sum())} kernels of {window} "
                        f"entries, the spec says {sparse.nnz} values; the artifact is corrupted")
    return (_kept_entries(marked, shape, sparse.window_axes),
            _unpack_values(sparse.values, bits, sparse.nnz))
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
