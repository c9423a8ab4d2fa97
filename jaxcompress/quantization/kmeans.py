"""Non-uniform quantization by weight sharing (Han et al. 2016, "Deep Compression", section 3).

Each layer's weights are clustered with 1-d k-means into ``2^bits`` centroids (the codebook); a
weight is stored as the index of its centroid. Centroids start evenly spaced over
``[min(w), max(w)]`` ("linear initialization", which the paper found best because it keeps the
rare large weights), then Lloyd iterations move them to the mean of their members. Fine-tuning
trains the codebook: the gradient of a centroid is the sum of the gradients of the weights that
share it (paper, eq. 3), which :func:`codebook_grad` computes with ``segment_sum`` and which
``jax.grad`` of :func:`decode` produces as well.

Weights outside ``mask`` (pruned ones) are not clustered: they get the index ``2^bits`` and decode
to exactly 0, so pruning and weight sharing compose as in the paper's pipeline.

References:
  Han, Mao, Dally. Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
  Quantization and Huffman Coding. ICLR 2016.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, check_counts
from jaxcompress.quantization.qparams import check_bits, concrete
from jaxcompress.rules import Rule, Rules, path_str


MAX_ITERS = 2**31 - 1  # Lloyd iterations the loop's int32 counter reaches
# A cluster's members are summed in blocks of this many, then the blocks' sums: one float32 sum
# over millions of members drops most of each addend once the total is large.
SUM_BLOCK = 4096


class Codebook(NamedTuple):
  """A weight-shared tensor: ``weights == decode(codebook, indices)``.

  Attributes:
    codebook: float32 ``[2^bits]`` centroids, sorted ascending (trainable).
    indices: int32 array of the weight's shape; ``2^bits`` marks a masked-out (zero) weight.
  """
  codebook: jax.Array
  indices: jax.Array


@jax.jit
def _assign(flat: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index of the nearest of the ``centroids`` (in any order) for each value (``O(n)`` memory):
  the number of midpoints of the sorted centroids below it (``jnp.searchsorted``'s left side),
  found by a branch-free binary search, one gather per bit of the index (under half the time
  of ``searchsorted``'s loop on CPU). Jitted: called eagerly (the export's ``assign``), it is
  one compiled program per shape, not one per operation."""
  order = jnp.argsort(centroids, stable=True)
  ranked = centroids[order]
  k = ranked.shape[0]
  steps = (k - 1).bit_length()  # the k - 1 midpoints padded with +inf to 2^steps - 1
  midpoints = jnp.concatenate([(ranked[1:] + ranked[:-1]) / 2,
                               jnp.full((2**steps - k,), jnp.inf, ranked.dtype)])
  below = jnp.zeros(jnp.shape(flat), jnp.int32)
  for step in reversed(range(steps)):
    half = 1 << step
    below = jnp.where(midpoints[below + half - 1] < flat, below + half, below)
  below = jnp.where(jnp.isnan(flat), k - 1, below)  # NaN sorts above every midpoint
  return order[below].astype(jnp.int32)


def kmeans(w: Any, *, bits: int, iters: int = 30, mask: Any | None = None) -> Codebook:
  """Clusters the values of ``w`` into ``2^bits`` shared values with linear-init Lloyd k-means.

  Deterministic and ``jit``-able (``bits`` and ``iters`` static).

  Args:
    w: the weights, any shape.
    bits: index width; the codebook has ``2^bits`` entries (2..8).
    iters: Lloyd iterations (assign to nearest, move to the mean); empty clusters stay put.
    mask: optional boolean array of ``w``'s shape; ``False`` entries (pruned weights) are left out
      and decode to 0.

  Returns:
    The :class:`Codebook`.

  Raises:
    ConfigError: for ``bits`` outside 2..8, ``iters`` outside [0, 2**31), an empty weight or a
      mask of another shape.
  """
  check_bits(bits)
  if (isinstance(iters, (bool, np.bool_)) or not isinstance(iters, (int, np.integer))
      or not 0 <= iters <= MAX_ITERS):
    raise ConfigError(f"iters must be a non-negative integer below 2**31 (the loop counts in "
                      f"int32), got {iters!r}")
  iters = int(iters)  # a NumPy integer (a config's, np.arange's) counts the same
  if not jnp.size(w):
    raise ConfigError(f"kmeans: the weight is empty (shape {tuple(jnp.shape(w))})")
  if mask is not None and jnp.shape(mask) != jnp.shape(w):
    raise ConfigError(f"kmeans: the mask has shape {tuple(jnp.shape(mask))}, the weight "
                      f"{tuple(jnp.shape(w))}; a mask has its weight's shape")
  values = concrete(w)
  if values is not None and not np.all(np.isfinite(values)):
    raise ConfigError(f"kmeans: the weight holds {int(np.sum(~np.isfinite(values)))} NaN/Inf "
                      "values; cluster finite weights (a diverged run: use an earlier checkpoint)")
  k = 1 << bits
  flat = jnp.ravel(jnp.asarray(w, jnp.float32))
  keep = jnp.ones(flat.shape, bool) if mask is None else jnp.ravel(jnp.asarray(mask, bool))
  lo = jnp.min(jnp.where(keep, flat, jnp.inf))
  hi = jnp.max(jnp.where(keep, flat, -jnp.inf))
  lo, hi = jnp.where(jnp.any(keep), lo, 0.0), jnp.where(jnp.any(keep), hi, 0.0)
  centroids = jax.lax.fori_loop(0, iters, lambda _, c: _lloyd_step(flat, keep, c),
                                jnp.linspace(lo, hi, k))
  indices = jnp.where(keep, _assign(flat, centroids), k).reshape(jnp.shape(w))
  return Codebook(centroids, indices)


