"""Masks whose positions fit a byte budget: the export's gap codes, counted in jit.

The export stores a sparse weight's positions as gap codes (:mod:`jaxcompress.export.sparse`):
walking the flat entries in row-major order, each kept entry costs one ``w``-bit code for the
zeros skipped before it, and every ``2^w - 1`` skipped zeros cost one more (a filler). Two
patterns with the same number of kept entries can need different numbers of codes, so a mask
that follows training (gradual pruning) may store larger than the pattern a plan was sized on.
:func:`cap_codes` prunes a mask's lowest-scored kept entries until its code count fits.

Removing a kept entry never adds a code (its gap and the next one merge: ``(a + b + 1) // M <=
a // M + b // M + 1``), so the count falls monotonically as more entries are pruned, and the
least pruning that fits is found by bisection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import invalid
from jaxcompress.pruning.masks import ranks

GAP_BITS = (2, 8)  # the export's gap code widths (export.sparse.GAP_WIDTHS), first and last


def check_gap_bits(gap_bits: int) -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` unless ``gap_bits`` is an integer width
  the export writes."""
  if (isinstance(gap_bits, (bool, np.bool_)) or not isinstance(gap_bits, (int, np.integer))
      or not GAP_BITS[0] <= gap_bits <= GAP_BITS[1]):
    raise invalid("gap_bits", gap_bits, f"an integer in [{GAP_BITS[0]}, {GAP_BITS[1]}] (the "
                  "export's gap code widths)")


def gap_code_count(keep: jax.Array, gap_bits: int) -> jax.Array:
  """Gap codes the export writes for this pattern at ``gap_bits``-bit codes (an int32 scalar).

  ``nnz + sum(g // (2^w - 1))`` over the zeros ``g`` skipped before each kept entry of the
  row-major flattened ``keep`` (bool, any shape).

  Raises:
    ConfigError: for ``gap_bits`` outside 2..8.
  """
  check_gap_bits(gap_bits)
  flat = jnp.reshape(keep, -1).astype(bool)
  index = jnp.arange(flat.size, dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(flat, index, -1))  # latest kept index at or before each entry
  previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), last[:-1]])
  fillers = (index - previous - 1) // ((1 << gap_bits) - 1)
  return jnp.sum(flat, dtype=jnp.int32) + jnp.sum(jnp.where(flat, fillers, 0), dtype=jnp.int32)


def cap_codes(keep: jax.Array, scores: jax.Array, gap_bits: int,
              max_codes: int | jax.Array) -> jax.Array:
  """``keep`` less its lowest-scored entries, the fewest that bring its gap codes to ``max_codes``.

  Args:
    keep: bool mask.
    scores: same shape; among kept entries the lowest scores go first (ties: lower flat index
      first, the order of :func:`~jaxcompress.pruning.masks.ranks`).
    gap_bits: code width ``w`` in 2..8.
    max_codes: the most codes allowed (``>= 0``).

  Returns:
    ``keep & (rank >= k)`` for the least ``k`` whose :func:`gap_code_count` is at most
    ``max_codes``: ``keep`` itself when it already fits.

  Raises:
    ConfigError: for ``gap_bits`` outside 2..8 or (outside ``jit`` only) ``max_codes < 0``.
  """
  check_gap_bits(gap_bits)
  if not isinstance(max_codes, jax.core.Tracer) and not np.all(np.asarray(max_codes) >= 0):
    raise invalid("max_codes", max_codes, ">= 0 (no pattern needs fewer codes)")
  if keep.size == 0:
    return keep
  rank = ranks(jnp.reshape(scores, -1)).reshape(keep.shape)
  fits = lambda k: gap_code_count(keep & (rank >= k), gap_bits) <= max_codes  # noqa: E731

  def bisect(_, bounds):  # invariant: fits(hi); lo == 0 or not fits(lo - 1)
    lo, hi = bounds
    mid = (lo + hi) // 2
    ok = fits(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  steps = int(keep.size).bit_length() + 1
  _, k = jax.lax.fori_loop(0, steps, bisect, (jnp.int32(0), jnp.int32(keep.size)))
  return keep & (rank >= k)
