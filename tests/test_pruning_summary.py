"""Sparsity summary: counts against hand-made trees, totals over selected leaves, readable table."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxcompress.pruning import summary


def test_counts_and_totals():
  tree = {"a": {"kernel": np.array([[0.0, 1.0], [0.0, -0.0]])},  # -0.0 counts as zero
          "b": {"bias": np.array([2.0, 3.0, 0.0])}}
  s = summary(tree)
  assert [(r.path, r.shape, r.size, r.nonzero, r.selected) for r in s.leaves] == [
      ("a/kernel", (2, 2), 4, 1, True), ("b/bias", (3,), 3, 2, False)]
  assert s.leaves[0].sparsity == 0.75 and abs(s.leaves[1].sparsity - 1 / 3) < 1e-12
  # Totals: the kernel only; the bias is not selected for pruning, so its zero is not counted.
  assert (s.size, s.nonzero, s.sparsity) == (4, 1, 0.75)


def test_zero_bias_does_not_count_as_pruned():
  # A half-zero kernel next to an all-zero bias (the usual Flax init): 50 % sparse, not 4 / 6.
  tree = {"dense": {"kernel": np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
                    "bias": np.zeros(2, np.float32)}}
  s = summary(tree)
  assert (s.size, s.nonzero) == (4, 2)
  assert s.sparsity == 0.5


def test_totals_follow_the_rules():
  tree = {"dense": {"kernel": np.array([[1.0, 0.0], [0.0, 2.0]]), "bias": np.zeros(2)}}
  both = summary(tree, rules=[(".*", True)])  # the bias selected too: 4 zeros of 6
  assert (both.size, both.nonzero) == (6, 2) and abs(both.sparsity - 4 / 6) < 1e-12
  none = summary(tree, rules=[(".*", False)])  # nothing selected: an empty total
  assert (none.size, none.nonzero, none.sparsity) == (0, 0, 0.0)
  assert [r.nonzero for r in none.leaves] == [0, 2]  # rows still list every leaf


def test_table_lists_every_leaf_and_the_selected_total():
  table = summary({"a": {"kernel": np.zeros((2, 2))}, "b": np.ones(4)}).table().splitlines()
  assert len(table) == 4
  assert table[0].split() == ["path", "shape", "size", "nonzero", "sparsity", "selected"]
  assert table[1].split() == ["a/kernel", "(2,", "2)", "4", "0", "1.0000", "yes"]
  assert table[2].split() == ["b", "(4,)", "4", "4", "0.0000", "no"]
  assert table[3].split() == ["total", "(selected)", "4", "0", "1.0000"]


def test_nnx_state_and_empty_leaf():
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  s = summary(state)
  assert [r.path for r in s.leaves] == ["bias", "kernel"]
  assert s.leaves[0].nonzero == 0 and s.leaves[1].nonzero == 6
  assert (s.size, s.nonzero, s.sparsity) == (6, 6, 0.0)  # the zero bias is not pruned
  assert summary({"e": np.zeros(0)}).sparsity == 0.0
