"""Weights with several output axes: attention heads and steps stacked by nn.scan.

Each output channel of such a weight (every (head, dim) of a query kernel ``[in, heads, dim]``,
every channel of every step of a scanned ``[steps, in, out]`` kernel) gets its own scale, and a
scanned weight is pruned step by step. Oracles: NumPy max-abs scales and argsort thresholds.
"""

import gzip
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export, quantization
from jaxcompress.errors import ConfigError
from jaxcompress.selection import trace_layers

HEADS, DIM, WIDTH = 2, 4, 8


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH, name="embed")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * DIM, name="attn")(h)
    return nn.Dense(3, name="head")(h.mean(1))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(WIDTH, name="fc")(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH, name="stem")(x)
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="blocks")(h, None)
    return nn.Dense(3, name="head")(h)


def _assert_fake_quant(got, w, axes, bits=4):
  """``got`` is ``w`` fake-quantized to the symmetric grid with one scale per entry of ``axes``
  (NumPy). The most negative entry of a channel lands on a rounding tie (-qmax - 0.5 steps),
  where either neighbouring code is right."""
  qmax = 2 ** (bits - 1) - 1
  summed = tuple(a for a in range(w.ndim) if a not in axes)
  top = np.abs(w).max(summed, keepdims=True)
  scale = top * np.float32(2 / (2 * qmax + 1))
  want = np.clip(np.round(w / scale), -qmax - 1, qmax) * scale
  off = ~np.isclose(got, want, rtol=1e-6, atol=1e-7)
  tie = (w == -top) & np.isclose(np.abs(got - want), scale, rtol=1e-5)
  assert not np.any(off & ~tie), np.argwhere(off & ~tie)


def _build(model, variables, x, **specs):
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=2, **specs)
  return comp, comp.init_state(variables, x, calibration=[x])


@pytest.fixture(scope="module")
def attention():
  x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
  model = Attention()
  variables = jax.device_get(model.init(jax.random.key(0), x))
  query = variables["params"]["attn"]["query"]["kernel"]
  variables["params"]["attn"]["query"]["kernel"] = query * np.array([1.0, 20.0])[:, None]
  return model, variables, x


def test_every_head_of_an_attention_projection_has_its_own_scales(attention, tmp_path):
  model, variables, x = attention
  comp, state = _build(model, variables, x, quant=compose.QuantSpec(weight_bits=4, act_bits=0,
                                                                     first_last_bits=0))
  out = str(tmp_path / "export")
  comp.export(out, state)
  loaded = export.load(out, model)
  params = loaded.variables["params"]["attn"]
  for name, axes in (("query", (1, 2)), ("key", (1, 2)), ("value", (1, 2)), ("out", (2,))):
    w = np.asarray(variables["params"]["attn"][name]["kernel"], np.float32)
    _assert_fake_quant(np.asarray(params[name]["kernel"]), w, axes)
  metas = {m["path"]: m for m in export.read_spec(out)["layers"]}
  assert metas["params/attn/query/kernel"]["segments"]["scale"] == 4 * HEADS * DIM
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), x))
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), want)


def _scanned_uneven():
  """``(x, model, variables, kernel)``: the scanned model, its 3 steps' kernels scaled by 1, 30
  and 0.1 (a shared threshold, scale or codebook would serve the steps unevenly)."""
  x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
  model = Scanned()
  variables = jax.device_get(model.init(jax.random.key(0), x))
  kernel = variables["params"]["blocks"]["fc"]["kernel"] * np.array([1.0, 30.0, 0.1])[:, None,
                                                                                         None]
  variables["params"]["blocks"]["fc"]["kernel"] = kernel
  return x, model, variables, kernel


