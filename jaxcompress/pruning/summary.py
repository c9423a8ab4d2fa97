"""How sparse a parameter tree is: per leaf and in total, counted on the host.

Example:
  >>> params = load_pytorch_npz(get_model("resnet20"), path)["params"]
  >>> print(summary(apply_masks(params, magnitude_masks(params, 0.7, scope="global"))).table())
  path                   shape                 size   nonzero  sparsity
  bn1/bias               (16,)                   16        16    0.0000
  bn1/scale              (16,)                   16        16    0.0000
  conv1/kernel           (3, 3, 3, 16)          432       432    0.0000
  ...
  total                                      269722     82637    0.6936
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcompress.rules import path_str


class LeafSummary(NamedTuple):
  """One leaf: its path, shape, entry count and count of non-zero entries."""
  path: str
  shape: tuple[int, ...]
  size: int
  nonzero: int

  @property
  def sparsity(self) -> float:
    """Fraction of entries that are exactly zero (0 for an empty leaf)."""
    return 1.0 - self.nonzero / self.size if self.size else 0.0


class Summary(NamedTuple):
  """Every leaf of a tree, in tree order, and the totals over all of them."""
  leaves: tuple[LeafSummary, ...]

  @property
  def size(self) -> int:
    return sum(leaf.size for leaf in self.leaves)

  @property
  def nonzero(self) -> int:
    return sum(leaf.nonzero for leaf in self.leaves)

  @property
  def sparsity(self) -> float:
    """Fraction of all entries that are exactly zero."""
    return 1.0 - self.nonzero / self.size if self.size else 0.0

  def table(self) -> str:
    """A fixed-width table: one row per leaf, then the total."""
    width = max([len("total")] + [len(leaf.path) for leaf in self.leaves])
    row = lambda path, shape, size, nonzero, sparsity: (
        f"{path:<{width}}  {shape:<16} {size:>9} {nonzero:>9}  {sparsity:>8}")
    lines = [row("path", "shape", "size", "nonzero", "sparsity")]
    lines += [row(leaf.path, str(leaf.shape), leaf.size, leaf.nonzero, f"{leaf.sparsity:.4f}")
              for leaf in self.leaves]
    lines.append(row("total", "", self.size, self.nonzero, f"{self.sparsity:.4f}"))
    return "\n".join(lines)


def summary(tree: Any) -> Summary:
  """Counts the non-zero entries of every leaf of ``tree`` (parameters or masks).

  Args:
    tree: any pytree of arrays (a Linen ``params`` dict, an ``nnx.State``, a mask tree).

  Returns:
    A :class:`Summary`; its ``table()`` is a readable report.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return Summary(tuple(
      LeafSummary(path_str(kp), tuple(np.shape(x)), int(np.size(x)),
                  int(np.count_nonzero(np.asarray(x)))) for kp, x in flat))
