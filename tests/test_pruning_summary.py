"""Sparsity summary: counts against hand-made trees, readable table."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxcompress.pruning import summary


def test_counts_and_totals():
  tree = {"a": {"kernel": np.array([[0.0, 1.0], [0.0, -0.0]])},  # -0.0 counts as zero
          "b": {"bias": np.array([2.0, 3.0, 0.0])}}
  s = summary(tree)
  assert [(r.path, r.shape, r.size, r.nonzero) for r in s.leaves] == [
      ("a/kernel", (2, 2), 4, 1), ("b/bias", (3,), 3, 2)]
  assert s.leaves[0].sparsity == 0.75
  assert (s.size, s.nonzero) == (7, 3) and abs(s.sparsity - 4 / 7) < 1e-12


def test_table_lists_every_leaf_and_the_total():
  table = summary({"a": {"kernel": np.zeros((2, 2))}, "b": np.ones(4)}).table().splitlines()
  assert len(table) == 4 and table[0].split() == ["path", "shape", "size", "nonzero", "sparsity"]
  assert table[1].split() == ["a/kernel", "(2,", "2)", "4", "0", "1.0000"]
  assert table[3].split() == ["total", "8", "4", "0.5000"]


def test_nnx_state_and_empty_leaf():
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  s = summary(state)
  assert [r.path for r in s.leaves] == ["bias", "kernel"]
  assert s.leaves[0].nonzero == 0 and s.leaves[1].nonzero == 6
  assert summary({"e": np.zeros(0)}).sparsity == 0.0
