"""The allocator against brute force on small random multiple-choice knapsacks."""

import itertools

import numpy as np
import pytest

from jaxcompress.budget import allocate, min_cost


def _brute(costs, damages, budget):
  """The least summed damage over every plan within the budget (``inf`` if none)."""
  best = np.inf
  for choice in itertools.product(*[range(len(c)) for c in costs]):
    if sum(c[k] for c, k in zip(costs, choice)) <= budget:
      best = min(best, sum(d[k] for d, k in zip(damages, choice)))
  return best


@pytest.mark.parametrize("seed", range(30))
def test_integer_costs_give_the_exact_optimum(seed):
  rng = np.random.default_rng(seed)
  layers = rng.integers(1, 5)
  costs = [rng.integers(0, 60, rng.integers(1, 5)) for _ in range(layers)]
  damages = [rng.normal(size=len(c)) for c in costs]
  budget = int(rng.integers(0, sum(max(c) for c in costs) + 1))
  got = allocate(costs, damages, budget)
  want = _brute(costs, damages, budget)
  if not np.isfinite(want):
    assert got is None and min_cost(costs) > budget
    return
  assert got.gap == 0 and got.unit == 1.0
  assert got.damage == pytest.approx(want)
  spent = sum(c[k] for c, k in zip(costs, got.choice))
  assert spent == got.cost <= budget  # the budget is met exactly, never exceeded
  assert got.damage == pytest.approx(sum(d[k] for d, k in zip(damages, got.choice)))


@pytest.mark.parametrize("seed", range(30))
def test_discretised_costs_stay_within_the_stated_gap(seed):
  rng = np.random.default_rng(100 + seed)
  costs = [rng.uniform(0, 1e9, rng.integers(1, 5)) for _ in range(rng.integers(1, 5))]
  damages = [rng.uniform(0, 1, len(c)) for c in costs]
  budget = float(rng.uniform(min_cost(costs), sum(max(c) for c in costs)))
  got = allocate(costs, damages, budget, max_units=50)
  want = _brute(costs, damages, budget)
  if got is None:  # rounding costs up can exclude every plan near the budget
    return
  assert sum(c[k] for c, k in zip(costs, got.choice)) <= budget
  assert got.lower_bound - 1e-12 <= want <= got.damage + 1e-12
  assert got.damage - want <= got.gap + 1e-12


def test_fine_units_close_the_gap():
  rng = np.random.default_rng(7)
  costs = [rng.uniform(0, 1e9, 4) for _ in range(4)]
  damages = [rng.uniform(0, 1, 4) for _ in range(4)]
  budget = 0.6 * sum(max(c) for c in costs)
  got = allocate(costs, damages, budget, max_units=200_000)
  assert got.damage == pytest.approx(_brute(costs, damages, budget))
