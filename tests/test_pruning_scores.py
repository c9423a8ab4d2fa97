"""Scores: hand-computed values, one signature for all, and their requirements."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import SCORES, Score, compute_masks, get_score, unstructured
from jaxcompress.pruning.scores import leaf_scores

W = jnp.array([[1.0, -2.0], [0.5, -0.25]])
G = jnp.array([[-3.0, -1.0], [2.0, 4.0]])


def test_hand_computed_values():
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(SCORES["magnitude"].fn(W, None, None), [[1, 2], [0.5, 0.25]])
  np.testing.assert_array_equal(SCORES["saliency"].fn(W, G, None), [[3, 2], [1, 1]])
  # -w*g > 0 when the update -g pushes w away from zero.
  np.testing.assert_array_equal(SCORES["movement"].fn(W, G, None), [[3, -2], [-1, 1]])
  # LAMP: w^2 over the sum of squares of every weight at least as large (1 + 4 + 0.25 + 0.0625).
  np.testing.assert_allclose(SCORES["lamp"].fn(W, None, None),
                             [[1 / 5, 4 / 4], [0.25 / 5.25, 0.0625 / 5.3125]], rtol=1e-6)
  r = SCORES["random"].fn(W, None, key)
  assert r.shape == W.shape and float(r.min()) >= 0 and float(r.max()) < 1



@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_lamp_of_half_precision_weights_matches_numpy(dtype):
  # In float16 the running sum of 20000 squares stopped growing and the smallest scores
  # underflowed to 0 (relative error 1); bfloat16 kept 8 bits of the sums.
  w = jnp.asarray(np.random.default_rng(0).normal(scale=0.05, size=20000), dtype)
  sq = np.asarray(w, np.float64) ** 2
  order = np.argsort(sq, kind="stable")
  want = np.empty_like(sq)
  want[order] = sq[order] / np.cumsum(sq[order][::-1])[::-1]
  np.testing.assert_allclose(SCORES["lamp"].fn(w, None, None), want, rtol=1e-4)


def test_every_score_shares_one_signature():
  key = jax.random.PRNGKey(0)
  for name, score in SCORES.items():
    out = score.fn(W, G, key)
    assert out.shape == W.shape, name


def test_requirements():
  assert SCORES["saliency"].needs_grads and SCORES["movement"].needs_grads
  assert SCORES["movement"].accumulate and not SCORES["saliency"].accumulate
  assert SCORES["random"].needs_key and not SCORES["magnitude"].needs_grads


def test_leaf_scores_splits_the_key_per_leaf():
  a, b = leaf_scores(SCORES["random"], [W, W], None, jax.random.PRNGKey(1))
  assert not np.array_equal(a, b)
  again, _ = leaf_scores(SCORES["random"], [W, W], None, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, again)



def test_a_random_mask_is_the_same_with_x64_on():
  # The noise was drawn in the default float, float64 under x64: another mask for the same key.
  w = jnp.ones((16, 16), jnp.float32)
  want = compute_masks({"k": w}, 0.5, score="random", key=jax.random.key(3))["k"]
  jax.config.update("jax_enable_x64", True)
  try:
    got = compute_masks({"k": w}, 0.5, score="random", key=jax.random.key(3))["k"]
  finally:
    jax.config.update("jax_enable_x64", False)
  assert got.dtype == jnp.float32 and int(np.sum(np.asarray(got) == 0)) == 128
  np.testing.assert_array_equal(got, want)


def test_custom_score_passes_through():
  custom = Score(lambda w, g, key: w * w)
  assert get_score(custom) is custom
  np.testing.assert_array_equal(leaf_scores(custom, [W], None, None)[0], [[1, 4], [0.25, 0.0625]])


@pytest.mark.parametrize("call, needle", [
    (lambda: get_score("taylor"), "prune.score must be one of lamp, magnitude, movement, random, "
                                  "saliency, got 'taylor'"),
    (lambda: leaf_scores(SCORES["saliency"], [W], None, None), "grads must be given"),
    (lambda: leaf_scores(SCORES["random"], [W], None, None), "key must be a jax.random key"),
])
def test_bad_input(call, needle):
  with pytest.raises(ConfigError) as err:
    call()
  assert needle in str(err.value)


def test_lamp_scores_equal_weights_apart_as_the_paper_sorts_them():
  # Lee et al.: sort |w| ascending, score(u) = w_u^2 / sum_{v >= u} w_v^2. [1, -1, 2] sorted
  # (index order among the tie): 1 / (1 + 1 + 4), 1 / (1 + 4), 4 / 4; not 1/6 for both ones.
  np.testing.assert_allclose(SCORES["lamp"].fn(jnp.array([1.0, -1.0, 2.0]), None, None),
                             [1 / 6, 1 / 5, 1.0], rtol=1e-6)


def test_lamp_under_a_jitted_global_threshold_keeps_every_layer():
  """LAMP by hand (a: 49/294, 64/245, 81/181, 1; b: 0.01/0.05, 1): a's 7 and b's 0.1 go."""
  params = {"a": {"kernel": jnp.array([[7.0, -8.0], [9.0, 10.0]])},
            "b": {"kernel": jnp.array([[0.1], [-0.2]])}}
  masks = jax.jit(lambda p, s: compute_masks(p, s, score="lamp",
                                             structure=unstructured("global")))(params, 2 / 6)
  assert np.asarray(masks["a"]["kernel"]).tolist() == [[False, True], [True, True]]
  assert np.asarray(masks["b"]["kernel"]).tolist() == [[False], [True]]
