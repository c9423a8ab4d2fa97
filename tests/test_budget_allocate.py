"""The allocator against brute force on small random multiple-choice knapsacks."""

import itertools

import numpy as np
import pytest

from jaxcompress.budget import allocate, min_cost
from jaxcompress.errors import ConfigError


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
  assert got is not None  # the budget is at least the cheapest plan's cost, which always fits
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


@pytest.mark.parametrize("seed", range(20))
def test_large_byte_budgets_stay_exact_while_the_slack_is_small(seed):
  # Budgets of 0.2 to 2 MB: costs taken above each layer's cheapest option, the table spans the
  # slack, not the budget, so whole bytes still give the exact optimum.
  rng = np.random.default_rng(300 + seed)
  costs = [rng.integers(40_000, 400_000) + rng.integers(0, 30_000, 3) for _ in range(5)]
  damages = [rng.normal(size=3) for _ in costs]
  budget = int(min_cost(costs) + rng.integers(0, 60_000))
  got = allocate(costs, damages, budget)
  assert got.gap == 0 and got.unit == 1.0
  assert got.damage == pytest.approx(_brute(costs, damages, budget))
  assert got.cost <= budget


def test_the_cheapest_plan_fits_a_budget_of_exactly_its_cost():
  costs = [[212_000.0, 250_000.0], [271.0, 900.5]]
  got = allocate(costs, [[1.0, 0.0], [1.0, 0.0]], 212_271, max_units=50)
  assert got is not None and got.choice == (0, 0) and got.cost == 212_271
  assert allocate(costs, [[1.0, 0.0], [1.0, 0.0]], 212_270) is None
  unbounded = allocate(costs, [[1.0, 0.0], [1.0, 0.0]], float("inf"))
  assert unbounded.choice == (1, 1) and unbounded.damage == 0.0


@pytest.mark.parametrize("extra", [0.0, 1e-7, 0.3])
def test_a_slack_near_zero_with_large_costs_is_no_crash(extra):
  # Float costs of tens of millions (BOPs) and a budget at or just above the cheapest plan: the
  # unit of the slack is tiny, and no cost above the cheapest may overflow the table's integers.
  # By hand: (0, 0) costs 30,000,000.5, (0, 1) 30,000,000.6 (within the last budget), (1, _) 5e7.
  costs = [[20_000_000.5, 40_000_000.0], [10_000_000.0, 10_000_000.1]]
  damages = [[1.0, 0.0], [1.0, 0.5]]
  budget = 30_000_000.5 + extra
  got = allocate(costs, damages, budget)
  want = _brute(costs, damages, budget)
  assert got.damage == pytest.approx(want) and got.cost <= budget
  assert got.lower_bound - 1e-12 <= want


def test_infinite_damage_forbids_an_option_and_nan_or_missing_damages_are_one_line():
  # By hand: option 0 of layer 0 is forbidden (inf). Within 2 only (0, 0) fits: no plan; within
  # 3, (1, 0) at damage 0.
  costs, damages = [[1, 2], [1, 2]], [[np.inf, 0.0], [0.0, 1.0]]
  assert allocate(costs, damages, 2) is None
  got = allocate(costs, damages, 3)
  assert got.choice == (1, 0) and got.damage == _brute(costs, damages, 3) == 0.0
  with pytest.raises(ConfigError, match=r"^allocate: damages\[1\]\[0\] must be a number \(inf: "
                     r"never this option\), got nan$"):
    allocate(costs, [[1.0, 0.0], [np.nan, 1.0]], 3)
  with pytest.raises(ConfigError, match=r"^allocate: damages must give one number per option of "
                     r"every layer, as costs do \(\[2, 2\]\), got \[2, 1\]$"):
    allocate(costs, [[1.0, 0.0], [1.0]], 3)


@pytest.mark.parametrize("costs,budget,match", [
    ([[1, np.nan], [1, 2]], 3, r"^allocate: costs\[0\]\[1\] must be a number, got nan$"),
    ([[1, 2], [1, 2]], np.nan, r"^allocate: budget must be a number \(inf: no limit\), got nan$"),
    ([[1, 2], [1, 2]], "3", r"^allocate: budget must be a number \(inf: no limit\), got '3'$"),
])
def test_a_nan_cost_or_a_budget_that_is_no_number_is_one_line(costs, budget, match):
  with pytest.raises(ConfigError, match=match):
    allocate(costs, [[0.0, 1.0], [0.0, 1.0]], budget)


def test_a_coarse_unit_still_finds_the_plan_of_finite_damage():
  # By hand: option 0 of each layer is forbidden (inf), so the plans of finite damage are
  # (1, 1) at cost 2, damage 3 and (1, 2) at cost 2.5, damage 1.5: the optimum within 2.5 is
  # (1, 2). Units taken above the cheapest plan (cost 0) would be 2.5 wide and round both
  # options up to one unit each, more than the one unit of the table: no plan at all.
  costs, damages = [[0, 1], [0, 1, 1.5]], [[np.inf, 1.0], [np.inf, 2.0, 0.5]]
  got = allocate(costs, damages, 2.5, max_units=1)
  assert got.choice == (1, 2) and got.damage == _brute(costs, damages, 2.5) == 1.5
  assert got.cost == 2.5 and got.gap == 0


def test_forbidden_options_with_coarse_units_stay_within_the_stated_gap():
  rng = np.random.default_rng(59)
  for _ in range(300):
    costs = [rng.uniform(0, 10, 3).round(1) for _ in range(rng.integers(1, 5))]
    damages = [np.where(rng.random(3) < 0.5, np.inf, rng.uniform(0, 5, 3)) for _ in costs]
    budget = float(rng.uniform(0, 10 * len(costs)))
    got = allocate(costs, damages, budget, max_units=int(rng.integers(1, 31)))
    want = _brute(costs, damages, budget)
    if not np.isfinite(want):
      assert got is None
      continue
    assert got is not None and got.cost <= budget
    assert got.lower_bound - 1e-9 <= want <= got.damage + 1e-9
