"""Array-level masks: top-k ranks, N:M groups, channel scores, maskers; NumPy oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import (channels, kernels, n_of_m, nm_mask, num_pruned, topk_mask,
                                 unstructured)
from jaxcompress.pruning import masks
from jaxcompress.pruning.masks import channel_scores, ranks


def keep_oracle(scores: np.ndarray, k: int) -> np.ndarray:
  """NumPy: keep the last k entries of the stable ascending order."""
  keep = np.zeros(scores.size, bool)
  keep[np.argsort(scores.ravel(), kind="stable")[scores.size - k:]] = True
  return keep.reshape(scores.shape)


@pytest.mark.parametrize("k", [0, 1, 7, 24])
def test_topk_mask_matches_numpy_with_many_ties(k):
  scores = np.random.default_rng(0).integers(0, 4, size=(4, 6)).astype(np.float32)
  np.testing.assert_array_equal(topk_mask(jnp.asarray(scores), k), keep_oracle(scores, k))


@pytest.mark.parametrize("k", [-1, 7, 2.5, float("nan")])
def test_topk_mask_refuses_a_k_it_cannot_keep(k):
  # 6 entries: keeping -1 or 7 of them is impossible (the old masks kept 0 and 6, silently),
  # and so is keeping 2.5: it kept the 2 of ranks >= 6 - 2.5 = 3.5, not the "exactly k"
  # promised.
  with pytest.raises(ConfigError, match=rf"^k must be an integer in \[0, 6\] .*, got {k}$"):
    topk_mask(jnp.arange(6.0), k)


def test_topk_mask_takes_numpy_and_jax_integers():
  scores = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
  for k in (np.int64(5), jnp.int32(5), 5.0):  # a whole number, as check_counts takes it
    np.testing.assert_array_equal(topk_mask(jnp.asarray(scores), k), keep_oracle(scores, 5))


def test_topk_mask_traced_k_under_jit():
  scores = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
  fn = jax.jit(topk_mask)
  for k in (3, 30):
    np.testing.assert_array_equal(fn(scores, jnp.int32(k)), keep_oracle(scores, k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_mask_without_a_sort_keeps_numpys_order(dtype, monkeypatch):
  # A global threshold over 10M+ weights: an XLA sort of them takes seconds per mask refresh on
  # a CPU, so floating scores are cut by bisection instead; the order is still NumPy's stable
  # one, with -inf (pruned weights), -0 tied with +0, and NaN ranked above everything.
  scores = np.random.default_rng(3).integers(-3, 4, size=(6, 50)).astype(np.float32)
  scores[0] = -np.inf
  scores[1, ::2], scores[2, ::3], scores[3, ::5] = -0.0, np.nan, np.inf
  # The order as numbers: +inf below NaN, and a stable sort keeps ties in flat order.
  wide = scores.astype(np.float64)
  oracle_scores = np.where(np.isnan(wide), 2e300, np.where(wide == np.inf, 1e300, wide))
  monkeypatch.setattr(masks, "BISECT_FROM", 1)  # 300 entries by bisection, as 10M+ are
  fn = jax.jit(topk_mask)
  for k in (0, 1, 37, 100, 180, 250, 300):
    want = keep_oracle(oracle_scores, k)
    np.testing.assert_array_equal(topk_mask(jnp.asarray(scores, dtype), k), want)
    np.testing.assert_array_equal(fn(jnp.asarray(scores, dtype), jnp.int32(k)), want)
  assert "sort" not in str(jax.make_jaxpr(topk_mask, static_argnums=1)(scores, 37))
  assert topk_mask(jnp.zeros((0, 3), dtype), 0).shape == (0, 3)


@pytest.mark.parametrize("shape, axis", [((40,), -1), ((6, 8), 0), ((3, 4, 8), 1), ((5, 4), -1)])
def test_ranks_match_numpy_with_one_sort(shape, axis):
  # The inverse of the stable order is a scatter: a second sort of 10M entries takes seconds.
  scores = np.random.default_rng(4).integers(0, 3, size=shape).astype(np.float32)
  order = np.argsort(scores, axis=axis, kind="stable")
  want = np.zeros_like(order)
  np.put_along_axis(want, order, np.arange(shape[axis]).reshape(
      [-1 if a == axis % len(shape) else 1 for a in range(len(shape))]), axis)
  np.testing.assert_array_equal(ranks(jnp.asarray(scores), axis), want)
  assert str(jax.make_jaxpr(ranks, static_argnums=1)(scores, axis)).count(" sort[") == 1


def test_num_pruned_python_and_traced():
  assert [num_pruned(s, 16) for s in (0.0, 0.40625, 0.46875, 0.999)] == [0, 6, 8, 16]
  traced = jax.jit(lambda s: num_pruned(s, 16))
  assert [int(traced(jnp.float32(s))) for s in (0.40625, 0.46875, 0.5)] == [6, 8, 8]


@pytest.mark.parametrize("sparsity", [1.5, -0.5, 1.0, float("nan"), np.float32(2.0)])
def test_num_pruned_refuses_a_sparsity_outside_0_1(sparsity):
  # round(1.5 * 10) = 15 of 10 entries and round(-0.5 * 10) = -5 came back as counts; NaN
  # raised a ValueError from round().
  with pytest.raises(ConfigError, match=r"^sparsity must be in \[0.0, 1.0\), got "):
    num_pruned(sparsity, 10)


def test_num_pruned_concrete_array_is_exact():
  # Python: round(0.7 * 45) = round(31.4999...) = 31, for 0.7 and for float32(0.7) alike; a
  # concrete array is no trace (float32 arithmetic rounds the product to 31.5 -> 32).
  p = {"w": jnp.arange(1.0, 46.0).reshape(5, 9)}
  for s in (np.array(0.7), jnp.float32(0.7)):
    assert num_pruned(s, 45) == round(float(s) * 45) == 31
    assert int(np.sum(np.asarray(unstructured()(["w"], [p["w"]], s)[0]) == 0)) == 31


@pytest.mark.parametrize("n, m, axis", [(2, 4, -1), (1, 4, 0), (4, 8, 1), (4, 4, 1), (1, 1, 0)])
def test_nm_mask_matches_numpy_groups(n, m, axis):
  scores = np.random.default_rng(2).integers(0, 3, size=(8, 16, 8)).astype(np.float32)
  keep = np.asarray(nm_mask(jnp.asarray(scores), n, m, axis))
  groups = np.moveaxis(scores, axis, -1).reshape(-1, m)
  kept = np.moveaxis(keep, axis, -1).reshape(-1, m)
  expected = np.stack([keep_oracle(g, n) for g in groups])
  np.testing.assert_array_equal(kept, expected)
  assert np.all(kept.sum(-1) == n)


def nm_input_axis_oracle(w: np.ndarray, n: int, m: int) -> np.ndarray:
  """Hand loop: per output channel and spatial position, n largest |w| of m consecutive inputs."""
  keep = np.zeros(w.shape, bool)
  *spatial, c_in, c_out = w.shape
  for pos in np.ndindex(*spatial):
    for o in range(c_out):
      for start in range(0, c_in, m):
        group = [abs(float(w[pos + (i, o)])) for i in range(start, start + m)]
        for j in sorted(range(m), key=lambda j: group[j])[m - n:]:
          keep[pos + (start + j, o)] = True
  return keep


def distinct_weights(shape, seed):
  """Weights with distinct magnitudes (no ties) and random signs."""
  rng = np.random.default_rng(seed)
  size = int(np.prod(shape))
  mags = rng.permutation(np.arange(1, size + 1)).astype(np.float32) / size
  return (mags * rng.choice([-1.0, 1.0], size)).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(8, 2), (2, 3, 8, 2)])  # Dense [in, out]; Conv HWIO
def test_nm_default_groups_along_the_input_channel_axis(shape):
  w = distinct_weights(shape, seed=5)
  expected = nm_input_axis_oracle(w, 2, 4)
  got = np.asarray(n_of_m(2, 4)(["k/kernel"], [jnp.abs(jnp.asarray(w))], 0.5)[0])
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(np.asarray(nm_mask(jnp.abs(jnp.asarray(w)), 2, 4)), expected)
  # Every group of 4 consecutive input channels, per output channel and position, keeps 2.
  groups = np.moveaxis(got, -2, -1).reshape(-1, 4)
  assert np.all(groups.sum(-1) == 2)


def test_nm_dense_kernel_hand_built():
  # [in=8, out=2]; |w| of column 0: 1 5 2 8 | 7 3 6 4, column 1: 9 10 11 12 | 16 15 14 13.
  w = np.array([[1, 9], [-5, 10], [2, -11], [8, 12], [7, -16], [-3, 15], [6, 14], [4, 13]],
               np.float32)
  got = np.asarray(n_of_m(2, 4)(["k/kernel"], [jnp.abs(jnp.asarray(w))], 0.5)[0])
  np.testing.assert_array_equal(got.T.astype(int), [[0, 1, 0, 1, 1, 0, 1, 0],
                                                    [0, 0, 1, 1, 1, 1, 0, 0]])


def test_channel_scores_l1_l2():
  s = np.array([[1.0, 3.0], [2.0, 4.0], [2.0, 0.0]], np.float32)
  np.testing.assert_allclose(channel_scores(jnp.asarray(s), "l1"), [5, 7])
  np.testing.assert_allclose(channel_scores(jnp.asarray(s), "l2"), [3, 5])



def test_channels_of_float16_scores_compare_their_norms_past_float16_range():
  # Sums of 70000 and 69300 were both inf in float16: a tie, so the larger channel 0 was pruned.
  s = jnp.asarray(np.ones((70000, 2)) * [1.0, 0.99], jnp.float16)
  np.testing.assert_allclose(channel_scores(s, "l1"), np.asarray(s, np.float64).sum(0),
                             rtol=1e-6)
  np.testing.assert_array_equal(channels("l1")(["w"], [s], 0.5)[0][0], [True, False])


def test_channels_along_a_given_output_axis():
  # An Einsum "bd,fd->bf" kernel [f, d]: its output channels are rows (axis 0), not columns.
  w = np.array([[1.0, 9.0, 1.0], [5.0, 5.0, 5.0], [0.1, 0.2, 0.3], [4.0, 0.0, 4.0]])
  rows = channels("l1", axes={"mix": 0})(["mix"], [jnp.asarray(w)], 0.5)[0]
  # Row sums 11, 15, 0.6, 8: the two lowest (rows 2 and 3) go, every column of them.
  np.testing.assert_array_equal(rows, np.array([[1], [1], [0], [0]]) * np.ones((1, 3)))
  cols = channels("l1")(["other"], [jnp.asarray(w)], 0.5)[0]  # not in axes: the last axis
  # Column sums 10.1, 14.2, 10.3; round(0.5 * 3) = 2 go.
  np.testing.assert_array_equal(cols, np.ones((4, 1)) * np.array([[0, 1, 0]]))
  # A transposed ConvTranspose kernel [kh, kw, out, in]: axis -2.
  k = np.abs(np.random.default_rng(0).normal(size=(3, 3, 4, 2)))
  mask = np.asarray(channels("l2", axes={"up": 2})(["up"], [jnp.asarray(k)], 0.5)[0])
  norms = np.sqrt((k ** 2).sum(axis=(0, 1, 3)))
  kept = np.sort(np.argsort(norms)[2:])
  np.testing.assert_array_equal(np.flatnonzero(mask[0, 0, :, 0]), kept)
  assert np.all(mask == mask[:1, :1, :, :1])


def test_maskers():
  a = jnp.arange(8.0).reshape(2, 4)
  b = jnp.arange(8.0, 16.0).reshape(4, 2)
  layer = unstructured("layer")(["a", "b"], [a, b], 0.5)
  assert [int(x.sum()) for x in layer] == [4, 4]
  glob = unstructured("global")(["a", "b"], [a, b], 0.5)
  assert [int(x.sum()) for x in glob] == [0, 8]  # every entry of b beats every entry of a
  chan = channels("l1")(["a"], [a], 0.5)[0]
  np.testing.assert_array_equal(chan, [[False, False, True, True]] * 2)
  nm = n_of_m(1, 2)(["a"], [a], 1.0)[0]  # groups of 2 down each column (input axis)
  np.testing.assert_array_equal(nm, [[False] * 4, [True] * 4])
  nm = n_of_m(1, 2, axis=-1)(["a"], [a], 1.0)[0]  # groups of 2 along each row
  np.testing.assert_array_equal(nm, [[False, True, False, True]] * 2)


def _kernel_oracle(leaves, sparsity, norm, scope):
  """NumPy: kernel norms per entry, the lowest round(sparsity * count) pruned (stable order)."""
  def per_kernel(w):
    w = np.abs(np.asarray(w, np.float64)).reshape(-1, *w.shape[-2:]) if w.ndim >= 3 else \
        np.abs(np.asarray(w, np.float64))[None]
    return w.mean(0) if norm == "l1" else np.sqrt((w * w).mean(0))
  scores = [per_kernel(w) for w in leaves]
  groups = [[i] for i in range(len(leaves))] if scope == "layer" else [list(range(len(leaves)))]
  keep = [None] * len(leaves)
  for group in groups:
    flat = np.concatenate([scores[i].ravel() for i in group])
    kept = np.ones(flat.size, bool)
    kept[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = False
    for i, part in zip(group, np.split(kept, np.cumsum([scores[i].size for i in group])[:-1])):
      keep[i] = np.broadcast_to(part.reshape(scores[i].shape), leaves[i].shape)
  return keep


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_kernels_match_numpy(scope, norm):
  rng = np.random.default_rng(3)
  leaves = [rng.standard_normal((3, 3, 4, 6)).astype(np.float32),  # 3x3 windows
            rng.standard_normal((1, 1, 6, 5)).astype(np.float32) * 2,  # 1x1: one entry each
            rng.standard_normal((5, 3)).astype(np.float32) * 0.5,  # Dense: one entry each
            rng.standard_normal((5, 5, 2, 3)).astype(np.float32)]  # 5x5 windows
  scores = [jnp.abs(jnp.asarray(w)) for w in leaves]
  got = kernels(scope, norm)(["a", "b", "c", "d"], scores, 0.6)
  for g, want, w in zip(got, _kernel_oracle(leaves, 0.6, norm, scope), leaves):
    assert g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), want)
  # A 3x3 window is pruned or kept whole.
  window = np.asarray(got[0]).reshape(9, -1)
  assert np.all(window == window[:1])


def test_kernels_hand_built():
  w = np.zeros((2, 1, 1, 3), np.float32)  # three kernels of two entries
  w[:, 0, 0, 0] = [1.0, 1.0]  # l1 1.0, l2 1.0
  w[:, 0, 0, 1] = [2.0, 0.0]  # l1 1.0, l2 1.41
  w[:, 0, 0, 2] = [0.1, 0.1]
  l1 = kernels("layer", "l1")(["w"], [jnp.abs(w)], 2 / 3)[0]
  np.testing.assert_array_equal(np.asarray(l1)[:, 0, 0], [[False, True, False]] * 2)  # tie: 0 first
  l2 = kernels("layer", "l2")(["w"], [jnp.abs(w)], 2 / 3)[0]
  np.testing.assert_array_equal(np.asarray(l2)[:, 0, 0], [[False, True, False]] * 2)
  l2 = kernels("layer", "l2")(["w"], [jnp.abs(w)], 1 / 3)[0]
  np.testing.assert_array_equal(np.asarray(l2)[:, 0, 0], [[True, True, False]] * 2)


def test_nm_is_switched_off_by_zero_sparsity():
  a = jnp.arange(8.0).reshape(4, 2)
  np.testing.assert_array_equal(n_of_m(2, 4)(["a"], [a], jnp.float32(0.0))[0], np.ones((4, 2)))


def test_global_masker_with_nothing_selected():
  assert unstructured("global")([], [], 0.5) == []


@pytest.mark.parametrize("call, needle", [
    (lambda: n_of_m(3, 2), "prune.n must be an integer in [1, m=2], got 3"),
    (lambda: n_of_m(0, 4), "prune.n must be an integer in [1, m=4], got 0"),
    (lambda: n_of_m(1, 0), "prune.m must be an integer >= 1, got 0"),
    (lambda: unstructured("net"), "prune.scope must be one of global, layer, got 'net'"),
    (lambda: channels("max"), "prune.norm must be one of l1, l2, got 'max'"),
    (lambda: kernels("net"), "prune.scope must be one of global, layer, got 'net'"),
    (lambda: kernels("layer", "max"), "prune.norm must be one of l1, l2, got 'max'"),
    (lambda: n_of_m(2, 4, axis=3)(["x/kernel"], [jnp.zeros((4, 4))], 0.5),
     "prune.axis (leaf 'x/kernel', shape (4, 4)) must be in [-2, 2), got 3"),
    (lambda: n_of_m(2, 4)(["x/kernel"], [jnp.zeros((6, 4))], 0.5),
     "prune.m (leaf 'x/kernel', axis -2 of length 6) must be a divisor of 6, got 4"),
    (lambda: n_of_m(2, 4, axis=-1)(["x/kernel"], [jnp.zeros((4, 6))], 0.5),
     "prune.m (leaf 'x/kernel', axis -1 of length 6) must be a divisor of 6, got 4"),
    (lambda: channels("l1", {"x/kernel": 2})(["x/kernel"], [jnp.zeros((4, 6))], 0.5),
     "prune.axes (leaf 'x/kernel', shape (4, 6)) must be an axis in [-2, 2), got 2"),
    (lambda: kernels("layer", "l1", {"x/kernel": (0, 3)})(["x/kernel"], [jnp.zeros((3, 4, 6))],
                                                         0.5),
     "prune.windows (leaf 'x/kernel', shape (3, 4, 6)) must be an axis in [-3, 3), got 3"),
    (lambda: n_of_m(2, 4, axis="0")(["x/kernel"], [jnp.zeros((4, 4))], 0.5),
     "prune.axis (leaf 'x/kernel', shape (4, 4)) must be in [-2, 2), got '0'"),
    (lambda: n_of_m(2, 4, axes={"x/kernel": (0, -2)})(["x/kernel"], [jnp.zeros((4, 4))], 0.5),
     "prune.axis (leaf 'x/kernel', shape (4, 4)) must be distinct axes, got (0, -2)"),
])
def test_bad_input(call, needle):
  with pytest.raises(ConfigError) as err:
    call()
  assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_concrete_array_sparsity_is_checked_as_a_number():
  from jaxcompress.pruning import compute_masks
  params = {"fc": {"kernel": np.ones((4, 4), np.float32)}}
  with pytest.raises(ConfigError, match=r"^sparsity must be in \[0.0, 1.0\), got 1.5$"):
    compute_masks(params, jnp.array(1.5))
  mask = compute_masks(params, jnp.array(0.25))["fc"]["kernel"]
  assert int(np.sum(~np.asarray(mask, bool))) == 4  # 0.25 of 16


def test_channel_pruning_keeps_one_channel_of_every_leaf():
  w = jnp.asarray(np.arange(1, 13, dtype=np.float32).reshape(3, 4))  # channel L1: 15, 18, 21, 24
  (mask,) = channels()(["w"], [w], 0.99)  # round(0.99 * 4) = 4 would cut the layer
  np.testing.assert_array_equal(np.asarray(mask).any(0), [False, False, False, True])
  (mask,) = channels()(["w"], [w], 0.5)
  np.testing.assert_array_equal(np.asarray(mask).any(0), [False, False, True, True])


def test_nm_mask_and_apply_masks_refuse_what_they_cannot_do():
  from jaxcompress.pruning import apply_masks
  with pytest.raises(ConfigError, match=r"^m must be a divisor of the 6 entries grouped along "
                                        r"axes \(0,\) of shape \(6, 4\), got 4$"):
    nm_mask(jnp.ones((6, 4)), 2, 4)
  with pytest.raises(ConfigError, match=r"^n must be an integer in \[1, m=4\], got 5$"):
    nm_mask(jnp.ones((8, 4)), 5, 4)
  with pytest.raises(ConfigError, match=r"^m must be an integer >= 1, got 0$"):
    nm_mask(jnp.ones((8, 4)), 1, 0)
  # Axis 5 or -3 of a 2-D array does not exist (np.moveaxis raises): no silent wrap to axis 1.
  for axis in (5, -3, (1, -1), True):
    with pytest.raises(ConfigError, match=r"^axis must be an axis in \[-2, 2\) or a tuple of "
                                          r"distinct ones for scores of shape \(4, 8\), got "):
      nm_mask(jnp.ones((4, 8)), 2, 4, axis)
  params = {"fc": {"kernel": jnp.ones((3, 4))}}
  with pytest.raises(ConfigError, match=r"^masks\['fc/kernel'\] has shape \(3, 1\), its "
                                        r"parameter \(3, 4\)"):
    apply_masks(params, {"fc": {"kernel": jnp.zeros((3, 1))}})
  with pytest.raises(ConfigError, match=r"^masks must be a tree like params"):
    apply_masks(params, {"fc": {}})


def test_the_array_helpers_take_plain_lists():
  # By hand: columns [1, 3] and [2, 4] keep their larger entry (1 of 2 down each column); the L1
  # channel scores are the column sums 4 and 6; the one-entry window is the entries themselves.
  scores = [[1.0, 2.0], [3.0, 4.0]]
  np.testing.assert_array_equal(nm_mask(scores, 1, 2), [[False, False], [True, True]])
  np.testing.assert_array_equal(topk_mask(scores, 1), [[False, False], [False, True]])
  np.testing.assert_allclose(channel_scores(scores), [4.0, 6.0])
  np.testing.assert_allclose(masks.kernel_scores([scores], window=(0,)), [scores])


@pytest.mark.parametrize("call, message", [
    (lambda: channel_scores(jnp.ones((2, 3, 4)), axis=5),
     "axis must be an axis in [-3, 3) for scores of shape (2, 3, 4), got 5"),
    (lambda: channel_scores(jnp.ones((2, 3)), "max"), "norm must be one of l1, l2, got 'max'"),
    (lambda: masks.kernel_scores(jnp.ones((2, 3, 4)), window=(5,)),
     "window must be a tuple of distinct axes in [-3, 3) for scores of shape (2, 3, 4), got (5,)"),
    (lambda: masks.kernel_scores(jnp.ones((2, 3, 4)), window=(0, -3)),
     "window must be a tuple of distinct axes in [-3, 3) for scores of shape (2, 3, 4), "
     "got (0, -3)"),
    (lambda: masks.kernel_scores(jnp.ones((2, 3, 4)), window=0),
     "window must be a tuple of distinct axes in [-3, 3) for scores of shape (2, 3, 4), got 0"),
])
def test_the_array_helpers_refuse_bad_axes_in_one_line(call, message):
  with pytest.raises(ConfigError) as err:
    call()
  assert str(err.value) == message
