"""Sparsity summary and counter: counts against hand-made trees, totals over selected leaves,
the jitted counter agreeing with the summary, readable table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress import pruning
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
  table = summary({"a": {"kernel": np.zeros((2, 2))}, "b": np.ones(4)}).table()
  assert table == (
      "| path             | shape  | size | nonzero | sparsity | selected |\n"
      "| ---------------- | ------ | ---: | ------: | -------: | -------- |\n"
      "| a/kernel         | (2, 2) |    4 |       0 |   1.0000 | yes      |\n"
      "| b                | (4,)   |    4 |       4 |   0.0000 | no       |\n"
      "| total (selected) |        |    4 |       0 |   1.0000 |          |")


def _five_zeros() -> dict:
  """A [4, 4] kernel with exactly 5 zeros (one of them -0.0) and an all-zero bias."""
  kernel = np.arange(1.0, 17.0, dtype=np.float32)
  kernel[[0, 3, 7, 8, 15]] = 0.0
  kernel[15] = -0.0
  return {"dense": {"kernel": kernel.reshape(4, 4), "bias": np.zeros(4, np.float32)}}


def test_sparsity_counts_the_selected_zeros_and_agrees_with_the_summary():
  tree = _five_zeros()
  # Default rules: the kernel only (rank 2), 5 zeros of 16; the zero bias is not pruned.
  assert float(pruning.sparsity(tree)) == 5 / 16
  assert summary(tree).sparsity == float(pruning.sparsity(tree)) == 0.3125
  # Rules selecting the bias too: 5 + 4 zeros of 20 (0.45, which float32 rounds).
  rules = [(".*", True)]
  both = summary(tree, rules)
  assert (both.size, both.nonzero, both.sparsity) == (20, 11, 9 / 20)
  assert float(pruning.sparsity(tree, rules)) == float(np.float32(9 / 20))
  # Nothing selected: 0, like the summary's empty total.
  assert float(pruning.sparsity(tree, [(".*", False)])) == summary(tree, [(".*", False)]).sparsity
  assert float(pruning.sparsity({})) == 0.0


def test_sparsity_is_jittable_and_counts_traced_zeros():
  tree = jax.tree.map(jnp.asarray, _five_zeros())
  jitted = jax.jit(pruning.sparsity, static_argnums=1)
  assert float(jitted(tree, None)) == 0.3125
  scaled = jax.jit(lambda t: pruning.sparsity(jax.tree.map(lambda x: x * 0.0, t)))(tree)
  assert float(scaled) == 1.0  # zeros made inside the trace are counted
  # A fraction float32 cannot hold: the summary's float64 value, rounded to float32.
  third = {"w": np.array([[0.0, 1.0, 2.0]], np.float32)}
  assert summary(third).sparsity == pytest.approx(1 / 3, abs=1e-15)
  assert float(pruning.sparsity(third)) == float(np.float32(summary(third).sparsity))



def test_sparsity_is_float32_with_x64_on():
  # Under x64 the counts were int64 and the fraction float64, not the float32 documented.
  third = {"w": np.array([[0.0, 1.0, 2.0]], np.float32)}
  jax.config.update("jax_enable_x64", True)
  try:
    got = pruning.sparsity(third)
  finally:
    jax.config.update("jax_enable_x64", False)
  assert got.dtype == jnp.float32 and float(got) == float(np.float32(1 / 3))


def test_nnx_state_and_empty_leaf():
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  s = summary(state)
  assert [r.path for r in s.leaves] == ["bias", "kernel"]
  assert s.leaves[0].nonzero == 0 and s.leaves[1].nonzero == 6
  assert (s.size, s.nonzero, s.sparsity) == (6, 6, 0.0)  # the zero bias is not pruned
  assert summary({"e": np.zeros(0)}).sparsity == 0.0