def test_a_scanned_weight_is_pruned_and_scaled_step_by_step(tmp_path):
  x, model, variables, kernel = _scanned_uneven()
  assert trace_layers(model, variables, x).layer("blocks/fc").stacked == 1
  comp, state = _build(model, variables, x,
                       prune=compose.PruneSpec(sparsity=0.5, schedule="one_shot"),
                       quant=compose.QuantSpec(weight_bits=4, act_bits=0, first_last_bits=0))
  mask = np.asarray(comp.final_masks(state.params)["model"]["blocks"]["fc"]["kernel"])
  for step in range(3):  # the lowest half of each step's magnitudes, per step
    w = np.abs(kernel[step]).reshape(-1)
    want = np.ones(w.size, bool)
    want[np.argsort(w, kind="stable")[:w.size // 2]] = False
    np.testing.assert_array_equal(mask[step].reshape(-1), want, err_msg=f"step {step}")
  state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params,
                                            comp.final_masks(state.params)))
  out = str(tmp_path / "export")
  comp.export(out, state)
  loaded = export.load(out, model)
  _assert_fake_quant(np.asarray(loaded.variables["params"]["blocks"]["fc"]["kernel"]),
                     kernel * mask, (0, 2))
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), x))
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), want)


def test_an_artifact_with_repeated_scale_axes_is_refused(attention, tmp_path):
  model, variables, x = attention
  comp, state = _build(model, variables, x, quant=compose.QuantSpec(weight_bits=4, act_bits=0))
  out = str(tmp_path / "export")
  comp.export(out, state)
  path = os.path.join(out, "spec.json.gz")
  with gzip.open(path) as f:
    spec = json.load(f)
  query = next(m for m in spec["layers"] if m["path"] == "params/attn/query/kernel")
  assert query["axis"] == [1, 2]
  query["axis"] = [2, 2]
  with gzip.open(path, "wt") as f:
    json.dump(spec, f)
  with pytest.raises(ConfigError, match=r"axis is \[2, 2\], not distinct axes of its 3-d shape"):
    export.load(out, model)


def test_the_budget_sizes_a_scanned_weight_step_by_step():
  x = np.zeros((2, 6), np.float32)
  model = Scanned()
  variables = jax.device_get(model.init(jax.random.key(0), x))
  layer = trace_layers(model, variables, x).layer("blocks/fc")
  kernel = np.asarray(variables["params"]["blocks"]["fc"]["kernel"]) * np.array(
      [1.0, 30.0, 0.1])[:, None, None]
  keep = budget.keep_mask(kernel, 0.25, "unstructured", layer)
  assert [int((~keep[s]).sum()) for s in range(3)] == [16, 16, 16]  # round(0.25 * 64) per step
  channel = budget.keep_mask(kernel, 0.5, "channel", layer)
  for s in range(3):  # the 4 output channels of lowest L1 norm of each step
    dropped = np.argsort(np.abs(kernel[s]).sum(0), kind="stable")[:4]
    np.testing.assert_array_equal(channel[s].all(0), ~np.isin(np.arange(WIDTH), dropped))
  assert budget.density(channel, "channel", layer.out_axis, layer.stacked) == 0.5
  option = budget.Option(0.5, 4, 8)
  [(size, bops)] = budget.layer_costs(kernel, layer, [option], 100, "channel")
  assert bops == 50 * 4 * 8  # half the MACs of every step, 4-bit weights, 8-bit inputs
  assert size == budget.weight_bytes(channel, 4)


def test_a_scanned_layer_counts_the_macs_of_every_step_once():
  x = np.zeros((2, 6), np.float32)
  model = Scanned()
  variables = model.init(jax.random.key(0), x)
  # stem 6 x 8, three steps of 8 x 8 (Linen traces the scan body twice), head 8 x 3
  assert budget.layer_macs(model, variables, x) == {"stem": 48, "blocks/fc": 192, "head": 24}


def test_a_weight_stacked_behind_its_first_axis_is_one_line():
  class SecondAxis(nn.Module):
    @nn.compact
    def __call__(self, x):
      h, _ = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True},
                     length=3)(name="blocks")(nn.Dense(WIDTH, name="stem")(x), None)
      return nn.Dense(3, name="head")(h)

  x = np.zeros((2, 6), np.float32)
  model = SecondAxis()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ConfigError, match=r"the weight 'blocks/fc/kernel' is stored at \[8, 3, 8\], "
                                        r"one call uses \[8, 8\]"):
    compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                  quant=compose.QuantSpec(weight_bits=4))


