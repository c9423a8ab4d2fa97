"""Whole-kernel pruning on any model: a kernel is a conv's window, and only a conv has one.

A Conv kernel ``[kh, kw, in, out]`` has one kernel per (input, output) channel pair; the same
conv stacked by ``nn.scan`` (``[steps, kh, kw, in, out]``) has one per step and pair; an
attention projection ``[in, heads, dim]`` has no window, so each entry is its own kernel. Oracles:
NumPy root-mean-square over the window and stable argsort.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export
from jaxcompress.errors import ConfigError
from jaxcompress.rules import tree_get
from jaxcompress.selection import trace_layers

C = 8


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(C, (3, 3), name="conv")(x)), None


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(C, (3, 3), name="stem")(x)
    h = nn.relu(nn.Conv(C, (3, 3), name="mid")(h))
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(h, None)
    t = h.reshape(h.shape[0], -1, C)
    t = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=C, name="attn")(t)
    return nn.Dense(3, name="head")(t.mean(1))


@pytest.fixture(scope="module")
def net():
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  model = Net()
  variables = jax.device_get(model.init(jax.random.key(0), x))
  return model, variables, x, trace_layers(model, variables, x)


def _drop_lowest(scores, fraction):
  """Keep mask of ``scores`` (any shape) without its ``round(fraction * n)`` lowest."""
  flat = np.asarray(scores).reshape(-1)
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:round(fraction * flat.size)]] = False
  return keep.reshape(np.shape(scores))


def _rms(w, axes):
  return np.sqrt(np.mean(np.square(np.asarray(w, np.float64)), axis=axes, keepdims=True))


def test_only_a_conv_has_a_window(net):
  *_, traced = net
  windows = {l.path: l.window_axes for l in traced.layers}
  assert windows == {"stem": (0, 1), "mid": (0, 1), "blocks/conv": (1, 2), "attn/query": (),
                     "attn/key": (), "attn/value": (), "attn/out": (), "head": ()}
  assert {l.path: budget.kernel_size(l) for l in traced.layers} == {
      "stem": 9, "mid": 9, "blocks/conv": 9, "attn/query": 1, "attn/key": 1, "attn/value": 1,
      "attn/out": 1, "head": 1}


def test_kernel_pruning_takes_each_weights_own_window(net):
  model, variables, x, _ = net
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=2,
                       prune=compose.PruneSpec(sparsity=0.5, structure="kernel", norm="l2",
                                               scope="layer", schedule="one_shot"))
  state = comp.init_state(variables, x)
  masks = comp.final_masks(state.params)["model"]
  params = variables["params"]
  mid = params["mid"]["kernel"]  # 64 kernels of 9 entries: the 32 of lowest RMS go
  np.testing.assert_array_equal(masks["mid"]["kernel"],
                                np.broadcast_to(_drop_lowest(_rms(mid, (0, 1)), 0.5), mid.shape))
  stacked = params["blocks"]["conv"]["kernel"]
  for step in range(2):  # each step's own 64 kernels
    want = np.broadcast_to(_drop_lowest(_rms(stacked[step], (0, 1)), 0.5), stacked[step].shape)
    np.testing.assert_array_equal(masks["blocks"]["conv"]["kernel"][step], want)
  for name in ("query", "out"):  # no window: the lowest half of the entries, one by one
    w = params["attn"][name]["kernel"]
    np.testing.assert_array_equal(masks["attn"][name]["kernel"], _drop_lowest(np.abs(w), 0.5))
  assert np.all(masks["stem"]["kernel"]) and np.all(masks["head"]["kernel"])  # first and last


def test_kernel_plans_prune_the_convs_and_keep_the_rest_dense(net):
  _, variables, _, traced = net
  layers = list(traced.layers)
  weights = [np.asarray(tree_get(variables["params"], l.weight)) for l in layers]
  keeps = budget.kernel_keep(weights, 0.4, layers)
  by_path = dict(zip([l.path for l in layers], keeps))
  # stem, mid and every step of the scanned conv share one threshold on their kernels' RMS
  rms = [_rms(weights[0], (0, 1)), _rms(weights[1], (0, 1)), _rms(weights[2], (1, 2))]
  kept = _drop_lowest(np.concatenate([r.reshape(-1) for r in rms]), 0.4)
  start = 0
  for i, path in enumerate(("stem", "mid", "blocks/conv")):
    want = kept[start:start + rms[i].size].reshape(rms[i].shape)
    np.testing.assert_array_equal(by_path[path], np.broadcast_to(want, weights[i].shape))
    start += rms[i].size
  for path in ("attn/query", "attn/out", "head"):
    assert by_path[path].all(), path


def test_a_kernel_pruned_scanned_conv_is_stored_by_kernels(net, tmp_path):
  """Each step's kept kernels cost one bit each and their 9 entries: the export's blocks over
  the conv's window behind the steps, as the budget sizes it."""
  model, variables, x, traced = net
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=2,
                       prune=compose.PruneSpec(sparsity=0.75, structure="kernel", norm="l2",
                                               scope="layer", schedule="one_shot"),
                       quant=compose.QuantSpec(weight_bits=4, act_bits=0, first_last_bits=0))
  state = comp.init_state(variables, x, calibration=[x])
  masks = comp.final_masks(state.params)
  state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params, masks))
  out = str(tmp_path / "export")
  comp.export(out, state)
  meta = next(m for m in export.read_spec(out)["layers"]
              if m["path"] == "params/blocks/conv/kernel")
  loaded = np.asarray(export.load(out, model).variables["params"]["blocks"]["conv"]["kernel"])
  kernels = np.abs(loaded).sum((1, 2)) > 0  # [steps, in, out]
  assert meta["encoding"] == "blocks" and meta["window_axes"] == [1, 2]
  kept = int(kernels.sum())
  assert kept == 2 * 16  # a quarter of each step's 64 kernels
  want = -(-kernels.size // 8) + -(-kept * 9 * 4 // 8)
  layer = traced.layer("blocks/conv")
  assert budget.shared_kernel_bytes(loaded != 0, 4, 9, layer.window_axes) == want + 1
  if "huffman" not in meta:  # Huffman-coded values take fewer bytes
    assert meta["segments"]["positions"] + meta["segments"]["values"] == want
  else:
    assert meta["segments"]["positions"] == -(-kernels.size // 8)
  got = np.asarray(export.load(out, model).logits(x))
  np.testing.assert_array_equal(got, np.asarray(jax.jit(comp.logits_fn)(
      comp.eval_variables(state), x)))


def test_a_threshold_plan_sizes_a_scanned_weight_step_by_step(net):
  """Training prunes each step at the layer's sparsity; the plan's bytes are those masks'."""
  *_, traced = net
  layer = traced.layer("blocks/conv")
  rng = np.random.default_rng(2)
  stacked = rng.standard_normal(layer.shape) * np.array([1.0, 0.2])[:, None, None, None, None]
  other = rng.standard_normal((C, 5))
  weights = {"blocks/conv": stacked, "other": other}
  layers = {"blocks/conv": layer}
  g = 0.5
  flat = np.abs(np.concatenate([stacked.reshape(-1), other.reshape(-1)]))
  cut = _drop_lowest(flat, g)
  s = 1 - cut[:stacked.size].mean()  # the layer's sparsity under the global threshold
  per_step = np.stack([_drop_lowest(np.abs(stacked[i]), s) for i in range(2)])
  assert per_step.sum() != cut[:stacked.size].sum()  # the two masks differ
  bits = 4
  need = (budget.weight_bytes(per_step, bits)
          + budget.weight_bytes(cut[stacked.size:].reshape(other.shape), bits))
  plans = lambda limit: list(budget.threshold_plans(  # noqa: E731
      weights, budget=limit, bits=(bits,), predict=lambda p, s_, b: s_, sparsities=(g,),
      layers=layers))
  [(_, sparsity, _, _)] = plans(need)
  assert sparsity["blocks/conv"] == pytest.approx(s)
  assert plans(need - 1) == []


def test_a_threshold_that_empties_every_step_of_a_scanned_weight_is_no_plan(net):
  """The global cut keeps one entry of the scanned conv; each step pruned at that layer sparsity
  keeps round((1 - s) * 576) = 0 of its 576 entries, so the layer would be empty."""
  *_, traced = net
  layer = traced.layer("blocks/conv")
  rng = np.random.default_rng(0)
  stacked = rng.uniform(1e-4, 1e-3, layer.shape)
  stacked[1, 0, 0, 0, 0] = 0.5
  other = 1 + rng.uniform(size=(10, 10))
  g = (stacked.size - 1) / (stacked.size + other.size)
  found = list(budget.threshold_plans({"blocks/conv": stacked, "other": other}, budget=10**9,
                                      bits=(8,), predict=lambda p, s, b: s, sparsities=(g, 0.5),
                                      layers={"blocks/conv": layer}))
  assert [f[0] for f in found] == [0.5]


def test_the_uniform_recipe_sizes_a_scanned_weight_step_by_step(net):
  """The uniform recipe's global sparsity gives the scanned conv one layer sparsity, at which
  training prunes each step on its own: the recipe's mask and bytes are those."""
  *_, traced = net
  layer = traced.layer("blocks/conv")
  rng = np.random.default_rng(3)
  stacked = rng.standard_normal(layer.shape) * np.array([1.0, 0.3])[:, None, None, None, None]
  weights = {"blocks/conv": stacked, "other": rng.standard_normal((C, 5))}
  dense = sum(budget.weight_bytes(np.ones(w.shape, bool), 4) for w in weights.values())
  s, bits, keep, size = budget.uniform_size(
      weights, list(weights), overhead=0, budget=dense // 3, bits=(4,),
      predict=lambda p, s_, b: s_, layers={"blocks/conv": layer})
  flat = np.abs(np.concatenate([w.reshape(-1) for w in weights.values()]))
  cut = _drop_lowest(flat, s)[:stacked.size]  # the global threshold's share of the conv
  layer_s = 1 - cut.mean()
  want = np.stack([_drop_lowest(np.abs(stacked[i]), layer_s) for i in range(2)])
  np.testing.assert_array_equal(keep["blocks/conv"], want)
  assert want.sum() != cut.sum()  # the global cut itself keeps another count
  assert size == sum(budget.weight_bytes(k, 4) for k in keep.values()) <= dense // 3


def test_blocks_over_window_axes_by_hand():
  rng = np.random.default_rng(7)
  kernels = rng.random((2, 1, 1, 4, 5)) < 0.3  # [steps, 1, 1, in, out]: which kernels are kept
  nonzero = np.broadcast_to(kernels, (2, 3, 3, 4, 5))
  values = np.where(nonzero, rng.integers(1, 8, nonzero.shape), 0)
  kept = int(kernels.sum())
  sizes = export.sparse.sizes(nonzero, 3, window_axes=(1, 2))
  assert sizes["blocks"] == -(-40 // 8) + -(-kept * 9 * 3 // 8)  # 40 kernels: 5 bytes of marks
  enc = export.sparse.encode(values, nonzero, 3, window_axes=(1, 2))
  assert enc.encoding == "blocks" and enc.window_axes == (1, 2)
  mask, got = export.sparse.decode(enc, nonzero.size, 3, shape=nonzero.shape)
  np.testing.assert_array_equal(mask, nonzero.reshape(-1))
  np.testing.assert_array_equal(got, values.reshape(-1)[nonzero.reshape(-1)])
  # without the window axes, blocks over the leading axes (steps x 3 x 3) cannot drop a kernel
  assert export.sparse.sizes(nonzero, 3)["blocks"] > sizes["blocks"]
  bad = enc._replace(window_axes=(0, 1, 2, 3, 4))
  with pytest.raises(ConfigError, match=r"blocks encoding needs window axes \[0, 1, 2, 3, 4\]"):
    export.sparse.decode(bad, nonzero.size, 3, shape=nonzero.shape)