def stepwise(fn: Callable, stacked: int) -> Callable:
  """``fn`` applied to each step of arrays whose ``stacked`` leading axes index the steps of a
  weight stacked by ``nn.scan`` (``ModelLayers.stacked``): every array argument and result
  carries those axes, so each step gets a codebook of its own (``[*steps, 2^bits]``).
  ``stacked=0``: ``fn`` itself."""
  if not stacked:
    return fn

  def run(*arrays):
    lead = tuple(jnp.shape(arrays[0])[:stacked])
    flat = [jnp.reshape(a, (-1,) + tuple(jnp.shape(a)[stacked:])) for a in arrays]
    return jax.tree.map(lambda o: jnp.reshape(o, lead + o.shape[1:]), jax.vmap(fn)(*flat))

  return run


def _lloyd_step(flat: jax.Array, keep: jax.Array, centroids: jax.Array) -> jax.Array:
  """One Lloyd iteration: assign to the nearest centroid, move each to its members' mean."""
  k = centroids.shape[0]
  idx = jnp.where(keep, _assign(flat, centroids), k)
  blocks = -(-flat.size // SUM_BLOCK)
  block = jnp.arange(flat.size, dtype=jnp.int32) // SUM_BLOCK
  sums = jax.ops.segment_sum(flat, block * (k + 1) + idx, num_segments=blocks * (k + 1))
  sums = sums.reshape(blocks, k + 1)[:, :k].sum(0)
  counts = jax.ops.segment_sum(jnp.ones(flat.shape, jnp.int32), idx, num_segments=k)
  return jnp.sort(jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centroids))


def _check_codebook(codebook: Any, field: str) -> None:
  if jnp.ndim(codebook) != 1 or not jnp.size(codebook):
    raise ConfigError(f"{field}: codebook has shape {tuple(jnp.shape(codebook))}; a "
                      "codebook is one non-empty vector of 2^bits centroids")


def kmeans_fake_quant(w: jax.Array, codebook: jax.Array, *,
                      update: bool) -> tuple[jax.Array, jax.Array]:
  """Weight sharing inside a train step: snap ``w`` to its nearest centroid, straight-through.

  Exact zeros (pruned weights) are left out and stay 0. With ``update`` the centroids first take
  one warm-started Lloyd step on the current weights, so the codebook follows the weights as they
  train: a centroid moves by the mean of its members' updates (Han et al. move it by their summed
  gradients; :func:`codebook_grad` gives that form for fixed assignments).

  Args:
    w: the dense weights (trainable; their gradient passes straight through).
    codebook: ``[2^bits]`` centroids (not trainable; carried in the model state).
    update: re-estimate the centroids before snapping (training) or not (evaluation).

  Returns:
    ``(weights shared over the codebook, codebook)``.
  """
  _check_codebook(codebook, "kmeans_fake_quant")
  flat = jnp.ravel(w).astype(jnp.float32)
  keep = flat != 0
  if update:
    codebook = _lloyd_step(flat, keep, codebook)
  shared = decode(codebook, jnp.where(keep, _assign(flat, codebook), codebook.shape[0]))
  shared = shared.reshape(w.shape).astype(w.dtype)
  # Exactly the codebook's values (``w + (shared - w)`` is not, in float), gradient to ``w``.
  sg = jax.lax.stop_gradient
  return sg(shared) + (w - sg(w)), codebook


def assign(w: jax.Array, codebook: jax.Array) -> Codebook:
  """The :class:`Codebook` of ``w`` over a given ``codebook`` (its entries in any order; exact
  zeros masked out): each value's nearest entry.

  Raises:
    ConfigError: for a codebook that is not one non-empty vector.
  """
  _check_codebook(codebook, "assign")
  w, codebook = jnp.asarray(w), jnp.asarray(codebook)
  flat = jnp.ravel(w)
  idx = jnp.where(flat != 0, _assign(flat, codebook), codebook.shape[0])
  return Codebook(codebook, idx.reshape(w.shape))