def _gap_codes_by_hand(keep, w):
  """Gap codes of a mask walked in row-major order: one per kept entry, plus one filler for every
  2^w - 1 zeros skipped before it (Han et al. 2016)."""
  m, codes, run = (1 << w) - 1, 0, 0
  for kept in np.asarray(keep).reshape(-1):
    if kept:
      codes += 1 + run // m
      run = 0
    else:
      run += 1
  return codes


def _stored_codes(keep, zero_point=3):
  """int codes of a weight [steps, in, out] stored with its channel axes (0, 2) last."""
  codes = np.where(keep, 9, zero_point).astype(np.int32)
  return np.transpose(codes, (1, 0, 2))


@pytest.mark.parametrize("kind", ["int", "kmeans"])
def test_entries_of_a_weight_stored_with_moved_axes_follow_its_own_order(kind):
  """Gap codes are counted where training caps them and budgets size them: in the weight's own
  order, not the stored one (a stacked [steps, in, out] weight is stored [in, steps, out])."""
  rng = np.random.default_rng(5)
  keep = rng.random((3, 40, 16)) < 0.06
  stored = _stored_codes(keep)
  if kind == "int":
    t = export.LayerTensor("w", "int", stored, 4, qmin=0, zero_point=np.full((3, 16), 3),
                           scale=np.ones((3, 16), np.float32))
  else:
    t = export.LayerTensor("w", "kmeans", np.where(np.transpose(keep, (1, 0, 2)), 5, 16), 4,
                           codebook=np.arange(16, dtype=np.float32))
  meta, segments = export.encode_layer(t, axes=(0, 2))
  meta["axis"] = [0, 2]
  assert meta["encoding"] == "gaps"
  assert meta["codes"] == _gap_codes_by_hand(keep, meta["gap_bits"])
  # the stored order needs other codes: the weight's order is what the bytes were counted in
  assert any(_gap_codes_by_hand(keep, w) != _gap_codes_by_hand(np.transpose(keep, (1, 0, 2)), w)
             for w in range(2, 9))
  back = export.decode_layer(meta, segments)
  np.testing.assert_array_equal(back.codes, t.codes)
  # Format versions 2 and 3 walked the stored order; such a tensor reads the same.
  old, old_segments = export.encode_layer(t)
  old["axis"] = [0, 2]
  assert old["codes"] == _gap_codes_by_hand(np.transpose(keep, (1, 0, 2)), old["gap_bits"])
  np.testing.assert_array_equal(
      export.decode_layer(old, old_segments, weight_order=False).codes, t.codes)


def _scanned_pruned():
  """``(model, x, comp, state)``: the scanned model with 90 % of each step pruned (baked into
  the state's weights) and 8-bit weights."""
  x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
  model = Scanned()
  variables = jax.device_get(model.init(jax.random.key(0), x))
  comp, state = _build(model, variables, x,
                       prune=compose.PruneSpec(sparsity=0.9, schedule="one_shot"),
                       quant=compose.QuantSpec(weight_bits=8, act_bits=0, first_last_bits=0))
  state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params,
                                            comp.final_masks(state.params)))
  return model, x, comp, state


def test_the_exported_positions_take_the_bytes_the_budget_counts(tmp_path):
  """A scanned weight pruned and exported at fixed width: its positions and values take exactly
  the bytes ``budget.weight_bytes`` gives its non-zero pattern in the weight's own order."""
  model, _, comp, state = _scanned_pruned()
  out, fixed = str(tmp_path / "export"), str(tmp_path / "fixed")
  comp.export(out, state)
  export.recode(out, fixed, compress=False)  # fixed-width codes: the sizes budgets count
  meta = next(m for m in export.read_spec(fixed)["layers"]
              if m["path"] == "params/blocks/fc/kernel")
  loaded = export.load(fixed, model).variables["params"]["blocks"]["fc"]["kernel"]
  nonzero = np.asarray(loaded) != 0
  assert meta["encoding"] == "gaps"
  stored = meta["segments"]["positions"] + meta["segments"]["values"]
  assert stored == budget.weight_bytes(nonzero, 8)
  # walked in the stored order [in, steps, out], the same pattern takes other bytes
  assert budget.weight_bytes(np.transpose(nonzero, (1, 0, 2)), 8) != stored


