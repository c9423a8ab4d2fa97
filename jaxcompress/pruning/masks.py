"""Masks from scores: array math, jit-safe, with traced or Python sparsities.

All masks here are boolean (``True`` = kept). The count of pruned entries is
``round(sparsity * n)`` with Python's round-half-to-even, as ``torch.nn.utils.prune`` computes it.

Ties: entries are ranked by a *stable* ascending sort of their scores, and the lowest ranks are
pruned; among equal scores the entry with the lower flat (row-major) index is pruned first. This is
``np.argsort(scores.ravel(), kind="stable")[:k]``, a documented rule; ``torch.topk``'s order among
ties is unspecified, so where scores tie the choice of entries may differ from PyTorch's, never the
count.

A *masker* turns the scores of the selected leaves into their masks:
``masker(paths, scores, sparsity) -> list of bool arrays``. :func:`unstructured`,
:func:`kernels`, :func:`channels` and :func:`n_of_m` build one; the paths only serve error
messages. Whatever the score, :func:`~jaxcompress.pruning.prune` scores the entries it has
pruned already ``-inf`` (hard masking): a masker of your own should rank them lowest, as these
do.

References:
  Mishra, Latorre, Pool, Stosic, Stosic, Venkatesh, Yu, Micikevicius. Accelerating Sparse Deep
  Neural Networks. arXiv:2104.08378, 2021 (N:M, NVIDIA 2:4 sparse tensor cores).
  Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017
  (filters ranked by L1 norm).
  Mao, Han, Pool, Li, Liu, Wang, Dally. Exploring the Granularity of Sparsity in Convolutional
  Neural Networks. CVPR Workshops 2017 (kernel-level pruning: whole 2-D kernels).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import check_range, invalid, is_number, unknown

Sparsity = Union[float, jax.Array]
# ``masker(paths, scores, sparsity) -> list of bool arrays`` (module docstring).
Masker = Callable[[Sequence[str], Sequence[jax.Array], Sparsity], list[jax.Array]]
SCOPES = ("layer", "global")
NORMS = ("l1", "l2")


def check_sparsity(sparsity: Sparsity, field: str = "sparsity") -> None:
  """Raises ConfigError unless a concrete ``sparsity`` (a Python number or a 0-d array, not a
  traced one: a schedule's value inside jit) lies in [0, 1)."""
  if isinstance(sparsity, jax.core.Tracer):
    return
  if not isinstance(sparsity, numbers.Real) and np.ndim(sparsity) == 0:
    sparsity = np.asarray(sparsity).item()  # a concrete 0-d array, named by its value
  check_range(field, sparsity, 0.0, 1.0)


def check_sparsities(values: Sequence[float], field: str = "sparsities", *,
                     increasing: bool = False) -> None:
  """Raises ConfigError for an empty list, a value outside [0, 1) or, with ``increasing``, a
  value not above the one before it (naming ``field[i]``)."""
  if not len(values):
    raise invalid(field, values, "a non-empty list of sparsities in [0, 1)")
  for i, s in enumerate(values):
    check_sparsity(s, f"{field}[{i}]")
    if increasing and i and s <= values[i - 1]:
      raise invalid(f"{field}[{i}]", s, f"> {field}[{i - 1}]={values[i - 1]}",
                    "list the targets in increasing order")


def num_pruned(sparsity: Sparsity, n: int) -> int | jax.Array:
  """``round(sparsity * n)``: exact in Python for a number or a concrete 0-d array, float32 when
  traced (which may miss it by one where ``sparsity * n`` is within float32 rounding of a half,
  0.7 * 45 -> 32 where Python gives 31, and by one per ``2**24`` entries).

  Raises:
    ConfigError: for a concrete ``sparsity`` outside ``[0, 1)`` (:func:`check_sparsity`).
  """
  if not isinstance(sparsity, jax.core.Tracer) and np.ndim(sparsity) == 0:
    check_sparsity(sparsity)
    return round(float(sparsity) * n)
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def ranks(scores: jax.Array, axis: int = -1) -> jax.Array:
  """Position of every entry in the stable ascending sort of ``scores`` along ``axis``."""
  order = jnp.argsort(scores, axis=axis, stable=True)
  # The inverse permutation by a scatter, not a second sort (seconds for 10M entries on a CPU).
  iota = jax.lax.broadcasted_iota(order.dtype, order.shape, axis % order.ndim)
  return jnp.put_along_axis(jnp.zeros_like(order), order, iota, axis, inplace=False)


def across(fn: Callable[[jax.Array], jax.Array], leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """``fn`` of all ``leaves`` flattened into one vector, split back into the leaves' shapes.

  How a global scope treats several leaves as one: ``across(ranks, scores)`` ranks every entry
  among all of them.
  """
  flat = jnp.concatenate([jnp.reshape(l, -1) for l in leaves])
  parts = jnp.split(fn(flat), np.cumsum([np.size(l) for l in leaves])[:-1])
  return [p.reshape(np.shape(l)) for p, l in zip(parts, leaves)]


# Floating scores of at least this many entries are cut by bisection (:func:`_keep_highest`):
# an XLA sort of 10M entries takes seconds on a CPU. Smaller ones keep the one-sort ranks, the
# program the GPU timings in docs/benchmarks.md measured.
BISECT_FROM = 1 << 20


def topk_mask(scores: jax.Array, k: int | jax.Array) -> jax.Array:
  """Keeps the ``k`` highest scores of the whole array (ties: higher flat index kept).

  Args:
    scores: any shape.
    k: how many entries to keep, a Python int or a traced integer.

  Returns:
    A bool array of ``scores``' shape with exactly ``k`` ``True`` entries.

  Raises:
    ConfigError: for a ``k`` known now (not traced) that is no integer in ``[0, scores.size]``.
  """
  scores = jnp.asarray(scores)
  if not isinstance(k, jax.core.Tracer) and not (is_number(k) and float(k).is_integer()
                                                 and 0 <= k <= np.size(scores)):
    raise invalid("k", k, f"an integer in [0, {np.size(scores)}] (entries of scores to keep)")
  flat = scores.reshape(-1)
  if flat.size < BISECT_FROM or not jnp.issubdtype(flat.dtype, jnp.floating):
    return (ranks(flat) >= flat.size - k).reshape(scores.shape)
  return _keep_highest(flat, jnp.asarray(k, jnp.int32)).reshape(scores.shape)


@jax.jit  # called eagerly too (budget costing): one compilation per shape, not per call
def _keep_highest(flat: jax.Array, k: jax.Array) -> jax.Array:
  """:func:`topk_mask` of floating ``flat`` without a sort (an XLA sort of 10M entries takes
  seconds on a CPU): bisects for the key of the lowest kept entry, then keeps every higher key
  and the last of the entries that tie it."""
  key = _sort_keys(flat)
  pruned = flat.size - k

  def bisect(_, bounds):  # invariant: the pruned + 1 lowest keys lie in [lo, hi]
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    ok = jnp.sum(key <= mid) > pruned
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  bits = 8 * key.dtype.itemsize
  _, cut = jax.lax.fori_loop(0, bits, bisect, (jnp.min(key), jnp.max(key)))
  ties = key == cut
  later_ties = jnp.cumsum(ties[::-1])[::-1]  # ties at this flat index or after it
  return ((key > cut) | (ties & (later_ties <= k - jnp.sum(key > cut)))) & (k > 0)


def _sort_keys(x: jax.Array) -> jax.Array:
  """Integers in the order :func:`jnp.sort` gives floating ``x``: -0 ties +0, NaNs last.

  Float16 and bfloat16 map through float32 (exactly), float64 to int64.
  """
  x = x.astype(jnp.float64 if x.dtype.itemsize > 4 else jnp.float32)
  x = jnp.where(jnp.isnan(x), jnp.nan, jnp.where(x == 0, 0, x))
  signed = jax.lax.bitcast_convert_type(x, jnp.int64 if x.dtype.itemsize > 4 else jnp.int32)
  # A negative float's bits grow with its magnitude: flip them below the positives.
  return jnp.where(signed < 0, jnp.iinfo(signed.dtype).min - signed - 1, signed)


def sparsity_mask(scores: jax.Array, sparsity: Sparsity) -> jax.Array:
  """Prunes the ``round(sparsity * n)`` lowest of the ``n`` scores (see :func:`topk_mask`)."""
  return topk_mask(scores, scores.size - num_pruned(sparsity, scores.size))


def reduction_axis(ndim: int) -> int:
  """The input (reduction) axis of a Flax kernel: ``-2`` for ``ndim >= 2``, else ``-1``.

  A ``Dense`` kernel is ``[in, out]`` and a ``Conv`` kernel ``[H, W, in, out]`` (HWIO); their
  products sum over the input channels (and, for a conv, over H and W), so the input-channel
  axis ``-2`` is where NVIDIA sparse tensor cores expect the N:M groups. A 1-D leaf has one axis.
  """
  return -2 if ndim >= 2 else -1


def _is_axis(a: Any, ndim: int) -> bool:
  """Whether ``a`` is an integer axis of an array of ``ndim`` axes (a bool is no axis)."""
  return isinstance(a, (int, np.integer)) and not isinstance(a, bool) and -ndim <= a < ndim


def _distinct_axes(axes: Sequence[Any], ndim: int) -> bool:
  """Whether ``axes`` are integer axes of an array of ``ndim`` axes, no two naming the same."""
  return (all(_is_axis(a, ndim) for a in axes)
          and len({int(a) % ndim for a in axes}) == len(axes))


def nm_mask(scores: jax.Array, n: int, m: int,
            axis: int | Sequence[int] | None = None) -> jax.Array:
  """In every group of ``m`` consecutive entries along ``axis``, keeps the ``n`` highest scores.

  ``axis=None`` (default) groups along the input-channel axis, :func:`reduction_axis`: for a
  Dense ``[in, out]`` or Conv HWIO kernel, every output channel (and spatial position) keeps ``n``
  of every ``m`` consecutive input channels. A tuple of axes groups along those axes flattened in
  row-major order (a DenseGeneral ``[heads, dim, out]`` kernel contracts ``heads * dim`` inputs:
  ``axis=(0, 1)``). Ties within a group: the entry nearer the end of the group is kept (see the
  module docstring). The (flattened) length must be a multiple of ``m``.

  Raises:
    ConfigError: for an axis out of range or given twice, ``m < 1``, ``n`` outside ``[1, m]``
      or a group length that ``m`` does not divide.
  """
  scores = jnp.asarray(scores)
  if axis is None:
    axis = reduction_axis(scores.ndim)
  axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  ndim = scores.ndim
  if not axes or not _distinct_axes(axes, ndim):
    raise invalid("axis", axis, f"an axis in [{-ndim}, {ndim}) or a tuple of distinct ones for "
                  f"scores of shape {tuple(scores.shape)}")
  axes = tuple(int(a) % ndim for a in axes)
  if not isinstance(m, int) or m < 1:
    raise invalid("m", m, "an integer >= 1")
  if not isinstance(n, int) or not 1 <= n <= m:
    raise invalid("n", n, f"an integer in [1, m={m}]")
  length = math.prod(scores.shape[a] for a in axes)
  if length % m:
    raise invalid("m", m, f"a divisor of the {length} entries grouped along axes {axes} of "
                  f"shape {tuple(scores.shape)}")
  last = tuple(range(scores.ndim - len(axes), scores.ndim))
  moved = jnp.moveaxis(scores, axes, last)
  groups = moved.reshape(*moved.shape[:len(moved.shape) - len(axes)], -1, m)
  keep = ranks(groups) >= m - n
  return jnp.moveaxis(keep.reshape(moved.shape), last, axes)


def channel_scores(scores: jax.Array, norm: str = "l1", axis: int = -1) -> jax.Array:
  """One score per output channel (along ``axis``, by default the last) from the scores of its
  entries.

  ``"l1"`` sums them, ``"l2"`` takes the root of their sum of squares: with the magnitude score
  ``|w|`` these are the L1 and L2 norms of each output channel's weights. ``"l2"`` is for
  scores that are never negative; a signed score (movement) needs ``"l1"``. A channel with an
  entry scored ``-inf`` (pruned already, see :func:`~jaxcompress.pruning.prune`) scores ``-inf``.

  Raises:
    ConfigError: for a norm other than ``"l1"`` and ``"l2"`` or an axis out of range.
  """
  scores = jnp.asarray(scores)
  if norm not in NORMS:
    raise unknown("norm", norm, NORMS)
  if not _is_axis(axis, scores.ndim):
    raise invalid("axis", axis, f"an axis in [{-scores.ndim}, {scores.ndim}) for scores of shape "
                  f"{tuple(scores.shape)}")
  scores = jnp.moveaxis(scores, axis, -1)
  return _group_scores(scores.reshape(-1, scores.shape[-1]), 0, norm, jnp.sum)


def _group_scores(scores: jax.Array, axes: Any, norm: str, reduce: Callable,
                  **kwargs: Any) -> jax.Array:
  """``reduce`` (``jnp.sum`` or ``jnp.mean``) over ``axes`` of the scores (``l1``) or of their
  squares, then the root (``l2``); a group holding an entry scored ``-inf`` scores ``-inf``.
  Float32 at least: a float16 group's sum overflows past 65504."""
  scores = jnp.asarray(scores, jnp.promote_types(scores.dtype, jnp.float32))
  pruned = jnp.isneginf(scores)
  kept = jnp.where(pruned, 0, scores)
  value = (reduce(kept, axes, **kwargs) if norm == "l1"
           else jnp.sqrt(reduce(kept * kept, axes, **kwargs)))
  return jnp.where(jnp.any(pruned, axes, **kwargs), -jnp.inf, value)


def _check_axes(field: str, path: str, shape: Sequence[int], axes: Sequence[Any]) -> None:
  """Raises ConfigError unless every one of ``axes`` is an integer axis of ``shape``."""
  ndim = len(shape)
  for a in axes:
    if not _is_axis(a, ndim):
      raise invalid(f"{field} (leaf {path!r}, shape {tuple(shape)})", a,
                    f"an axis in [{-ndim}, {ndim})")


def check_masker(structure: Any) -> Masker:
  """``structure`` itself when it is a masker (``None``: ``unstructured("layer")``).

  Raises:
    ConfigError: for anything not callable, e.g. a name (``"nm"``) where a masker belongs.
  """
  if structure is None:
    return unstructured()
  if not callable(structure):
    raise invalid("prune.structure", structure, "a masker: unstructured(scope), kernels(scope, "
                  "norm), channels(norm) or n_of_m(n, m) from jaxcompress.pruning")
  return structure


def unstructured(scope: str = "layer") -> Masker:
  """Masker pruning single entries: ``round(sparsity * n)`` per leaf or across all leaves.

  Args:
    scope: ``"layer"`` ranks each leaf on its own; ``"global"`` ranks all selected leaves together
      (``torch.nn.utils.prune.global_unstructured``), so layers end up with different sparsities.

  Raises:
    ConfigError: for an unknown scope.
  """
  if scope not in SCOPES:
    raise unknown("prune.scope", scope, SCOPES)

  def masker(paths, scores, sparsity):
    del paths
    if scope == "layer":
      return [sparsity_mask(s, sparsity) for s in scores]
    if not scores:
      return []
    return across(lambda flat: sparsity_mask(flat, sparsity), scores)

  return masker


def kernel_scores(scores: jax.Array, norm: str = "l1",
                  window: Sequence[int] | None = None) -> jax.Array:
  """One score per kernel: the entries that differ only along the ``window`` axes, which are
  kept with size 1 (the result broadcasts back to ``scores``).

  For a Conv kernel ``[*window, in, out]`` a kernel is the window of one (input, output) channel
  pair. ``window=None``: every axis but the last two (a leaf with fewer than 3 axes has one
  entry per kernel); ``()``: each entry is a kernel of its own (a Dense, DenseGeneral or Einsum
  weight, whatever its rank). ``"l1"`` is the mean of the entries' scores, ``"l2"`` the root of
  the mean of their squares: the L1 or L2 norm over the window size, so kernels of windows of
  different sizes compare across leaves. A kernel with an entry scored ``-inf`` (pruned already)
  scores ``-inf``.

  Raises:
    ConfigError: for a norm other than ``"l1"`` and ``"l2"`` or a window that is not a tuple of
      distinct axes of ``scores``.
  """
  scores = jnp.asarray(scores)
  if norm not in NORMS:
    raise unknown("norm", norm, NORMS)
  ndim = scores.ndim
  if window is None:
    window = tuple(range(ndim - 2))
  elif not isinstance(window, (tuple, list)) or not _distinct_axes(window, ndim):
    raise invalid("window", window, f"a tuple of distinct axes in [{-ndim}, {ndim}) for scores "
                  f"of shape {tuple(scores.shape)}")
  window = tuple(window)
  if not window:
    return scores
  return _group_scores(scores, window, norm, jnp.mean, keepdims=True)


def kernels(scope: str = "layer", norm: str = "l1",
            windows: Mapping[str, Sequence[int]] | None = None) -> Masker:
  """Masker zeroing whole kernels: ``round(sparsity * kernels)`` per leaf or across all leaves.

  The kernels (:func:`kernel_scores`) with the lowest L1 or L2 norm per entry are pruned; each
  leaf's mask is the kernels' mask broadcast over the window. A kept kernel's zero entries need
  no position in the export (``blocks`` storage in :mod:`jaxcompress.export.sparse`), so at the
  same bytes a layer keeps more weights than unstructured pruning leaves it.

  Args:
    scope: ``"layer"`` ranks each leaf's kernels on their own; ``"global"`` ranks all selected
      leaves' kernels together (the fraction pruned is then one of kernels, not of entries).
    norm: ``"l1"`` or ``"l2"``.
    windows: ``{leaf path: window axes}`` from the model's trace (``ModelLayers.window_axes``:
      a Conv's spatial axes, ``()`` for a layer without a window, such as an attention
      projection ``[in, heads, dim]``). Leaves not listed take every axis but the last two.

  Raises:
    ConfigError: for an unknown scope or norm.
  """
  if scope not in SCOPES:
    raise unknown("prune.scope", scope, SCOPES)
  if norm not in NORMS:
    raise unknown("prune.norm", norm, NORMS)
  windows = dict(windows or {})

  def masker(paths, scores, sparsity):
    for p, s in zip(paths, scores):
      _check_axes("prune.windows", p, s.shape, windows.get(p, ()))
    per_kernel = [kernel_scores(s, norm, windows.get(p)) for p, s in zip(paths, scores)]
    if scope == "layer":
      keep = [sparsity_mask(k, sparsity) for k in per_kernel]
    elif scores:
      keep = across(lambda flat: sparsity_mask(flat, sparsity), per_kernel)
    else:
      return []
    return [jnp.broadcast_to(k, s.shape) for k, s in zip(keep, scores)]

  return masker


def channels(norm: str = "l1", axes: Mapping[str, int] | None = None) -> Masker:
  """Masker zeroing whole output channels of each leaf.

  ``round(sparsity * channels)`` channels per leaf with the lowest L1 or L2 norm of their scores
  are pruned; with the magnitude score that is the L1/L2 norm of the weights (Li et al. 2017).
  At least one channel of each leaf is kept: a layer of no channels cuts the network.

  Args:
    norm: ``"l1"`` or ``"l2"`` (scores that are never negative).
    axes: ``{leaf path: output-channel axis}`` (``ModelLayers.output_axes``: an Einsum's or a
      transposed ConvTranspose's output axis is not the last); a leaf not in it uses its last
      axis, the output channels of a Flax Conv, Dense or Embed.

  Raises:
    ConfigError: for an unknown norm.
  """
  if norm not in NORMS:
    raise unknown("prune.norm", norm, NORMS)

  def masker(paths, scores, sparsity):
    out = []
    for path, s in zip(paths, scores):
      axis = (axes or {}).get(path, -1)
      _check_axes("prune.axes", path, s.shape, (axis,))
      c = channel_scores(s, norm, axis)
      keep = jnp.maximum(c.size - num_pruned(sparsity, c.size), 1)
      moved = jnp.moveaxis(s, axis, -1).shape
      out.append(jnp.moveaxis(jnp.broadcast_to(topk_mask(c, keep), moved), -1, axis))
    return out

  return masker


def per_step(base: Masker, stacked: Mapping[str, int]) -> Masker:
  """``base`` with each step of a stacked weight as a leaf of its own.

  A weight stacked by ``nn.scan``/``nn.vmap`` over ``params`` (``[steps, *weight]``) holds one
  weight per step; ``stacked[path]`` leading axes of leaf ``path`` index them. Each step's slice
  is masked as a separate leaf (its own threshold at layer scope, its own kernels and channels;
  at global scope ranked with every other leaf), then the masks are stacked back. ``base``'s
  axes (N:M groups, output channels) are those of one step's weight.
  """
  def masker(paths, scores, sparsity):
    names, slices, counts = [], [], []
    for path, s in zip(paths, scores):
      k = int(stacked.get(path, 0))
      steps = s.reshape((-1,) + s.shape[k:]) if k else s[None]
      names += [path] * steps.shape[0]
      slices += list(steps)
      counts.append(steps.shape[0])
    masks = base(names, slices, sparsity)
    ends = np.cumsum(counts)
    return [jnp.stack(masks[end - n:end]).reshape(s.shape)
            for s, n, end in zip(scores, counts, ends)]

  return masker


def n_of_m(n: int, m: int, axis: int | None = None,
           axes: Mapping[str, Sequence[int]] | None = None) -> Masker:
  """Masker keeping the ``n`` highest of every ``m`` consecutive entries along ``axis``.

  N:M sparsity is fixed at ``1 - n / m``; the ``sparsity`` the masker receives only switches it
  on (any value > 0) or off (0), so a schedule decides *when* it starts.

  Args:
    n: entries kept per group, ``1 <= n <= m``.
    m: group size; must divide every masked leaf's length along the group axis.
    axis: the axis the groups run along. ``None`` (default): the input-channel (reduction) axis
      of each leaf, ``-2`` for ``ndim >= 2`` (Dense ``[in, out]``, Conv HWIO), ``-1`` for 1-D
      leaves (see :func:`reduction_axis`): the layout NVIDIA 2:4 sparse tensor cores need, with
      each output channel keeping ``n`` of every ``m`` consecutive input weights. Pass ``-1`` to
      group along the output channels instead.
    axes: ``{leaf path: reduction axes}`` for leaves whose product sums over other axes than
      ``axis`` (from the model's trace, ``ModelLayers.reduce_axes``): a DenseGeneral query kernel
      ``[in, heads, dim]`` groups along ``(0,)``, its output kernel ``[heads, dim, out]`` along
      ``(0, 1)`` flattened. Leaves not listed use ``axis``.

  Raises:
    ConfigError: if ``n``/``m`` are not integers with ``1 <= n <= m``; when masking, if an axis
      is out of range or ``m`` does not divide the group length of a leaf.
  """
  if not isinstance(m, int) or m < 1:
    raise invalid("prune.m", m, "an integer >= 1")
  if not isinstance(n, int) or not 1 <= n <= m:
    raise invalid("prune.n", n, f"an integer in [1, m={m}]", "N:M keeps n of every m entries")
  axes = dict(axes or {})

  def masker(paths, scores, sparsity):
    out = []
    for path, s in zip(paths, scores):
      ax = axes.get(path, reduction_axis(s.ndim) if axis is None else axis)
      ax = tuple(ax) if isinstance(ax, (tuple, list)) else (ax,)
      name = f"axis {ax[0]}" if len(ax) == 1 else f"axes {list(ax)}"
      if not ax or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                           and -s.ndim <= a < s.ndim for a in ax):
        raise invalid(f"prune.axis (leaf {path!r}, shape {s.shape})",
                      ax[0] if len(ax) == 1 else ax, f"in [{-s.ndim}, {s.ndim})")
      if len({a % s.ndim for a in ax}) < len(ax):
        raise invalid(f"prune.axis (leaf {path!r}, shape {s.shape})", ax, "distinct axes")
      length = math.prod(s.shape[a] for a in ax)
      if length % m:
        raise invalid(f"prune.m (leaf {path!r}, {name} of length {length})", m,
                      f"a divisor of {length}", "exclude this leaf with a rule")
      out.append(nm_mask(s, n, m, ax) | (jnp.asarray(sparsity) <= 0))
    return out

  return masker
