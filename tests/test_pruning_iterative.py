"""Iterative pruning loop with toy callables whose accuracy is a known function of sparsity."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import iterative_prune

PARAMS = {"layer": {"kernel": np.arange(1.0, 101.0, dtype=np.float32).reshape(10, 10)}}


def sparsity_of(params):
  return float(np.mean(np.asarray(params["layer"]["kernel"]) == 0))


def validate(params):
  """Accuracy 0.9 until 60 % of the weights are gone, then it drops by 0.5 per unit sparsity."""
  return 0.9 - 0.5 * max(0.0, sparsity_of(params) - 0.6)


def test_stops_at_highest_sparsity_within_tolerance():
  calls = []

  def finetune(params, masks, index):
    calls.append(index)
    # A sloppy fine-tune that revives pruned weights: the loop must re-apply the masks.
    return {"layer": {"kernel": np.asarray(params["layer"]["kernel"]) + 1.0}}

  result = iterative_prune(PARAMS, [0.3, 0.5, 0.62, 0.7, 0.8, 0.9], finetune, validate,
                           tolerance=0.02)
  # Drops: 0, 0, 0.01, 0.05 -> stop after the fourth round; 0.62 is the last one within 0.02.
  assert calls == [0, 1, 2, 3]
  assert [r.sparsity for r in result.history] == [0.3, 0.5, 0.62, 0.7]
  assert [r.within_tolerance for r in result.history] == [True, True, True, False]
  assert result.dense_accuracy == pytest.approx(0.9)
  assert result.sparsity == 0.62 and result.accuracy == pytest.approx(0.89)
  assert sparsity_of(result.params) == 0.62
  assert int(np.sum(np.asarray(result.masks["layer"]["kernel"]) == 0)) == 62


def test_rounds_build_on_previous_weights():
  # Magnitude masks of the fine-tuned weights: the smallest entries go first, round after round.
  result = iterative_prune(PARAMS, [0.1, 0.2], lambda p, m, i: p, validate, tolerance=0.0)
  kernel = np.asarray(result.params["layer"]["kernel"]).ravel()
  assert np.all(kernel[:20] == 0) and np.all(kernel[20:] == np.arange(21.0, 101.0))


def test_first_round_failing_returns_the_dense_model():
  result = iterative_prune(PARAMS, [0.9], lambda p, m, i: p, validate, tolerance=0.01)
  assert result.sparsity == 0.0 and result.params is PARAMS
  assert np.all(np.asarray(result.masks["layer"]["kernel"]) == 1)
  assert len(result.history) == 1 and not result.history[0].within_tolerance


@pytest.mark.parametrize("sparsities, tolerance, needle", [
    ([], 0.01, "iterative.sparsities must be a non-empty list of sparsities in [0, 1)"),
    ([0.5, 0.5], 0.01, "iterative.sparsities[1] must be > iterative.sparsities[0]=0.5, got "
                        "0.5; list the targets in increasing order"),
    ([0.5, 1.0], 0.01, "iterative.sparsities[1] must be in [0.0, 1.0), got 1.0"),
    ([0.5], -0.1, "iterative.tolerance must be a number >= 0, got -0.1"),
    ([0.5], float("nan"), "iterative.tolerance must be a number >= 0, got nan"),
    (0.5, 0.01, "iterative.sparsities must be a non-empty list of sparsities in [0, 1), got 0.5; "
                "one round: [0.5]"),
    ([0.5, "0.7"], 0.01, "iterative.sparsities[1] must be a number in [0.0, 1.0), got '0.7'"),
])
def test_bad_input(sparsities, tolerance, needle):
  with pytest.raises(ConfigError) as err:
    iterative_prune(PARAMS, sparsities, lambda p, m, i: p, validate, tolerance=tolerance)
  assert needle in str(err.value)