def decode(codebook: Any, indices: Any) -> jax.Array:
  """Rebuilds the weights ``codebook[indices]`` (the index ``len(codebook)``, a masked weight,
  gives 0).

  Differentiable in ``codebook``: its gradient is the per-centroid sum of the weight gradients.

  Raises:
    ConfigError: for a codebook that is not one non-empty vector, indices that are not integers
      or (outside ``jit`` only) indices outside ``[0, len(codebook)]``.
  """
  _check_codebook(codebook, "decode")
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ConfigError(f"decode: indices must be integers (positions in the codebook), got dtype "
                      f"{indices.dtype}")
  idx, n = concrete(indices), jnp.shape(codebook)[0]
  if idx is not None and np.any((idx < 0) | (idx > n)):
    bad = np.unique(idx[(idx < 0) | (idx > n)])
    raise ConfigError(f"decode: indices must be in [0, {n}] (a centroid, or {n} for a masked "
                      f"weight), got {bad[:4].tolist()}{' ...' if bad.size > 4 else ''}")
  return jnp.take(jnp.asarray(codebook), indices, mode="fill", fill_value=0)


def codebook_grad(grad: Any, indices: Any, num_centroids: int) -> jax.Array:
  """Maps a dense weight gradient to the codebook gradient: ``sum`` of each centroid's members.

  Args:
    grad: gradient of the loss w.r.t. the decoded weights (shape of ``indices``).
    indices: the :class:`Codebook` indices.
    num_centroids: codebook size ``2^bits``.

  Returns:
    ``[num_centroids]`` gradient; masked-out weights (index ``num_centroids``) contribute nothing.

  Raises:
    ConfigError: for a ``num_centroids`` that is not an integer >= 1.
  """
  check_counts({"num_centroids": num_centroids})
  return jax.ops.segment_sum(jnp.ravel(grad), jnp.ravel(indices), num_segments=num_centroids)


def cluster_params(params: Any, rules: Sequence[Rule] | Rules, *, iters: int = 30,
                   masks: Any | None = None) -> dict[str, Codebook]:
  """Clusters the parameter leaves that ``rules`` select.

  Args:
    params: a parameter pytree (e.g. ``variables['params']``).
    rules: ordered ``(regex, bits)`` rules over ``/``-joined leaf paths, e.g.
      ``[("conv1/kernel", 8), (".*/kernel", 4), (".*", None)]``; first full match wins, ``None``
      leaves a leaf alone; rules that matched nothing are reported with a warning.
    iters: Lloyd iterations per leaf.
    masks: optional pytree like ``params`` of boolean keep-masks (pruning; a ``None`` leaf keeps
      every weight of its leaf), or ``None``.

  Returns:
    ``{leaf path: Codebook}`` for every selected leaf.

  Raises:
    ConfigError: for a malformed rule, bits outside 2..8 or ``masks`` without a selected leaf.
  """
  compiled = rules if isinstance(rules, Rules) else Rules(rules, field="kmeans.rules")
  # Masks by path, not by position: a None mask (no pruning there) is no leaf of the flattened
  # tree, so zipping leaves would hand each weight after it the next weight's mask.
  flat_masks = [] if masks is None else jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda m: m is None)[0]
  by_path = {path_str(kp): m for kp, m in flat_masks}
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(keypath)
    bits = compiled.lookup(path)
    if bits is not None:
      check_bits(bits, f"kmeans bits for {path}")
      if masks is not None and path not in by_path:
        raise ConfigError(f"kmeans masks has no entry {path!r}; give a pytree like params "
                          "(None where every weight is kept)")
      out[path] = kmeans(leaf, bits=bits, iters=iters, mask=by_path.get(path))
  compiled.report_unused()
  return out


def decode_params(params: Any, codebooks: dict[str, Codebook | jax.Array],
                  indices: dict[str, jax.Array] | None = None) -> Any:
  """``params`` with every clustered leaf replaced by its decoded weights.

  Args:
    params: the parameter pytree the codebooks were made from.
    codebooks: ``{path: Codebook}`` from :func:`cluster_params`; or, for fine-tuning, ``{path:
      codebook array}`` (the trainable part) together with ``indices``.
    indices: ``{path: indices}`` when ``codebooks`` holds bare arrays.

  Returns:
    A pytree like ``params``; differentiable w.r.t. the codebook arrays.

  Raises:
    ConfigError: for a bare codebook array whose indices ``indices`` does not hold.

  Example:
    >>> cbs = cluster_params(params, [(".*/kernel", 4), (".*", None)])
    >>> idx = {p: c.indices for p, c in cbs.items()}
    >>> books_loss = lambda books: loss(decode_params(params, books, idx), batch)
    >>> grads = jax.grad(books_loss)({p: c.codebook for p, c in cbs.items()})
    >>> grads["conv2/kernel"].shape   # one gradient per centroid (4 bits: 16)
    (16,)
  """

  def replace(keypath, leaf):
    path = path_str(keypath)
    if path not in codebooks:
      return leaf
    entry = codebooks[path]
    if isinstance(entry, Codebook):
      return decode(entry.codebook, entry.indices).astype(leaf.dtype)
    if indices is None or path not in indices:
      raise ConfigError(f"decode_params: indices has no entry {path!r} for its bare codebook "
                        "array; pass indices={path: Codebook.indices} or the Codebooks themselves")
    return decode(entry, indices[path]).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(replace, params)
