"""Damage in context: differences of whole-plan losses around a reference, by hand."""

import numpy as np
import pytest

from jaxcompress import budget
from jaxcompress.budget import Option

SHAPES = {"a": (10,), "b": (20,)}


def _keep(path, s):
  n = SHAPES[path][0]
  return np.arange(n) >= round(s * n)  # the first round(s * n) entries pruned


def _loss(keeps, wbits, abits):
  """A made-up loss with an interaction: pruned fractions multiply, low bits add."""
  pruned = {p: 1 - float(np.mean(keeps[p])) if p in keeps else 0.0 for p in SHAPES}
  bits = sum(1.0 / wbits[p] for p in SHAPES if wbits.get(p))
  return 1.0 + pruned["a"] + pruned["b"] + 2 * pruned["a"] * pruned["b"] + bits, 0.5


def test_damages_are_whole_plan_differences_around_the_reference():
  ref = budget.reference_of({"a": _keep("a", 0.5)}, {"a": 4, "b": 8}, {"a": 8, "b": 8})
  assert ref.options == {"a": Option(0.5, 4, 8), "b": Option(0.0, 8, 8)}
  calls = []
  evaluate = lambda *args: calls.append(args) or _loss(*args)
  options = {"a": [Option(0.0, 4, 8), Option(0.9, 2, 8)],
             "b": [Option(0.0, 8, 8), Option(0.5, 8, 8), Option(0.5, 4, 8)]}
  base, opts, damage, measured = budget.context_damage(evaluate, ref, options, _keep)
  assert base == pytest.approx(1.5 + 1 / 4 + 1 / 8)
  assert opts["a"][-1] == Option(0.5, 4, 8) and damage["a"][-1] == 0  # the reference, appended
  assert opts["b"] == options["b"] and damage["b"][0] == 0  # already an option
  # a: pruned 0.5 -> 0 (-0.5), 4 -> 2 bits (+1/4); 0.9 with b dense: +0.4
  assert damage["a"][0] == pytest.approx(-0.5)
  assert damage["a"][1] == pytest.approx(0.4 + (1 / 2 - 1 / 4))
  # b pruned 0.5 next to a pruned 0.5: +0.5 + 2 * 0.25 (the interaction the scan cannot see)
  assert damage["b"][1] == pytest.approx(1.0)
  assert damage["b"][2] == pytest.approx(1.0 + (1 / 4 - 1 / 8))
  n = len(calls)
  again = budget.context_damage(evaluate, ref, options, _keep, measured=measured)
  assert len(calls) == n  # every point reused
  np.testing.assert_array_equal(again[2]["b"], damage["b"])
