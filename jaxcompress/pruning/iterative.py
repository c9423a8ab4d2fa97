"""Iterative pruning: rounds of prune -> fine-tune -> validate at rising sparsity.

Pure orchestration: the caller brings the training and the evaluation as callables, so the same
loop serves a toy test and a CIFAR run. Validate on a held-out slice of the *training* split; the
test split is for the final report only.

Example (a toy: no training, and the share of the weight mass kept stands in for accuracy):
  >>> params = {"dense": {"kernel": jnp.arange(1.0, 11.0).reshape(2, 5)}}   # sum 55
  >>> finetune = lambda params, masks, r: params        # your training, masks kept
  >>> validate = lambda params: round(float(params["dense"]["kernel"].sum()) / 55, 3)
  >>> result = iterative_prune(params, [0.5, 0.7, 0.8, 0.9], finetune, validate, tolerance=0.3)
  >>> result.sparsity, result.accuracy, [r.accuracy for r in result.history]  # 40/55, 27/55
  (0.5, 0.727, [0.727, 0.491])

References:
  Han, Pool, Tran, Dally. Learning both Weights and Connections for Efficient Neural Networks.
  NeurIPS 2015 (iterative prune and retrain).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.errors import invalid
from jaxcompress.pruning.masks import check_sparsities
from jaxcompress.pruning.tree import apply_masks, magnitude_masks


class Round(NamedTuple):
  """One round: its index, target sparsity, validation accuracy after fine-tuning, and whether
  that accuracy stayed within the tolerance of the dense model."""
  index: int
  sparsity: float
  accuracy: float
  within_tolerance: bool


class IterativeResult(NamedTuple):
  """Outcome of :func:`iterative_prune`.

  Invariants: ``history`` lists the rounds run, in order; every round but possibly the last is
  within tolerance; ``params``/``masks``/``sparsity``/``accuracy`` belong to the last round within
  tolerance, or to the dense model (all-ones masks, sparsity 0) when the first round fails.
  """
  dense_accuracy: float
  history: tuple[Round, ...]
  sparsity: float
  accuracy: float
  params: Any
  masks: Any


def iterative_prune(params: Any, sparsities: Sequence[float],
                    finetune: Callable[[Any, Any, int], Any],
                    validate: Callable[[Any], float], *, tolerance: float = 0.01,
                    mask_fn: Callable[[Any, float], Any] = magnitude_masks) -> IterativeResult:
  """Raises sparsity round by round and keeps the sparsest model within ``tolerance``.

  Round ``r`` computes ``masks = mask_fn(params, sparsities[r])`` from the previous round's
  weights, fine-tunes ``finetune(apply_masks(params, masks), masks, r)``, re-applies the masks
  (so the validated weights have exactly that sparsity), and validates. The loop stops at the
  first round whose accuracy falls below ``dense_accuracy - tolerance``.

  Args:
    params: the dense, trained parameters.
    sparsities: strictly increasing targets in [0, 1), one per round.
    finetune: ``finetune(params, masks, round) -> params``; should keep masked weights at zero
      (e.g. train with :func:`~jaxcompress.pruning.prune` and a constant schedule).
    validate: ``validate(params) -> accuracy``.
    tolerance: largest accepted drop below the dense accuracy, in ``validate``'s units, >= 0.
    mask_fn: ``mask_fn(params, sparsity) -> masks``; layer-wise magnitude by default.

  Returns:
    The :class:`IterativeResult`.

  Raises:
    ConfigError: for an empty or non-increasing ``sparsities``, a value outside [0, 1), or a
      negative or NaN ``tolerance``.
  """
  if isinstance(sparsities, str) or not hasattr(sparsities, "__iter__"):  # e.g. one number
    raise invalid("iterative.sparsities", sparsities, "a non-empty list of sparsities in [0, 1)",
                  f"one round: [{sparsities!r}]")
  sparsities = list(sparsities)
  check_sparsities(sparsities, "iterative.sparsities", increasing=True)
  sparsities = [float(s) for s in sparsities]
  if not isinstance(tolerance, numbers.Real) or not tolerance >= 0:  # NaN: no round passes
    raise invalid("iterative.tolerance", tolerance, "a number >= 0")

  dense_accuracy = float(validate(params))
  chosen = (0.0, dense_accuracy, params, jax.tree.map(jnp.ones_like, params))
  history = []
  for index, sparsity in enumerate(sparsities):
    masks = mask_fn(params, sparsity)
    params = apply_masks(finetune(apply_masks(params, masks), masks, index), masks)
    accuracy = float(validate(params))
    ok = accuracy >= dense_accuracy - tolerance
    history.append(Round(index, sparsity, accuracy, ok))
    if not ok:
      break
    chosen = (sparsity, accuracy, params, masks)
  return IterativeResult(dense_accuracy, tuple(history), *chosen)
