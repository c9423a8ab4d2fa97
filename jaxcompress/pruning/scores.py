"""Pruning scores: how much each weight matters. Low scores are pruned first.

Every score is an array function with one signature, ``fn(w, g, key) -> scores``: the weights of
one leaf, their gradient (``None`` where the caller has none) and a PRNG key (``None`` where the
score needs none), returning an array of ``w``'s shape. A :class:`Score` wraps the function with
what it needs, so adding a criterion is one line:

  >>> from jaxcompress.pruning import compute_masks
  >>> taylor2 = Score(lambda w, g, key: (w * g) ** 2, needs_grads=True)
  >>> masks = compute_masks(params, 0.5, score=taylor2, grads=jax.grad(loss)(params, batch))
  >>> float(masks["conv2"]["kernel"].mean())   # half of each layer's entries kept
  0.5

References:
  Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural Networks.
  NeurIPS 2015 (magnitude).
  Molchanov, Tyree, Karras, Aila, Kautz. Pruning Convolutional Neural Networks for Resource
  Efficient Inference. ICLR 2017 (first-order Taylor saliency ``|w * g|``).
  Sanh, Wolf, Rush. Movement Pruning: Adaptive Sparsity by Fine-Tuning. NeurIPS 2020
  (movement ``-sum_t w_t * g_t``).
  Lee, Park, Mo, Ahn, Shin. Layer-adaptive Sparsity for the Magnitude-based Pruning. ICLR 2021
  (LAMP).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, unknown

ScoreFn = Callable[[jax.Array, "jax.Array | None", "jax.Array | None"], jax.Array]


def magnitude(w: jax.Array, g: jax.Array | None, key: jax.Array | None) -> jax.Array:
  """``|w|``: small weights are pruned first."""
  del g, key
  return jnp.abs(w)


def random(w: jax.Array, g: jax.Array | None, key: jax.Array | None) -> jax.Array:
  """Uniform noise: a random mask with the requested sparsity (a baseline). Float32 draws, so a
  key gives the same mask with ``jax_enable_x64`` on or off."""
  del g
  return jax.random.uniform(key, w.shape, jnp.float32)


def saliency(w: jax.Array, g: jax.Array | None, key: jax.Array | None) -> jax.Array:
  """``|w * g|``: first-order Taylor estimate of the loss change when ``w`` is removed."""
  del key
  return jnp.abs(w * g)


def movement(w: jax.Array, g: jax.Array | None, key: jax.Array | None) -> jax.Array:
  """``-w * g``: positive when gradient descent moves ``w`` away from zero (one step of it)."""
  del key
  return -w * g


def lamp(w: jax.Array, g: jax.Array | None, key: jax.Array | None) -> jax.Array:
  """LAMP: ``w_u**2 / sum(w_v**2 for v >= u)`` within the leaf, its entries sorted by ``|w|``
  ascending (ties in index order), as Lee et al. sort them: two equal weights score apart
  (``[1, -1, 2]`` scores ``1/6, 1/5, 1``).

  Within one leaf it ranks like ``|w|``; across leaves (global scope) it sets each layer's
  sparsity so that no layer is emptied: every leaf's largest weight scores 1. Computed in
  float32 at least: float16 and bfloat16 weights get float32 scores (in float16 the running sums
  drop the small squares, and the ratios underflow).
  """
  del g, key
  sq = jnp.square(jnp.asarray(w, jnp.promote_types(w.dtype, jnp.float32))).ravel()
  order = jnp.argsort(sq)
  ranked = sq[order]
  tail = jnp.cumsum(ranked[::-1])[::-1]  # sum over this weight and every one sorted after it
  ranked = jnp.where(tail > 0, ranked / jnp.where(tail > 0, tail, 1), 0)
  return jnp.zeros_like(sq).at[order].set(ranked).reshape(w.shape)


class Score(NamedTuple):
  """A pruning criterion.

  Attributes:
    fn: ``fn(w, g, key) -> scores`` for one leaf.
    needs_grads: ``fn`` reads ``g`` (so callers must pass gradients).
    needs_key: ``fn`` reads ``key``.
    accumulate: inside :func:`~jaxcompress.pruning.prune` the optimizer state keeps the running
      sum of ``fn`` over every step, and masks are computed from that sum.
  """
  fn: ScoreFn
  needs_grads: bool = False
  needs_key: bool = False
  accumulate: bool = False


# The built-in scores by name, as ``prune.score`` and :func:`get_score` take them.
SCORES: dict[str, Score] = {
    "magnitude": Score(magnitude),
    "random": Score(random, needs_key=True),
    "saliency": Score(saliency, needs_grads=True),
    "movement": Score(movement, needs_grads=True, accumulate=True),
    "lamp": Score(lamp),
}


def get_score(score: str | Score) -> Score:
  """Looks up a score by name (one of :data:`SCORES`) or passes a :class:`Score` through.

  Raises:
    ConfigError: for an unknown name or a value that is neither a name nor a :class:`Score`.
  """
  if isinstance(score, Score):
    return score
  if isinstance(score, str) and score in SCORES:
    return SCORES[score]
  raise unknown("prune.score", score, SCORES)


def leaf_scores(score: Score, weights: Sequence[jax.Array],
                grads: Sequence[jax.Array] | None, key: jax.Array | None) -> list[jax.Array]:
  """Evaluates ``score.fn`` on every leaf, with its own key.

  Args:
    score: the criterion.
    weights: the leaves to score.
    grads: their gradients, aligned with ``weights``, or ``None``.
    key: a PRNG key, split into one per leaf, or ``None``.

  Returns:
    One score array per leaf.

  Raises:
    ConfigError: if the score needs gradients or a key and none was given.
  """
  if score.needs_grads and grads is None:
    raise ConfigError("grads must be given for a gradient-based score (saliency, movement), "
                      "got None; pass grads=jax.grad(loss)(params)")
  if score.needs_key and key is None:
    raise ConfigError("key must be a jax.random key for a random score, got None")
  if key is not None and not isinstance(key, (jax.Array, np.ndarray)):  # e.g. a seed
    raise ConfigError(f"key must be a jax.random key for a random score, got {key!r}; e.g. "
                      "jax.random.key(0)")
  keys = [None] * len(weights) if key is None else list(jax.random.split(key, len(weights)))
  grads = [None] * len(weights) if grads is None else grads
  return [score.fn(w, g, k) for w, g, k in zip(weights, grads, keys)]
