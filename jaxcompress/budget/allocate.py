"""Allocation: one option per layer, least summed damage, total cost within the budget.

This is the multiple-choice knapsack problem; :func:`allocate` solves it exactly by dynamic
programming over the budget's slack: what it leaves above the cheapest plan of finite damage
(each layer's costs are taken relative to its cheapest option of finite damage, so the table
spans the slack, not the budget). Costs are integers (bytes) or are discretised to at most
``max_units`` units of ``unit = slack / max_units``:

- each cost is rounded **up** to whole units, so every plan the program accepts meets the true
  budget;
- the same program with costs rounded **down** is a relaxation (every plan within the true budget
  fits it), so its optimum is a lower bound of the true optimum.

:attr:`Allocation.gap` is the difference of the two: 0 when costs are whole units (bytes with a
slack of at most ``max_units`` bytes), and otherwise the most the returned plan can lose to the
true optimum. The cheapest plan of finite damage always fits its own cost, however coarse the
unit. Time and memory are ``O(layers x options x units)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from jaxcompress.errors import ConfigError, invalid, is_number


class Allocation(NamedTuple):
  """The chosen plan.

  Invariants: ``sum(costs[i][choice[i]]) <= budget``; ``damage`` is the plan's summed damage and
  ``lower_bound <= optimum <= damage`` with ``gap = damage - lower_bound``.
  """
  choice: tuple[int, ...]
  damage: float
  cost: float
  lower_bound: float
  unit: float

  @property
  def gap(self) -> float:
    return self.damage - self.lower_bound


def min_cost(costs: Sequence[Sequence[float]]) -> float:
  """The smallest total cost any plan reaches (each layer at its cheapest option)."""
  return float(sum(min(c) for c in costs))


def _solve(units: list[np.ndarray], damages: list[np.ndarray], capacity: int):
  """Exact DP on integer costs: ``(choice, damage)`` or ``None`` when nothing fits."""
  best = np.zeros(capacity + 1)  # best[c]: least damage of the layers so far at cost <= c
  picks = []
  for cost, dmg in zip(units, damages):
    cand = np.full((len(cost), capacity + 1), np.inf)
    for k, (c, d) in enumerate(zip(cost, dmg)):
      if c <= capacity:
        cand[k, c:] = best[:capacity + 1 - c] + d
    picks.append(np.argmin(cand, axis=0))
    best = cand[picks[-1], np.arange(capacity + 1)]
  if not np.isfinite(best[capacity]):
    return None
  choice, c = [], capacity
  for layer in range(len(units) - 1, -1, -1):
    k = int(picks[layer][c])
    choice.append(k)
    c -= int(units[layer][k])
  return tuple(reversed(choice)), float(best[capacity])


def allocate(costs: Sequence[Sequence[float]], damages: Sequence[Sequence[float]],
             budget: float, *, max_units: int = 200_000) -> Allocation | None:
  """The least-damage plan within ``budget`` (see the module docstring).

  Args:
    costs: per layer, the cost of each option (bytes, BOPs; >= 0).
    damages: per layer, the predicted damage of each option.
    budget: the most the plan may cost in total.
    max_units: the largest DP table (units of the budget).

  Returns:
    The :class:`Allocation`, or ``None`` if every plan within ``budget`` takes an option of
    infinite damage (or even the cheapest plan exceeds it).

  Raises:
    ConfigError: for damages of another shape than the costs, a nan cost or damage, or a budget
      that is not a number (nan).
  """
  costs = [np.asarray(c, np.float64) for c in costs]
  damages = [np.asarray(d, np.float64) for d in damages]
  if [np.shape(c) for c in costs] != [np.shape(d) for d in damages]:
    raise ConfigError(f"allocate: damages must give one number per option of every layer, as "
                      f"costs do ({[len(c) for c in costs]}), got {[np.size(d) for d in damages]}")
  for name, values, valid in (("costs", costs, "a number"),
                              ("damages", damages, "a number (inf: never this option)")):
    for i, v in enumerate(values):
      if np.any(np.isnan(v)):
        raise invalid(f"allocate: {name}[{i}][{int(np.argmax(np.isnan(v)))}]", float("nan"), valid)
  if not is_number(budget) or np.isnan(budget):
    raise invalid("allocate: budget", budget, "a number (inf: no limit)")
  allowed = [d < np.inf for d in damages]  # an option of infinite damage is never taken
  if not all(np.any(a) for a in allowed):
    return None
  base = [float(np.min(c[a])) for c, a in zip(costs, allowed)]
  if sum(base) > budget:  # even the cheapest plan of finite damage exceeds the budget
    return None
  # Each allowed option's cost above the layer's cheapest allowed one; the others never fit.
  extra = [np.where(a, c - b, np.inf) for c, a, b in zip(costs, allowed, base)]
  slack = min(float(budget) - sum(base), 1e300)  # an unbounded budget leaves every option open
  integral = all(np.all(c == np.round(c)) for c in costs)
  if integral and slack <= max_units:
    unit = 1.0
  else:
    unit = max(slack / max_units, 1e-12)
  capacity = int(math.floor(slack / unit + 1e-9))

  def units(c, up):  # capped at capacity + 1 (never fits): a fine unit cannot overflow int64
    u = np.ceil(c / unit - 1e-9) if up else np.floor(c / unit + 1e-9)
    return np.minimum(u, capacity + 1).astype(np.int64)

  choice, damage = _solve([units(c, True) for c in extra], damages, capacity)  # base plan fits
  down = [units(c, False) for c in extra]
  lower = damage if unit == 1.0 and integral else _solve(down, damages, capacity)[1]
  cost = float(sum(c[k] for c, k in zip(costs, choice)))
  return Allocation(choice, damage, cost, min(lower, damage), unit)
