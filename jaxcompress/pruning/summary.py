"""How sparse a parameter tree is: :func:`sparsity` (one jit-able number) and :func:`summary`
(per leaf and in total, on the host), both counting zeros with the one counter of this module.

Both count only the leaves that pruning with the same rules would prune (see
:func:`~jaxcompress.pruning.select.select`): a zero bias, or any zero in a leaf that is never
pruned, shows in its own row of the summary but is not counted as pruned.

Example:
  >>> params = {"dense": {"kernel": np.array([[1.0, 0.0], [0.0, 2.0]]), "bias": np.zeros(2)}}
  >>> float(sparsity(params))
  0.5
  >>> print(summary(params).table())
  | path             | shape  | size | nonzero | sparsity | selected |
  | ---------------- | ------ | ---: | ------: | -------: | -------- |
  | dense/bias       | (2,)   |    2 |       0 |   1.0000 | no       |
  | dense/kernel     | (2, 2) |    4 |       2 |   0.5000 | yes      |
  | total (selected) |        |    4 |       2 |   0.5000 |          |
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.pruning.select import select
from jaxcompress.rules import Rule
from jaxcompress.tables import markdown_table


def _zeros(leaf: Any) -> Any:
  """Exact zeros (``-0.0`` included) in one leaf: the one zero counter of the library.

  A ``jax.Array`` (or a tracer, under ``jit``) is counted by JAX; anything else by NumPy on the
  host, in its own dtype (a float64 value too small for float32 is not counted as zero).
  """
  x = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
  return (x == 0).sum()


def sparsity(tree: Any, rules: Sequence[Rule] | None = None) -> jax.Array:
  """Fraction of exact zeros over the leaves of ``tree`` that pruning with ``rules`` prunes.

  Jit-able (the selection is static, the count is array math); :meth:`Summary.sparsity` counts
  the same entries.

  Args:
    tree: any pytree of arrays (parameters or masks).
    rules: the leaf selection, as for :func:`~jaxcompress.pruning.select.select` (``None``:
      every floating-point leaf of rank >= 2 but a ``bias`` or ``scale``).

  Returns:
    A float32 scalar in ``[0, 1]``; 0 when no leaf (or only empty leaves) is selected.

  Raises:
    ConfigError: for a bad rule.
  """
  sel = select(tree, rules, warn_unused=False)
  leaves = sel.pick(sel.leaves)
  zeros = sum((_zeros(x) for x in leaves), jnp.zeros((), jnp.int32))
  # float32 under x64 too (int64 counts would divide in float64)
  return jnp.asarray(zeros, jnp.float32) / max(1, sum(int(np.size(x)) for x in leaves))


class LeafSummary(NamedTuple):
  """One leaf: its path, shape, entry count, count of non-zero entries, whether it is pruned."""
  path: str
  shape: tuple[int, ...]
  size: int
  nonzero: int
  selected: bool = True

  @property
  def sparsity(self) -> float:
    """Fraction of entries that are exactly zero (0 for an empty leaf)."""
    return (self.size - self.nonzero) / self.size if self.size else 0.0


class Summary(NamedTuple):
  """Every leaf of a tree, in tree order; totals over the selected (pruned) leaves only."""
  leaves: tuple[LeafSummary, ...]

  @property
  def size(self) -> int:
    """Entries in the selected leaves."""
    return sum(leaf.size for leaf in self.leaves if leaf.selected)

  @property
  def nonzero(self) -> int:
    """Non-zero entries in the selected leaves."""
    return sum(leaf.nonzero for leaf in self.leaves if leaf.selected)

  @property
  def sparsity(self) -> float:
    """Fraction of the selected leaves' entries that are exactly zero (0 if none selected).

    The zeros and entries :func:`sparsity` counts, divided in float64: ``float(sparsity(tree,
    rules))`` is this value rounded to float32 (up to ``2**24`` entries, which float32 counts
    exactly).
    """
    return (self.size - self.nonzero) / self.size if self.size else 0.0

  def table(self) -> str:
    """A Markdown table: one row per leaf (all leaves), then the total over selected ones."""
    rows = [(leaf.path, str(leaf.shape), leaf.size, leaf.nonzero, f"{leaf.sparsity:.4f}",
             "yes" if leaf.selected else "no") for leaf in self.leaves]
    rows.append(("total (selected)", "", self.size, self.nonzero, f"{self.sparsity:.4f}", ""))
    return markdown_table(("path", "shape", "size", "nonzero", "sparsity", "selected"), rows,
                          align="llrrrl")


def summary(tree: Any, rules: Sequence[Rule] | None = None) -> Summary:
  """Counts the non-zero entries of every leaf of ``tree`` (parameters or masks).

  Args:
    tree: any pytree of arrays (a Linen ``params`` dict, an ``nnx.State``, a mask tree).
    rules: the leaf selection the tree was pruned with; ``None`` uses
      :data:`~jaxcompress.pruning.select.DEFAULT_RULES`. Only selected leaves enter the totals.

  Returns:
    A :class:`Summary`; its ``table()`` is a readable report, its totals count the entries
    :func:`sparsity` counts.

  Raises:
    ConfigError: for a bad rule.
  """
  sel = select(tree, rules, warn_unused=False)
  return Summary(tuple(
      LeafSummary(path, tuple(np.shape(x)), int(np.size(x)),
                  int(np.size(x)) - int(_zeros(x)), bool(s))
      for path, x, s in zip(sel.paths, sel.leaves, sel.selected)))
