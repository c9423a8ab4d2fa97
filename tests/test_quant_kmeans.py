"""k-means weight sharing: reconstruction, linear init, codebook gradients, masks, rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import (assign, cluster_params, codebook_grad, decode, decode_params,
                                      kmeans, kmeans_fake_quant)

W = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)


def test_reconstruction_error_falls_as_bits_rise():
  errs = [float(jnp.mean((decode(*kmeans(W, bits=b)) - W) ** 2)) for b in (2, 3, 4, 6)]
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 1e-3


def test_codebook_shape_sorted_and_indices_nearest():
  codebook, indices = kmeans(W, bits=3)
  assert codebook.shape == (8,) and indices.shape == W.shape and indices.dtype == jnp.int32
  assert np.all(np.diff(codebook) >= 0)
  nearest = np.argmin(np.abs(W[..., None] - np.asarray(codebook)), axis=-1)
  np.testing.assert_array_equal(indices, nearest)
  # Lloyd fixed point: each used centroid is the mean of its members.
  for k in np.unique(indices):
    np.testing.assert_allclose(codebook[k], W[np.asarray(indices) == k].mean(), rtol=1e-4)


def test_linear_initialization_over_min_max():
  codebook, _ = kmeans(W, bits=2, iters=0)
  np.testing.assert_allclose(codebook, np.linspace(W.min(), W.max(), 4), rtol=1e-6)


def test_a_numpy_integer_count_of_iterations_is_taken():
  # np.int64(0) (a count from NumPy or a config) was refused as no integer; 0 iterations leave
  # the linear initialization, NumPy's linspace over [min, max].
  codebook, _ = kmeans(W, bits=2, iters=np.int64(0))
  np.testing.assert_allclose(codebook, np.linspace(W.min(), W.max(), 4), rtol=1e-6)
  with pytest.raises(ConfigError, match=r"^iters must be a non-negative integer .*, got np.True_$"):
    kmeans(W, bits=2, iters=np.True_)


def test_two_obvious_clusters():
  w = jnp.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
  codebook, indices = kmeans(w, bits=2, iters=10)
  decoded = decode(codebook, indices)
  np.testing.assert_allclose(decoded[:3].mean(), 0.1, rtol=1e-5)
  np.testing.assert_allclose(decoded[3:].mean(), 5.1, rtol=1e-5)



def test_a_cluster_of_a_million_members_moves_to_their_mean():
  # One float32 sum over a million members of ~1.3 dropped part of each: centroids off
  # NumPy's float64 means by 2.5e-3 (1 % of their spacing) for 4M weights, 8e-2 for 20M.
  w = np.random.default_rng(0).random(1 << 22, dtype=np.float32) + 1.0
  codebook, _ = kmeans(w, bits=2, iters=1)
  start = np.asarray(jnp.linspace(w.min(), w.max(), 4), np.float64)
  nearest = np.searchsorted((start[1:] + start[:-1]) / 2, w)
  np.testing.assert_allclose(codebook, [w[nearest == j].mean(dtype=np.float64)
                                        for j in range(4)], rtol=1e-6)


def test_deterministic_and_jittable():
  a = kmeans(W, bits=4)
  b = jax.jit(lambda w: kmeans(w, bits=4))(W)
  np.testing.assert_allclose(a.codebook, b.codebook, rtol=1e-6)
  np.testing.assert_array_equal(a.indices, b.indices)


def test_codebook_gradient_is_sum_of_member_gradients():
  codebook, indices = kmeans(W, bits=3)
  grad = np.random.default_rng(1).standard_normal(W.shape).astype(np.float32)
  want = np.zeros(8, np.float32)
  np.add.at(want, np.asarray(indices).ravel(), grad.ravel())  # oracle
  np.testing.assert_allclose(codebook_grad(grad, indices, 8), want, rtol=1e-5, atol=1e-6)
  # jax.grad through decode gives the same (Han et al. 2016, eq. 3).
  auto = jax.grad(lambda c: jnp.sum(decode(c, indices) * grad))(codebook)
  np.testing.assert_allclose(auto, want, rtol=1e-5, atol=1e-6)


def test_masked_weights_stay_zero_and_are_not_clustered():
  mask = np.abs(W) > 0.5
  w = np.where(mask, W, 0.0)
  codebook, indices = kmeans(w, bits=2, mask=mask)
  decoded = np.asarray(decode(codebook, indices))
  assert np.all(decoded[~mask] == 0) and np.all(np.asarray(indices)[~mask] == 4)
  assert np.all(np.abs(codebook) > 0.5)  # zeros did not pull a centroid to 0
  grad = codebook_grad(np.ones_like(w), indices, 4)
  assert float(grad.sum()) == mask.sum()  # masked weights contribute nothing


@pytest.mark.parametrize("num, match", [(2.5, r"an integer >= 1, got 2.5$"), (0, r">= 1, got 0$")])
def test_codebook_grad_refuses_a_count_of_centroids_that_cannot_be(num, match):
  # 2.5 raised a TypeError from segment_sum; 0 returned the empty gradient of no codebook.
  with pytest.raises(ConfigError, match=r"^num_centroids must be " + match):
    codebook_grad(jnp.ones(4), jnp.array([0, 1, 1, 0]), num)


def test_cluster_params_by_rules_and_decode_params():
  params = {"conv1": {"kernel": W, "bias": np.zeros(8, np.float32)},
            "fc": {"kernel": W[:4]}}
  with pytest.warns(UserWarning, match=r"matched no path: \['typo/kernel'\]"):
    books = cluster_params(params, [("typo/kernel", 8), ("conv1/kernel", 2), (".*/kernel", 4),
                                    (".*", None)])
  assert sorted(books) == ["conv1/kernel", "fc/kernel"]
  assert books["conv1/kernel"].codebook.shape == (4,) and books["fc/kernel"].codebook.shape == (16,)
  rebuilt = decode_params(params, books)
  np.testing.assert_array_equal(rebuilt["conv1"]["bias"], params["conv1"]["bias"])
  assert len(np.unique(rebuilt["conv1"]["kernel"])) <= 4
  # Fine-tuning form: codebooks as trainable arrays, indices fixed.
  idx = {p: b.indices for p, b in books.items()}
  total = lambda c: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(decode_params(params, c, idx)))
  grads = jax.grad(total)({p: b.codebook for p, b in books.items()})
  assert float(grads["conv1/kernel"].sum()) == W.size


def test_cluster_params_masks_go_by_path_with_none_leaves():
  # Masks "like params" with None where nothing is pruned (the biases): each kernel gets its own
  # mask, not its neighbour's (a None is no leaf of the flattened tree).
  params = {"a": {"bias": np.zeros(8, np.float32), "kernel": W[:8]},
            "b": {"bias": np.zeros(8, np.float32), "kernel": W[8:]}}
  keep_a = np.ones((8, 8), bool)
  keep_a[0] = False
  keep_b = np.ones((8, 8), bool)
  keep_b[:, 3] = False
  masks = {"a": {"bias": None, "kernel": keep_a}, "b": {"bias": None, "kernel": keep_b}}
  books = cluster_params(params, [(".*/kernel", 2), (".*", None)], masks=masks)
  assert sorted(books) == ["a/kernel", "b/kernel"]
  for path, keep in (("a/kernel", keep_a), ("b/kernel", keep_b)):
    indices = np.asarray(books[path].indices)
    np.testing.assert_array_equal(indices == 4, ~keep)  # index 2^bits marks exactly the pruned
  with pytest.raises(ConfigError, match=r"masks has no entry 'b/kernel'"):
    cluster_params(params, [(".*/kernel", 2), (".*", None)], masks={"a": {"kernel": keep_a}})


def test_decode_params_without_indices_is_one_line():
  params = {"fc": {"kernel": W}}
  books = cluster_params(params, [(".*", 2)])
  bare = {p: b.codebook for p, b in books.items()}
  for indices in (None, {}):
    with pytest.raises(ConfigError, match=r"indices has no entry 'fc/kernel'"):
      decode_params(params, bare, indices)


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bits_raise(bits):
  with pytest.raises(ConfigError, match=rf"bits must be an integer in \[2, 8\], got {bits}"):
    kmeans(W, bits=bits)


def test_kmeans_fake_quant_by_hand():
  w = jnp.array([0.1, 0.2, 0.9, 1.0, 0.0, -0.5])
  book = jnp.array([-0.4, 0.0, 0.5, 1.0])
  # No update: snap to the nearest given centroid; the exact zero (pruned) stays 0.
  snapped, same = kmeans_fake_quant(w, book, update=False)
  np.testing.assert_allclose(snapped, [0.0, 0.0, 1.0, 1.0, 0.0, -0.4], atol=1e-7)
  np.testing.assert_array_equal(same, book)
  # One Lloyd step first: members {-0.5}, {0.1, 0.2}, {}, {0.9, 1.0} -> -0.5, 0.15, 0.5, 0.95.
  snapped, new = kmeans_fake_quant(w, book, update=True)
  np.testing.assert_allclose(new, [-0.5, 0.15, 0.5, 0.95], atol=1e-6)
  np.testing.assert_allclose(snapped, [0.15, 0.15, 0.95, 0.95, 0.0, -0.5], atol=1e-6)
  # Straight-through: d/dw sum(c * snapped) = c.
  c = jnp.arange(6.0)
  g = jax.grad(lambda v: jnp.sum(c * kmeans_fake_quant(v, book, update=True)[0]))(w)
  np.testing.assert_allclose(g, c)


@pytest.mark.parametrize("iters", [-1, 2**31, 10**12])
def test_iterations_an_int32_loop_cannot_count_are_one_line(iters):
  # 10**12 died with an OverflowError traceback from the jitted loop.
  with pytest.raises(ConfigError, match=rf"^iters must be a non-negative integer below 2\*\*31 "
                                        rf"\(the loop counts in int32\), got {iters}$"):
    kmeans(np.ones((3, 4), np.float32), bits=2, iters=iters)


def test_an_empty_weight_or_a_mask_of_another_shape_is_one_line():
  with pytest.raises(ConfigError, match=r"^kmeans: the weight is empty"):
    kmeans(np.ones((0, 4), np.float32), bits=2)
  with pytest.raises(ConfigError, match=r"^kmeans: the mask has shape \(4, 3\), the weight "
                                        r"\(3, 4\)"):
    kmeans(np.ones((3, 4), np.float32), bits=2, mask=np.ones((4, 3), bool))


def test_shared_weights_are_exactly_codebook_entries():
  # w + (shared - w) in float32 is 0.01467036083..., one ulp off the entry it snaps to.
  w = jnp.array([-0.045770355, 0.3], jnp.float32)
  book = jnp.array([0.014670359, 1.0], jnp.float32)
  assert float(w[0] + (book[0] - w[0])) != float(book[0])
  shared, _ = kmeans_fake_quant(w, book, update=False)
  np.testing.assert_array_equal(np.asarray(shared), np.asarray(book)[[0, 0]])
  grad = jax.grad(lambda v: jnp.sum(kmeans_fake_quant(v, book, update=False)[0] * 3.0))(w)
  np.testing.assert_array_equal(np.asarray(grad), [3.0, 3.0])  # straight through


def test_a_codebook_in_any_order_gives_each_value_its_nearest_entry():
  w = np.array([-1.0, -0.1, 0.2, 0.95, 0.6], np.float32)
  book = np.array([1.0, -1.0, 0.0, 0.5], np.float32)  # unsorted, as from sklearn
  nearest = book[np.abs(w[:, None] - book[None]).argmin(1)]
  np.testing.assert_array_equal(np.asarray(decode(*assign(jnp.asarray(w), jnp.asarray(book)))),
                                nearest)
  shared, _ = kmeans_fake_quant(jnp.asarray(w), jnp.asarray(book), update=False)
  np.testing.assert_array_equal(np.asarray(shared), nearest)


def test_non_finite_weights_or_a_codebook_of_another_rank_are_one_line():
  with pytest.raises(ConfigError, match=r"^kmeans: the weight holds 1 NaN/Inf values"):
    kmeans(np.array([0.1, np.nan, 0.3], np.float32), bits=2)
  with pytest.raises(ConfigError, match=r"^kmeans_fake_quant: codebook has shape \(2, 2\)"):
    kmeans_fake_quant(jnp.ones(4), jnp.zeros((2, 2)), update=False)
  for book in (jnp.zeros((2, 2)), jnp.zeros(0)):
    with pytest.raises(ConfigError, match=r"^assign: codebook has shape \("):
      assign(jnp.ones(4), book)


@pytest.mark.parametrize("k", [1, 3, 4, 5, 16, 100, 256])
def test_assign_is_numpys_search_among_midpoints_ties_going_to_the_lower_entry(k):
  rng = np.random.default_rng(k)
  book = (np.round(rng.standard_normal(k) * 4) / 4).astype(np.float32)  # unsorted, repeats
  book[: k // 4] = book[k // 2]  # more equal entries
  order = np.argsort(book, kind="stable")
  ranked = book[order]
  mid = (ranked[1:] + ranked[:-1]) / np.float32(2)
  above = np.nextafter(mid[mid != 0], np.float32(np.inf))  # no denormals: CPUs flush them
  w = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 2, mid, book, above,
                      [-0.0, 0.0, 1e30, -1e30, np.inf, -np.inf, np.nan]]).astype(np.float32)
  # NumPy ranks NaN above every midpoint; exact zeros (pruned) get the index k.
  want = np.where(w != 0, order[np.searchsorted(mid, w, side="left")], k)
  got = np.asarray(assign(jnp.asarray(w), jnp.asarray(book)).indices)
  np.testing.assert_array_equal(got, want)
  # Away from ties (the random values) that is the nearest entry.
  np.testing.assert_array_equal(book[got[:5000]],
                                book[np.abs(w[:5000, None] - book[None]).argmin(1)])


def test_assign_by_hand_a_value_on_a_midpoint_goes_to_the_lower_entry():
  # Sorted: -2 (4), -1 (2), 0 (1), 0 (5), 1 (0), 2 (3); midpoints -1.5, -0.5, 0, 0.5, 1.5.
  got = assign(jnp.array([0.5, 0.50000006, -0.5, -0.0, 1e-30, -1e-30, 9.0]),
               jnp.array([1.0, 0.0, -1.0, 2.0, -2.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(got.indices), [5, 0, 2, 6, 5, 1, 3])


def test_assign_and_decode_take_lists_and_refuse_indices_that_are_no_integers():
  # By hand: midpoint 1.5; 0.9 -> entry 0 (1.0), 2.2 -> entry 1 (2.0), the zero is masked (2).
  got = assign([0.0, 0.9, 2.2], [1.0, 2.0])
  np.testing.assert_array_equal(np.asarray(got.indices), [2, 0, 1])
  np.testing.assert_array_equal(decode([1.0, 2.0], [0, 1, 2]), [1.0, 2.0, 0.0])
  with pytest.raises(ConfigError, match=r"^decode: indices must be integers \(positions in the "
                                        r"codebook\), got dtype float32$"):
    decode(jnp.array([1.0, 2.0]), jnp.array([0.5]))
  with pytest.raises(ConfigError, match=r"^decode: codebook has shape \(2, 2\)"):
    decode(jnp.zeros((2, 2)), jnp.array([0]))


@pytest.mark.parametrize("indices, bad", [([0, -1], r"\[-1\]"), ([3, 0, 9, 3], r"\[3, 9\]")])
def test_decode_refuses_indices_of_no_centroid(indices, bad):
  # Two centroids: 2 is a masked weight (0), -1 decoded to the last centroid 2.0 (jnp.take
  # wraps negative indices) and 3 or 9 to 0, as if masked: no index of assign or kmeans.
  with pytest.raises(ConfigError, match=rf"^decode: indices must be in \[0, 2\] \(a centroid, "
                                        rf"or 2 for a masked weight\), got {bad}$"):
    decode(jnp.array([1.0, 2.0]), jnp.array(indices))


def test_decode_with_traced_indices_inside_jit():
  got = jax.jit(decode)(jnp.array([1.0, 2.0]), jnp.array([1, 2, 0]))
  np.testing.assert_array_equal(got, [2.0, 0.0, 1.0])
