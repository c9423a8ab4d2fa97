"""Pruning inside an optax optimizer: masks, step count and score sums live in its state.

``prune(inner, schedule)`` wraps any ``optax.GradientTransformation``. Every ``update_every``
steps (under ``jax.lax.cond``, so one compiled step serves all) it recomputes the masks at the
sparsity ``schedule(count)``, from the raw gradients it receives and the current parameters.

* Hard masking (default): gradients are masked before ``inner``, and the emitted updates are
  ``u`` where kept and ``-params`` where pruned, so after every ``optax.apply_updates`` pruned
  weights are exactly ``0`` (``p + (-p) == 0`` in floating point). A pruned weight stays pruned:
  whatever the score, which could rank it above a kept weight (a movement score's frozen running
  sum; a tie at 0 with a kept weight of zero gradient, or one that training moved to exactly 0),
  each refresh scores it ``-inf``, and the maskers rank it, its channel or its kernel lowest.
* Straight-through (``straight_through=True``): the dense weights are kept and updated with the
  unmasked ``inner`` updates; the forward pass uses ``apply_masks_ste(params, current_masks(s))``.

Example:
  >>> from jaxcompress.pruning import polynomial_schedule
  >>> schedule = polynomial_schedule(0.9, 0, 1000, initial_sparsity=0.5)
  >>> opt = prune(optax.sgd(0.1, momentum=0.9), schedule, update_every=100)
  >>> opt_state = opt.init(params)
  >>> grads = jax.grad(loss)(params, batch)
  >>> updates, opt_state = opt.update(grads, opt_state, params)
  >>> params = optax.apply_updates(params, updates)   # pruned entries exactly 0
  >>> int((params["conv2"]["kernel"] == 0).sum())      # round(0.5 * 3 * 3 * 8 * 16)
  576

Contract (hard masking): the guarantee is about the *final* update. Pruned weights are exactly 0
only if the updates the wrapper emits reach ``optax.apply_updates`` unchanged, so the wrapper must
be the outermost transform: the last one in an ``optax.chain`` (``chain(clip, prune(adam, s))``),
with every other transform (clipping, weight decay, ``optax.chain``, ``optax.masked``,
``optax.multi_transform``) inside ``inner`` or before it. A transform after it breaks the guarantee
and cannot be repaired from inside: ``chain(prune(adam, s), scale(0.5))`` turns the ``-p`` of a
pruned weight into ``-p / 2`` and leaves ``p / 2``. Wrapping the whole wrapper in ``optax.masked``,
``optax.multi_transform`` or ``optax.MultiSteps`` is fine, as these pass its updates through
unchanged. Misuse is detected at the first update after pruned weights were due to be 0: if any of
them is not, a one-line ``UserWarning`` starting ``prune:`` is issued (from a host callback, so
also under ``jit``; Python shows it once). It also fires when the parameters were changed outside
the optimizer. ``check_updates=False`` leaves the check (and its host callback) out of the step.

References:
  Zhu, Gupta. To prune, or not to prune. arXiv:1710.01878, 2017 (gradual pruning in training).
  Lin, Stich, Barba, Dmitriev, Jaggi. Dynamic Model Pruning with Feedback. ICLR 2020
  (straight-through dense weights).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxcompress.errors import ConfigError, invalid
from jaxcompress.pruning.masks import Masker, check_masker
from jaxcompress.pruning.schedules import Schedule
from jaxcompress.pruning.scores import Score, get_score, leaf_scores
from jaxcompress.pruning.select import compile_rules, select
from jaxcompress.pruning.tree import apply_masks, grads_like
from jaxcompress.rules import Rule


MOVED_WARNING = (
    "prune: weights pruned by the previous update are not exactly 0; a transform after prune() "
    "changed its updates (e.g. optax.chain(prune(...), optax.scale(0.5))) or the parameters were "
    "changed outside the optimizer; make prune the last transform: optax.chain(..., "
    "prune(inner, schedule)), with other transforms inside inner")


def _warn_moved() -> None:
  warnings.warn(MOVED_WARNING, UserWarning)


class PruneState(NamedTuple):
  """Optimizer state of :func:`prune`; a plain pytree, checkpointed like any optax state.

  Invariants: ``masks`` has the structure and dtypes of the parameters, values 0/1, all ones on
  leaves the rules do not select; ``count`` is the number of ``update`` calls so far;
  ``score_sums`` holds one running sum per selected leaf for accumulating scores (movement) and
  is ``()`` otherwise.
  """
  count: jax.Array
  masks: Any
  score_sums: tuple
  inner_state: optax.OptState


def prune(inner: optax.GradientTransformation, schedule: Schedule, *,
          score: str | Score = "magnitude", structure: Masker | None = None,
          rules: Sequence[Rule] | None = None, update_every: int = 1,
          straight_through: bool = False, seed: int = 0,
          check_updates: bool = True) -> optax.GradientTransformation:
  """Wraps ``inner`` so that training follows a sparsity schedule.

  Args:
    inner: the optimizer to wrap (e.g. ``optax.sgd(0.1, momentum=0.9)``).
    schedule: ``step -> sparsity`` (see :mod:`jaxcompress.pruning.schedules`).
    score: a name in :data:`~jaxcompress.pruning.scores.SCORES` or a ``Score``; gradient scores
      read the raw gradients passed to ``update`` (before ``inner``).
    structure: masker (``unstructured("layer")`` by default, ``unstructured("global")``,
      ``channels("l1")``, ``n_of_m(2, 4)``).
    rules: leaf selection; default :data:`~jaxcompress.pruning.select.DEFAULT_RULES`.
    update_every: masks are recomputed on steps ``0, update_every, 2 * update_every, ...``.
    straight_through: keep dense weights (see the module docstring); off, the wrapper must be
      the outermost transform (last in an ``optax.chain``; see the module docstring's contract).
    seed: seed of the random score, drawn once: every refresh ranks the weights alike.
    check_updates: with hard masking, check at every update that the weights the previous update
      pruned are 0 (see the module docstring's contract). The check's host callback costs the
      step a few milliseconds (2-3 ms on a 2-core CPU); pass False where the wrapper is known to
      be the outermost transform, as :func:`jaxcompress.compose.build` does.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruneState`; ``update`` needs
    ``params``. With hard masking, ``update`` warns (one ``prune:`` line) when weights that its
    previous update pruned are not exactly 0 in ``params``, e.g. because a transform after it in
    an ``optax.chain`` rescaled its updates.

  Raises:
    ConfigError: for a bad argument (at construction), or ``update`` without ``params``.
  """
  score = get_score(score)
  compile_rules(rules)
  structure = check_masker(structure)
  if not callable(schedule):
    raise invalid("prune.schedule", schedule, "a step -> sparsity function",
                  "e.g. polynomial_schedule(0.9, 0, 1000)")
  if not isinstance(update_every, numbers.Integral) or update_every < 1:
    raise invalid("prune.update_every", update_every, "an integer >= 1")

  # Any score may rank a pruned weight (0) above or level with a kept one: a gradient score
  # above it, a magnitude tied with a kept weight that training moved to exactly 0.
  frozen = not straight_through
  final = getattr(schedule, "final", None)  # the library's schedules: their final sparsity

  def init_fn(params):
    sel = select(params, rules)
    weights = sel.pick(sel.leaves)
    sums = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights) if score.accumulate else ()
    masks = jax.tree.map(jnp.ones_like, params)
    return PruneState(jnp.zeros([], jnp.int32), masks, sums, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ConfigError("prune: update needs params, got None; call "
                        "opt.update(grads, opt_state, params)")
    sel = select(params, rules, warn_unused=False)
    weights = sel.pick(sel.leaves)
    grads = sel.pick(grads_like(sel, updates, "updates"))
    # One draw for the whole run: a weight pruned stays pruned (hard masks zeroed it), and a
    # growing sparsity prunes the next-lowest scores, as with every other score.
    key = jax.random.PRNGKey(seed)
    sums = state.score_sums
    if score.accumulate:
      sums = tuple(a + s for a, s in zip(sums, leaf_scores(score, weights, grads, key)))

    def refresh(_):
      scores = list(sums) if score.accumulate else leaf_scores(score, weights, grads, key)
      if frozen:  # a pruned weight is 0 and stays so: it ranks below every other
        scores = [jnp.where(m != 0, s, -jnp.inf)
                  for s, m in zip(scores, sel.pick(sel.flat(state.masks)))]
      paths, sparsity = sel.pick(sel.paths), schedule(state.count)
      if final is None:
        keep = structure(paths, scores, sparsity)
      else:  # at the end, the Python number: float32 may round sparsity * n across a half
        keep = jax.lax.cond(sparsity >= final, lambda: structure(paths, scores, final),
                            lambda: structure(paths, scores, sparsity))
      return sel.masks_tree(keep)

    masks = jax.lax.cond(state.count % update_every == 0, refresh, lambda _: state.masks, None)
    if check_updates and not straight_through and weights:
      # The previous update emitted -p where state.masks is 0: applied unchanged, those weights
      # are exactly 0 now. Any that is not means the contract is broken (see the docstring).
      moved = [jnp.any((m == 0) & (w != 0)) for m, w in zip(sel.pick(sel.flat(state.masks)),
                                                            weights)]
      jax.lax.cond(jnp.any(jnp.stack(moved)), lambda: jax.debug.callback(_warn_moved),
                   lambda: None)
    if straight_through:
      out, inner_state = inner.update(updates, state.inner_state, params)
    else:
      inner_updates, inner_state = inner.update(apply_masks(updates, masks), state.inner_state,
                                                params)
      out = jax.tree.map(lambda u, p, m: jnp.where(m != 0, u, -p), inner_updates, params, masks)
    count = optax.safe_increment(state.count)
    return out, PruneState(count, masks, sums, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def current_masks(opt_state: Any) -> Any:
  """The masks held by the one :class:`PruneState` inside ``opt_state`` (chained or not).

  Use them in the forward pass of a straight-through run:
  ``model.apply({"params": apply_masks_ste(params, current_masks(opt_state))}, x)``.

  Raises:
    ConfigError: if ``opt_state`` holds no ``PruneState`` or more than one.
  """
  found = [s for s in jax.tree_util.tree_leaves(opt_state,
                                                is_leaf=lambda s: isinstance(s, PruneState))
           if isinstance(s, PruneState)]
  if len(found) != 1:
    raise invalid("opt_state", f"<{len(found)} PruneState>", "a state holding exactly one "
                  "PruneState", "build the optimizer with jaxcompress.pruning.prune")
  return found[0].masks