def test_a_version_3_artifact_of_a_scanned_weight_still_loads(tmp_path, monkeypatch):
  """Written as version 3 did (the moved weight's entries in the stored order), an artifact loads
  to the same logits, and recode writes it as version 4."""
  model, x, comp, state = _scanned_pruned()
  new, old, again = (str(tmp_path / name) for name in ("new", "old", "again"))
  comp.export(new, state)
  with monkeypatch.context() as m:  # the version 3 writer: no axes, entries in stored order
    encode = export.encode_layer
    m.setattr(export.artifact, "encode_layer",
              lambda t, huffman=False, axes=None: encode(t, huffman=huffman))
    m.setattr(export.artifact, "VERSION", 3)
    export.recode(new, old)
  assert export.read_spec(old)["version"] == 3
  stacked = lambda d: next(m for m in export.read_spec(d)["layers"]  # noqa: E731
                           if m["path"] == "params/blocks/fc/kernel")
  assert stacked(old)["encoding"] == "gaps" and stacked(old)["axis"] == [0, 2]
  assert stacked(old)["codes"] != stacked(new)["codes"]  # the two orders differ here
  want = np.asarray(export.load(new, model).logits(x))
  np.testing.assert_array_equal(np.asarray(export.load(old, model).logits(x)), want)
  export.recode(old, again)
  assert export.read_spec(again)["version"] == 4
  assert stacked(again)["codes"] == stacked(new)["codes"]
  np.testing.assert_array_equal(np.asarray(export.load(again, model).logits(x)), want)


def test_a_scanned_weight_has_a_codebook_per_step(tmp_path):
  """k-means weight sharing on a scanned weight: each step clustered on its own (its own
  linear-init Lloyd codebook, as k-means of that step alone gives), exported and loaded
  bit-exactly, one codebook per step in the artifact."""
  x, model, variables, kernel = _scanned_uneven()
  comp, state = _build(model, variables, x, quant=compose.QuantSpec(
      weight_bits=3, act_bits=0, first_last_bits=0, method="kmeans"))
  book = np.asarray(state.model_state["kmeans"]["blocks/fc/kernel"])
  assert book.shape == (3, 8)
  for step in range(3):  # its range: 8 centroids within each step's own weights
    w = np.asarray(kernel[step], np.float32)
    np.testing.assert_allclose(book[step], quantization.kmeans(w, bits=3).codebook, rtol=1e-6)
    assert w.min() <= book[step].min() and book[step].max() <= w.max()
  out = str(tmp_path / "export")
  comp.export(out, state)
  meta = next(m for m in export.read_spec(out)["layers"] if m["path"] == "params/blocks/fc/kernel")
  assert meta["kind"] == "kmeans" and meta["codebook_axes"] == 1
  assert meta["segments"]["codebook"] == 4 * 3 * 8
  loaded = export.load(out, model)
  shared = np.asarray(loaded.variables["params"]["blocks"]["fc"]["kernel"])
  for step in range(3):  # every weight of a step is one of that step's centroids
    assert np.isin(shared[step], book[step]).all()
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), x))
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)), want)
  bad = dict(meta, codebook_axes=3, encoding=meta.get("encoding", "dense"), nnz=3 * 6 * 8)
  with pytest.raises(ConfigError, match="codebook_axes is 3, not 0 to 2 leading axes"):
    export.decode_layer(bad, {"positions": np.zeros(0, np.uint8), "values": np.zeros(0, np.uint8),
                              "codebook": np.zeros(4 * 3 * 8, np.uint8)})
