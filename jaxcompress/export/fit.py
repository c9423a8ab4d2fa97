"""Fit an artifact into a byte budget by zeroing its smallest weights.

Huffman-coded and zlib-compressed sizes depend on the trained values, so a model sized for a
budget before training may export a few bytes over it. :func:`fit_to_bytes` then zeroes the kept
entries of the pruned weights with the smallest magnitudes, one global ranking as global
magnitude pruning uses, until the artifact fits: it searches the fewest such entries (exponential
search, then bisection, on artifacts actually written) and returns the parameters of the last
artifact it wrote, which fits. Sizes are not strictly monotone in the count (a Huffman table or
the deflate stream may grow by a byte as entries go), so the answer is a count whose artifact
fits, at most ``resolution`` of the kept entries above the fewest that fit on the path searched.

Example:
  >>> from jaxcompress.export import export_model
  >>> out_dir, kwargs = "run/export", dict(input_shape=(32, 32, 3))
  >>> def write(params):  # writes the artifact of these parameters, returns its size report
  ...   return export_model(out_dir, variables={**variables, "params": params}, **kwargs)
  >>> params, report, zeroed = fit_to_bytes(write, variables["params"], None, max_bytes=5_000)
  >>> report["total_bytes"] <= 5_000, zeroed > 0     # the float32 artifact: 6 kB
  (True, True)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxcompress.errors import ConfigError, check_positive
from jaxcompress.pruning.select import select


def _zero_smallest(selection, order: np.ndarray, sizes: Sequence[int], k: int) -> Any:
  """The selected tree with the entries ``order[:k]`` (indices into the concatenated selected
  leaves) set to 0."""
  flat = [np.array(leaf) for leaf in selection.leaves]
  chosen = [i for i, s in enumerate(selection.selected) if s]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  drop = np.sort(order[:k])
  for j, i in enumerate(chosen):
    lo, hi = np.searchsorted(drop, [starts[j], starts[j + 1]])
    view = flat[i].reshape(-1)
    view[drop[lo:hi] - starts[j]] = 0
  return jax.tree_util.tree_unflatten(selection.treedef, flat)


def fit_to_bytes(write: Callable[[Any], dict], params: Any, rules: Sequence | None,
                 max_bytes: int, *, resolution: float = 1e-3) -> tuple[Any, dict, int]:
  """Zeroes the fewest smallest-magnitude kept weights for ``write``'s artifact to fit.

  Args:
    write: writes the artifact of a parameter tree and returns its size report (a dict with
      ``total_bytes``); it is called with ``params`` first, then with trimmed copies.
    params: the parameter tree (host arrays).
    rules: the pruning rules that select the weights that may be zeroed (``prune.rules``;
      ``None``: every floating-point leaf of rank >= 2 but a ``bias`` or ``scale``).
    max_bytes: the budget for ``total_bytes``.
    resolution: the search stops once the fitting and the failing count differ by at most this
      fraction of the kept entries (and by at least 1).

  Returns:
    ``(params, report, zeroed)``: the parameters of the artifact last written, which fits, its
    report, and how many kept entries were zeroed (0: ``params`` fit as they are).

  Raises:
    ConfigError: for a ``max_bytes`` that is not a number > 0 or a ``resolution`` that is not a
      finite number >= 0, or if the artifact does not fit even with every selected weight zero
      (``write`` then writes ``params`` again, so the folder holds their artifact, not a trimmed
      one).
  """
  check_positive("max_bytes", max_bytes)
  check_positive("fit_to_bytes resolution", resolution, zero=True)
  report = write(params)
  if report["total_bytes"] <= max_bytes:
    return params, report, 0
  selection = select(params, rules, warn_unused=False)
  leaves = [np.asarray(x, np.float32).reshape(-1) for x in selection.pick(selection.leaves)]
  sizes = [leaf.size for leaf in leaves]
  magnitude = np.abs(np.concatenate(leaves)) if leaves else np.zeros(0, np.float32)
  kept = int(np.count_nonzero(magnitude))
  order = np.argsort(np.where(magnitude > 0, magnitude, np.inf), kind="stable")[:kept]
  found: dict[int, dict] = {}  # count -> report; only the last tree is kept (a model's size each)
  last: list = [None, None]  # [count, tree] of the artifact last written

  def fits(k: int) -> bool:
    last[:] = k, _zero_smallest(selection, order, sizes, k)
    found[k] = write(last[1])
    return found[k]["total_bytes"] <= max_bytes

  lo, hi = 0, max(1, int(np.ceil(kept * resolution)))  # lo: fails; hi: to try
  while hi < kept and not fits(hi):
    lo, hi = hi, min(kept, 2 * hi)
  if hi >= kept and not fits(kept):
    write(params)
    raise ConfigError(f"max_bytes: the artifact takes {found[kept]['total_bytes']:,} bytes "
                      f"with every pruned weight zero, over the budget of {max_bytes:,}")
  hi = min(hi, kept)
  while hi - lo > max(1, int(kept * resolution)):
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid
  if last[0] != hi:  # the folder holds the last artifact written: write the answer again
    fits(hi)
  return last[1], found[hi], hi


def smallest_bytes(write: Callable[[Any], dict], params: Any, rules: Sequence | None) -> int:
  """The bytes of ``write``'s artifact with every weight ``rules`` select zero: the least any
  ``max_bytes`` of :func:`fit_to_bytes` can reach with these weights, checkable before training.

  The values left (biases, scales, norms) and the compression of the rest are those of
  ``params``, so after training the same floor may differ by a few bytes.
  """
  selection = select(params, rules, warn_unused=False)
  flat = [np.zeros_like(np.asarray(leaf)) if chosen else leaf
          for leaf, chosen in zip(selection.leaves, selection.selected)]
  return int(write(jax.tree_util.tree_unflatten(selection.treedef, flat))["total_bytes"])
