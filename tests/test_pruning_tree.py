"""Masks over parameter trees, checked against hand-built examples and NumPy stable sorting."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import (apply_masks, apply_masks_ste, channel_masks, compute_masks,
                                 magnitude_masks, nm_masks)

PRETRAINED = os.path.join(os.environ.get("JAXCOMPRESS_WEIGHTS_DIR") or os.path.join(
    os.path.dirname(__file__), os.pardir, os.pardir, "shared", "pretrained"),
    "resnet20_cifar10.npz")

# |W| in flat order: 1 1 2 .5 | 2 .5 3 3 | 1 4 .5 2 | 0 4 1 .25 -- ties at .5, 1, 2, 3 and 4.
W = np.array([[1, -1, 2, 0.5],
              [-2, 0.5, 3, -3],
              [1, 4, -0.5, 2],
              [0, -4, 1, 0.25]], np.float32)
# Stable ascending order of |W|: 12 15 3 5 10 0 1 8 14 2 4 11 6 7 9 13.
W_MASK_25 = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], np.float32)
W_MASK_50 = np.array([[0, 0, 1, 0], [1, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]], np.float32)


def oracle_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
  """NumPy: zero the round(s*n) smallest |w|, lower flat index first among ties."""
  flat = np.abs(w).ravel()
  mask = np.ones(flat.size, np.float32)
  mask[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = 0
  return mask.reshape(w.shape)


# A model's policy keeps its first and last layer dense; here they are named in rules (the
# test tree's first conv; a CIFAR ResNet's first conv and classifier).
EDGES = [("conv1/kernel", False), (".*/kernel", True), (".*", False)]
RESNET_EDGES = [("conv1/kernel", False), ("linear/kernel", False), (".*/kernel", True), (".*", False)]


def tree(rng: np.random.Generator) -> dict:
  """A Linen-style params dict: two prunable kernels, a bias, a BatchNorm and a first conv."""
  return {"conv1": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          "block": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
                    "bn": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}},
          "dense": {"kernel": rng.normal(size=(8, 12)).astype(np.float32),
                    "bias": rng.normal(size=12).astype(np.float32)}}


@pytest.mark.parametrize("sparsity, expected", [(0.25, W_MASK_25), (0.5, W_MASK_50),
                                                (0.0, np.ones((4, 4))),
                                                (0.999, np.zeros((4, 4)))])
def test_hand_built_4x4_with_ties(sparsity, expected):
  masks = magnitude_masks({"w": {"kernel": W}}, sparsity)
  np.testing.assert_array_equal(masks["w"]["kernel"], expected)


def test_count_rounds_half_to_even_like_torch():
  # 0.40625 * 16 = 6.5 -> 6 and 0.46875 * 16 = 7.5 -> 8 (Python round, as torch.nn.utils.prune).
  for sparsity, zeros in [(0.40625, 6), (0.46875, 8)]:
    masks = magnitude_masks({"w": {"kernel": W}}, sparsity)
    assert int(np.sum(masks["w"]["kernel"] == 0)) == zeros


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_layer_scope_matches_numpy(sparsity):
  params = tree(np.random.default_rng(0))
  masks = magnitude_masks(params, sparsity, rules=EDGES)
  np.testing.assert_array_equal(masks["block"]["conv"]["kernel"],
                                oracle_mask(params["block"]["conv"]["kernel"], sparsity))
  np.testing.assert_array_equal(masks["dense"]["kernel"],
                                oracle_mask(params["dense"]["kernel"], sparsity))
  for dense_leaf in (masks["conv1"]["kernel"], masks["dense"]["bias"], masks["block"]["bn"]["scale"]):
    np.testing.assert_array_equal(dense_leaf, np.ones_like(dense_leaf))


@pytest.mark.parametrize("sparsity", [0.0, 0.45, 0.8, 0.999])
def test_global_scope_matches_numpy(sparsity):
  params = tree(np.random.default_rng(1))
  params["dense"]["kernel"] *= 3  # different scales: global sparsity differs per layer
  masks = magnitude_masks(params, sparsity, scope="global", rules=EDGES)
  a, b = params["block"]["conv"]["kernel"], params["dense"]["kernel"]
  both = oracle_mask(np.concatenate([a.ravel(), b.ravel()]), sparsity)
  np.testing.assert_array_equal(masks["block"]["conv"]["kernel"], both[:a.size].reshape(a.shape))
  np.testing.assert_array_equal(masks["dense"]["kernel"], both[a.size:].reshape(b.shape))


def test_global_hand_built():
  # |a| = 1 3 5 7, |b| = 2 4 6 8 -> the 4 smallest are 1 2 3 4, two in each leaf.
  params = {"a": {"kernel": np.array([[1., -3.], [5., 7.]], np.float32)},
            "b": {"kernel": np.array([[-2., 4.], [6., 8.]], np.float32)}}
  masks = magnitude_masks(params, 0.5, scope="global")
  np.testing.assert_array_equal(masks["a"]["kernel"], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(masks["b"]["kernel"], [[0, 0], [1, 1]])


@pytest.mark.skipif(not os.path.exists(PRETRAINED), reason="pretrained ResNet-20 absent")
def test_pretrained_resnet20_exact_counts():
  from jaxcompress.models import get_model, load_pytorch_npz
  params = load_pytorch_npz(get_model("resnet20"), PRETRAINED)["params"]
  kernel = params["layer2_1"]["conv2"]["kernel"]
  layer = magnitude_masks(params, 0.7, rules=RESNET_EDGES)
  np.testing.assert_array_equal(layer["layer2_1"]["conv2"]["kernel"], oracle_mask(kernel, 0.7))
  glob = magnitude_masks(params, 0.7, scope="global", rules=RESNET_EDGES)
  pruned = [(k, b) for k, b in params.items() if k.startswith("layer")]
  total = sum(b[c]["kernel"].size for _, b in pruned for c in ("conv1", "conv2"))
  zeros = sum(int(np.sum(glob[k][c]["kernel"] == 0)) for k, _ in pruned for c in ("conv1", "conv2"))
  assert zeros == round(0.7 * total)
  assert np.all(glob["conv1"]["kernel"] == 1) and np.all(glob["linear"]["kernel"] == 1)


def test_traced_sparsity_under_jit_matches_python():
  params = tree(np.random.default_rng(2))
  fn = jax.jit(lambda p, s: magnitude_masks(p, s, scope="global"))
  for sparsity in (0.3, 0.75):
    jax.tree.map(np.testing.assert_array_equal, fn(params, jnp.float32(sparsity)),
                 magnitude_masks(params, sparsity, scope="global"))


def test_mask_dtype_is_param_dtype():
  params = {"w": {"kernel": W.astype(jnp.bfloat16)}}
  assert magnitude_masks(params, 0.5)["w"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_every_group_valid(n, m):
  w = np.random.default_rng(3).normal(size=(3, 16, 2)).astype(np.float32)
  mask = np.asarray(nm_masks({"k": {"kernel": w}}, n, m)["k"]["kernel"])  # groups along axis -2
  to_groups = lambda a: np.moveaxis(a, -2, -1).reshape(-1, m)
  groups_w, groups_m = to_groups(np.abs(w)), to_groups(mask)
  assert np.all(groups_m.sum(-1) == n)
  for gw, gm in zip(groups_w, groups_m):  # each kept entry beats each pruned one
    assert gw[gm == 1].min() >= gw[gm == 0].max()


def test_nm_masks_along_axis_0_hand_built():
  # Columns are the groups (axis 0, m = 4); keep the 2 largest |w| of each column. Column 0,
  # |w| = 1 2 1 0, ties at 1: the later entry (row 2) is kept.
  mask = nm_masks({"k": {"kernel": W}}, 2, 4, axis=0)["k"]["kernel"]
  np.testing.assert_array_equal(mask, [[0, 0, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 0, 0]])


def test_nm_masks_refuses_m_0_in_one_line():
  with pytest.raises(ConfigError, match=r"^prune.m must be an integer >= 1, got 0$"):
    nm_masks({"k": {"kernel": W}}, 2, 0)  # not 1 - n / m's ZeroDivisionError


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channel_masks_zero_whole_output_channels(norm):
  w = np.random.default_rng(4).normal(size=(3, 3, 4, 8)).astype(np.float32)
  mask = np.asarray(channel_masks({"c": {"kernel": w}}, 0.5, norm=norm)["c"]["kernel"])
  flat = np.abs(w).reshape(-1, 8)
  norms = flat.sum(0) if norm == "l1" else np.sqrt((flat ** 2).sum(0))
  pruned = np.sort(np.argsort(norms, kind="stable")[:4])
  per_channel = mask.reshape(-1, 8)
  assert np.all(per_channel[:, pruned] == 0)
  assert np.all(np.delete(per_channel, pruned, axis=1) == 1)


def test_channel_masks_l1_and_l2_differ_hand_built():
  # Channel 0 = (3, 0): L1 3, L2 3. Channel 1 = (2, 2): L1 4, L2 2.83. One of two is pruned.
  w = {"d": {"kernel": np.array([[3., 2.], [0., 2.]], np.float32)}}
  np.testing.assert_array_equal(channel_masks(w, 0.5, norm="l1")["d"]["kernel"], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(channel_masks(w, 0.5, norm="l2")["d"]["kernel"], [[1, 0], [1, 0]])


def test_apply_masks_exact_zero_and_bool_masks():
  params = {"w": {"kernel": W}}
  for masks in (magnitude_masks(params, 0.5), {"w": {"kernel": W_MASK_50.astype(bool)}}):
    out = np.asarray(apply_masks(params, masks)["w"]["kernel"])
    np.testing.assert_array_equal(out, np.where(W_MASK_50 == 1, W, 0))
    assert not np.any(np.signbit(out[W_MASK_50 == 0]))  # +0.0, not -0.0


def test_apply_masks_ste_value_and_identity_gradient():
  params = {"w": {"kernel": jnp.asarray(W)}}
  masks = {"w": {"kernel": jnp.asarray(W_MASK_50)}}
  value = apply_masks_ste(params, masks)["w"]["kernel"]
  np.testing.assert_array_equal(value, np.where(W_MASK_50 == 1, W, 0))
  coeff = jnp.arange(16.0).reshape(4, 4)
  grad = jax.grad(lambda p: jnp.sum(apply_masks_ste(p, masks)["w"]["kernel"] * coeff))(params)
  np.testing.assert_array_equal(grad["w"]["kernel"], coeff)  # pruned entries get gradient too


def test_nnx_state():
  model = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  masks = magnitude_masks(state, 0.5)
  assert isinstance(masks, nnx.State)
  kernel = np.asarray(state["kernel"][...])
  np.testing.assert_array_equal(masks["kernel"][...], oracle_mask(kernel, 0.5))
  np.testing.assert_array_equal(masks["bias"][...], np.ones(6))
  pruned = apply_masks(state, masks)
  nnx.update(model, pruned)
  assert int(np.sum(np.asarray(model.kernel[...]) == 0)) == 24


def test_gradient_score_reads_grads():
  params = {"w": {"kernel": W}}
  grads = {"w": {"kernel": np.full((4, 4), 2.0, np.float32)}}
  grads["w"]["kernel"][0, 0] = 100.0  # |w * g| of entry 0 becomes the largest
  masks = compute_masks(params, 0.5, score="saliency", grads=grads)
  expected = oracle_mask(W * grads["w"]["kernel"], 0.5)
  np.testing.assert_array_equal(masks["w"]["kernel"], expected)
  assert masks["w"]["kernel"][0, 0] == 1 and W_MASK_50[0, 0] == 0


@pytest.mark.parametrize("call, needle", [
    (lambda p: magnitude_masks(p, 1.0), "sparsity must be in [0.0, 1.0), got 1.0"),
    (lambda p: magnitude_masks(p, -0.1), "sparsity must be in [0.0, 1.0), got -0.1"),
    (lambda p: magnitude_masks(p, 0.5, scope="net"), "prune.scope must be one of global, layer"),
    (lambda p: nm_masks(p, 5, 4), "prune.n must be an integer in [1, m=4], got 5"),
    (lambda p: nm_masks(p, 2, 3), "a divisor of 4, got 3"),
    (lambda p: nm_masks(p, 2, 4, axis=2), "must be in [-2, 2), got 2"),
    (lambda p: nm_masks(p, 2, 4, axis=-3), "must be in [-2, 2), got -3"),
    (lambda p: channel_masks(p, 0.5, norm="l3"), "prune.norm must be one of l1, l2, got 'l3'"),
    (lambda p: magnitude_masks(p, 0.5, rules=[("(.*/kernel", True)]), "does not compile"),
    (lambda p: compute_masks(p, 0.5, score="saliency"), "grads must be given"),
    (lambda p: compute_masks(p, 0.5, score="random"), "key must be a jax.random key"),
    # the gradient of a whole variables dict, one leaf missing, one transposed
    (lambda p: compute_masks(p, 0.5, score="saliency", grads={"params": p}),
     "grads must be a tree like params (jax.grad of the loss with respect to params), got "
     "another: ValueError: Dict key mismatch"),
    (lambda p: compute_masks(p, 0.5, score="saliency", grads={"w": {}}),
     "grads must be a tree like params"),
    (lambda p: compute_masks(p, 0.5, score="saliency", grads={"w": {"kernel": W[:2]}}),
     "grads['w/kernel'] has shape (2, 4), its parameter (4, 4); grads must be a tree like params"),
    (lambda p: compute_masks(p, 0.5, score="random", key=0),
     "key must be a jax.random key for a random score, got 0; e.g. jax.random.key(0)"),
    (lambda p: compute_masks(p, 0.5, structure="channel"),
     "prune.structure must be a masker: unstructured(scope), kernels(scope, norm), channels(norm) "
     "or n_of_m(n, m) from jaxcompress.pruning, got 'channel'"),
])
def test_bad_input_one_clear_line(call, needle):
  with pytest.raises(ConfigError) as err:
    call({"w": {"kernel": W}})
  message = str(err.value)
  assert needle in message and "\n" not in message
