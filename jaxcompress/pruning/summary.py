"""How sparse a parameter tree is: per leaf and in total, counted on the host.

The totals count only the leaves that pruning with the same rules would prune (see
:func:`~jaxcompress.pruning.select.select`): a zero bias, or any zero in a leaf that is never
pruned, shows in its own row but is not counted as pruned.

Example:
  >>> params = {"dense": {"kernel": np.array([[1.0, 0.0], [0.0, 2.0]]), "bias": np.zeros(2)}}
  >>> print(summary(params).table())
  path              shape                 size   nonzero  sparsity  selected
  dense/bias        (2,)                     2         0    1.0000  no
  dense/kernel      (2, 2)                   4         2    0.5000  yes
  total (selected)                           4         2    0.5000
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxcompress.pruning.select import select
from jaxcompress.rules import Rule


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
    return 1.0 - self.nonzero / self.size if self.size else 0.0


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
    """Fraction of the selected leaves' entries that are exactly zero (0 if none selected)."""
    return 1.0 - self.nonzero / self.size if self.size else 0.0

  def table(self) -> str:
    """A fixed-width table: one row per leaf (all leaves), then the total over selected ones."""
    total = "total (selected)"
    width = max([len(total)] + [len(leaf.path) for leaf in self.leaves])
    row = lambda path, shape, size, nonzero, sparsity, selected: (
        f"{path:<{width}}  {shape:<16} {size:>9} {nonzero:>9}  {sparsity:>8}  {selected}"
    ).rstrip()
    lines = [row("path", "shape", "size", "nonzero", "sparsity", "selected")]
    lines += [row(leaf.path, str(leaf.shape), leaf.size, leaf.nonzero, f"{leaf.sparsity:.4f}",
                  "yes" if leaf.selected else "no") for leaf in self.leaves]
    lines.append(row(total, "", self.size, self.nonzero, f"{self.sparsity:.4f}", ""))
    return "\n".join(lines)


def summary(tree: Any, rules: Sequence[Rule] | None = None) -> Summary:
  """Counts the non-zero entries of every leaf of ``tree`` (parameters or masks).

  Args:
    tree: any pytree of arrays (a Linen ``params`` dict, an ``nnx.State``, a mask tree).
    rules: the leaf selection the tree was pruned with; ``None`` uses
      :data:`~jaxcompress.pruning.select.DEFAULT_RULES`. Only selected leaves enter the totals.

  Returns:
    A :class:`Summary`; its ``table()`` is a readable report.

  Raises:
    ConfigError: for a bad rule.
  """
  sel = select(tree, rules, warn_unused=False)
  return Summary(tuple(
      LeafSummary(path, tuple(np.shape(x)), int(np.size(x)),
                  int(np.count_nonzero(np.asarray(x))), bool(s))
      for path, x, s in zip(sel.paths, sel.leaves, sel.selected)))
