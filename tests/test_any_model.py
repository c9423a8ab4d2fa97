"""Conformance: models the library has never seen, Linen and NNX, compressed end to end.

Each model below is defined only here. It goes through a few composed steps with pruning, 4-bit
weights, 8-bit inputs and KD from a teacher of the same architecture, is exported, loaded back into
the user's own module and served with ``jax.export``. The oracles are independent of the
compression code: exact zero counts (``round(s * n)`` per selected weight, first and last layer in
forward order dense), bytes on disk read with ``os.path.getsize``, and the three forwards (fake
quant, artifact, serving) compared bit for bit.
"""

from __future__ import annotations

import os
import re
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcompress
from jaxcompress import budget, compose, export, quantization, selection
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.models.functional import functional, set_variables, variables_of
from jaxcompress.rules import flat_paths
from jaxcompress.selection import trace_layers

CLASSES = 4


class LinenMLP(nn.Module):
  """No train flag at all."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in (32, 32, 16):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(CLASSES)(x)


class LinenRenamedNorms(nn.Module):
  """BatchNorms under arbitrary names, one after a conv, one after a dense; ``training`` flag."""

  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not training, name="after_stem")(x))
    x = nn.Conv(16, (3, 3), strides=2, name="body")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not training, name="n2")(x))
    x = nn.Conv(16, (3, 3), name="mid")(x)
    x = nn.relu(nn.GroupNorm(num_groups=4, name="gn")(x))
    x = x.mean((1, 2))
    x = nn.relu(nn.BatchNorm(use_running_average=not training, name="zzz")(nn.Dense(16)(x)))
    return nn.Dense(CLASSES, name="classifier")(x)


class LinenAttention(nn.Module):
  """Self-attention (rank-3 DenseGeneral kernels) + LayerNorm + MLP; ``deterministic`` flag."""

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = nn.Dense(16, name="proj_in")(x)
    h = nn.LayerNorm()(h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h))
    h = nn.LayerNorm()(h + nn.Dense(16)(nn.gelu(nn.Dense(32)(h))))
    h = nn.Dropout(0.1, deterministic=deterministic)(h)
    return nn.Dense(CLASSES, name="head")(h.mean(1))


class LinenEmbed(nn.Module):
  """Token ids -> Embed -> Dense, with the embedding reused as the output head (tied)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(CLASSES * 2, 16)
    h = nn.relu(nn.Dense(16)(embed(tokens)))
    h = nn.Dense(16)(h).mean(1)
    return embed.attend(h)[:, :CLASSES]


class NNXCnn(nnx.Module):
  """An NNX CNN with BatchNorm."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.conv3 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
    self.out = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.conv3(x))
    return self.out(x.mean((1, 2)))


class NNXTransformer(nnx.Module):
  """NNX attention + MLP blocks in a list, LayerNorm, dropout."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(6, 16, rngs=rngs)
    self.blocks = nnx.List([nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                                   decode=False, rngs=rngs) for _ in range(2)])
    self.norms = nnx.List([nnx.LayerNorm(16, rngs=rngs) for _ in range(2)])
    self.mlp = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = self.inp(x)
    for attn, norm in zip(self.blocks, self.norms):
      h = norm(h + attn(h))
    h = self.drop(nnx.gelu(self.mlp(h)).reshape(*h.shape[:-1], 16))
    return self.head(h.mean(1))


class LinenDictInput(nn.Module):
  """Two inputs in one dict: an image and integer metadata (embedded), ``train`` flag."""

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(inputs["image"]))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x))).mean((1, 2))
    meta = nn.Embed(CLASSES * 2, 8)(inputs["meta"]).mean(1)
    return nn.Dense(CLASSES)(nn.relu(nn.Dense(16)(jnp.concatenate([x, meta], -1))))


class NNXTupleInput(nnx.Module):
  """Two inputs in one tuple: a sequence and a 0/1 mask over its steps."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(6, 16, rngs=rngs)
    self.mid = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, inputs):
    seq, mask = inputs
    h = nnx.relu(self.mid(nnx.relu(self.inp(seq))))
    pooled = (h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    return self.head(pooled)


class LinenEinsumOutFirst(nn.Module):
  """An Einsum whose kernel is [out, in], then a BatchNorm (not folded: channels not last)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(12)(x)
    h = nn.Einsum((10, 12), "btd,fd->btf", use_bias=False, name="mix")(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
    return nn.Dense(CLASSES)(h.mean(1))


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, h):
    return h + nn.Dense(12, name="b")(nn.relu(nn.Dense(12, name="a")(h)))


class LinenRematScan(nn.Module):
  """A block under nn.remat, then two blocks stacked by nn.scan."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(12)(x)
    h = nn.remat(_Residual)(name="remat")(h)
    stack = nn.scan(lambda m, c, _: (m(c), None), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2)
    h, _ = stack(_Residual(name="scan"), h, None)
    return nn.Dense(CLASSES)(h.mean(1))


class _ConvBN(nn.Module):
  train: bool = False

  @nn.compact
  def __call__(self, h, _):
    z = nn.BatchNorm(use_running_average=not self.train, name="bn")(
        nn.Conv(6, (3, 3), use_bias=False, name="conv")(h))
    return h + nn.relu(z), None


class LinenScannedBatchNorm(nn.Module):
  """Conv + BatchNorm stacked three deep by nn.scan (parameters and statistics [3, ...])."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(
        nn.Conv(6, (3, 3), name="stem")(x)))
    h, _ = nn.scan(_ConvBN, variable_axes={"params": 0, "batch_stats": 0},
                   split_rngs={"params": True}, length=3)(train=train, name="blocks")(h, None)
    return nn.Dense(CLASSES)(h.mean((1, 2)))


class LinenTransposedKernel(nn.Module):
  """A ConvTranspose storing its kernel [kh, kw, out, in], then a BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3))(x))
    h = nn.ConvTranspose(6, (3, 3), transpose_kernel=True, use_bias=False, name="up")(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
    return nn.Dense(CLASSES)(nn.relu(nn.Conv(8, (3, 3))(h)).mean((1, 2)))


class LinenRowNorm(nn.Module):
  """A BatchNorm over the rows (axis 1) of a conv's output with as many rows as channels."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(8, (3, 3))(x))
    h = nn.Conv(8, (3, 3), name="mid")(h)  # [B, 8, 8, 8]
    h = nn.relu(nn.BatchNorm(use_running_average=not train, axis=1, name="bn")(h))
    return nn.Dense(CLASSES)(nn.relu(nn.Conv(8, (3, 3))(h)).mean((1, 2)))


class LinenKeywordInputs(nn.Module):
  """Layers and a BatchNorm given their input by name (``layer(inputs=h)``)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(16)(inputs=x))
    h = nn.Dense(16, use_bias=False, name="mid")(inputs=h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x=h))
    return nn.Dense(CLASSES)(inputs=h.mean(1))


class NNXKeywordInputs(nnx.Module):
  """The NNX counterpart of :class:`LinenKeywordInputs`."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(6, 16, rngs=rngs)
    self.mid = nnx.Linear(16, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.out = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.inp(inputs=x))
    h = nnx.relu(self.bn(x=self.mid(inputs=h)))
    return self.out(inputs=h.mean(1))


def _image(rng):
  return rng.normal(size=(8, 8, 8, 3)).astype(np.float32)


def _tokens(rng):
  return rng.integers(0, CLASSES * 2, (8, 5)).astype(np.int32)


def _sequence(rng):
  return rng.normal(size=(8, 5, 6)).astype(np.float32)


def _image_and_meta(rng):
  return {"image": _image(rng), "meta": rng.integers(0, CLASSES * 2, (8, 3)).astype(np.int32)}


def _sequence_and_mask(rng):
  return _sequence(rng), (rng.random((8, 5)) < 0.7).astype(np.float32)


def _linen(cls):
  def make(seed, x):
    model = cls()
    return model, functional(model).init(jax.random.key(seed), x)
  return make


def _nnx(cls):
  def make(seed, x):
    del x
    model = cls(rngs=nnx.Rngs(seed))
    return model, variables_of(model)
  return make


MODELS = {
    "linen_no_flag": (_linen(LinenMLP), _image),
    "linen_renamed_norms": (_linen(LinenRenamedNorms), _image),
    "linen_attention": (_linen(LinenAttention), _sequence),
    "linen_embed": (_linen(LinenEmbed), _tokens),
    "nnx_cnn": (_nnx(NNXCnn), _image),
    "nnx_transformer": (_nnx(NNXTransformer), _sequence),
    "linen_dict_input": (_linen(LinenDictInput), _image_and_meta),
    "nnx_tuple_input": (_nnx(NNXTupleInput), _sequence_and_mask),
    "linen_einsum_out_first": (_linen(LinenEinsumOutFirst), _sequence),
    "linen_remat_scan": (_linen(LinenRematScan), _sequence),
    "linen_scanned_batchnorm": (_linen(LinenScannedBatchNorm), _image),
    "linen_transposed_kernel": (_linen(LinenTransposedKernel), _image),
}
SPARSITY = 0.5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compress_export_load_serve(name, tmp_path):
  make, data = MODELS[name]
  rng = np.random.default_rng(0)
  x = data(rng)
  student, svars = make(1, x)
  teacher, tvars = make(2, x)
  comp = compose.build(
      student, svars, x, optimizer=optax.sgd(0.01), total_steps=4, teacher=teacher,
      prune=compose.PruneSpec(sparsity=SPARSITY, schedule="constant", update_every=1),
      quant=compose.QuantSpec(weight_bits=4, act_bits=8),
      distill=compose.DistillSpec(alpha=0.5))
  state = comp.init_state(svars, x, teacher_vars=tvars, calibration=[x])
  step = comp.make_train_step()
  labels = rng.integers(0, CLASSES, 8).astype(np.int32)
  for _ in range(3):
    state, metrics = step(state, Batch(x, labels, np.ones(8, np.float32)), tvars)
  assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1

  # Exact sparsity: every selected weight has round(s * n) zeros; first and last layer dense.
  params = jax.device_get(state.params["model"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  layers = comp.layers.layers
  assert len(layers) >= 3
  edges = {layers[0].weight, comp.layers.layer(comp.layers.last).weight}
  for layer in layers:
    zeros = int(np.sum(flat[layer.weight] == 0))
    expected = 0 if layer.weight in edges else round(SPARSITY * flat[layer.weight].size)
    assert zeros == expected, (layer.weight, zeros, expected)

  # Export, load into the user's own module, serve; three forwards bit-identical. The input's
  # shapes and dtypes (int32 token ids, a dict or tuple of inputs) come from build's sample.
  out = str(tmp_path / "export")
  report = comp.export(out, state)
  assert export.read_spec(out)["input"] == _signature(x)
  on_disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  assert report["total_bytes"] == on_disk
  assert report["float32_bytes"] == 4 * sum(v.size for v in jax.tree.leaves(svars["params"]))
  assert report["total_bytes"] < report["float32_bytes"]
  fake_quant = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), x))
  loaded = export.load(out, student)
  artifact = np.asarray(loaded.logits(x))
  export.save_serving(str(tmp_path / "serving"), loaded)
  served = np.asarray(export.load_serving(str(tmp_path / "serving"))(x))
  np.testing.assert_array_equal(artifact, fake_quant)
  np.testing.assert_array_equal(served, fake_quant)
  # The loaded variables fit the user's module as is (no input quantization there).
  plain = np.asarray(functional(student).apply(loaded.variables, x)[0])
  assert plain.shape == fake_quant.shape and np.all(np.isfinite(plain))


def _signature(x):
  """The spec's input entry, written out by hand from the sample batch."""
  if isinstance(x, dict):
    return {"dict": {k: _signature(v) for k, v in x.items()}}
  if isinstance(x, tuple):
    return {"tuple": [_signature(v) for v in x]}
  return {"shape": list(x.shape[1:]), "dtype": x.dtype.name}


def test_an_einsum_with_output_first_scales_its_rows_and_keeps_its_batchnorm():
  x = _sequence(np.random.default_rng(0))
  model, variables = _linen(LinenEinsumOutFirst)(0, x)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, x, calibration=[x])
  layer = next(l for l in state.model_state["quant"].layers if l.path == "mix")
  assert layer.weight_axis == 0  # kernel [f=10, d=12]: one scale per output channel f
  scale = comp.quantizer.specs({"params": state.params["model"]},
                               state.model_state["quant"])["mix"]
  kernel = np.asarray(variables["params"]["mix"]["kernel"])
  np.testing.assert_allclose(np.ravel(scale.weight_scale),
                             2 * np.abs(kernel).max(1) / 15, rtol=1e-6)  # 4 bits: 15 steps
  assert "bn" not in trace_layers(model, variables, x).norms  # folds need channels last


class LinenEinsumEquationAtCall(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(12)(x))
    h = nn.relu(nn.Einsum((10, 12), use_bias=False, name="mix")(h, "btd,fd->btf"))
    return nn.Dense(CLASSES)(h.mean(1))


class NNXEinsumEquationAtCall(nnx.Module):
  """Built as ``[out, in]`` (``btd,fd->btf``), called as ``[in, out]``: sums over axis 0."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(6, 10, rngs=rngs)
    self.mix = nnx.Einsum("btd,fd->btf", (10, 12), rngs=rngs)
    self.out = nnx.Linear(12, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.mix(nnx.relu(self.inp(x)), "btf,fd->btd")).mean(1))


@pytest.mark.parametrize("make", [_linen(LinenEinsumEquationAtCall),
                                  _nnx(NNXEinsumEquationAtCall)])
def test_an_einsum_given_its_equation_at_the_call_is_one_line(make):
  x = _sequence(np.random.default_rng(0))
  model, variables = make(0, x)
  with pytest.raises(ConfigError, match=r"^model: the Einsum 'mix' is called with the equation "
                     r"'bt.,fd->bt.', not its einsum_str .*give 'bt.,fd->bt.' when the Einsum is "
                     r"built"):
    trace_layers(model, variables, x)


@pytest.mark.parametrize("name,path,axis", [("linen_einsum_out_first", "mix", 0),
                                             ("linen_transposed_kernel", "up", 2)])
def test_channel_pruning_removes_output_channels_where_the_kernel_keeps_them(name, path, axis):
  make, data = MODELS[name]
  x = data(np.random.default_rng(0))
  model, variables = make(0, x)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                       prune=compose.PruneSpec(structure="channel", sparsity=0.5,
                                               schedule="constant"))
  mask = np.asarray(comp.final_masks({"model": variables["params"]})["model"][path]["kernel"])
  kernel = np.abs(np.asarray(variables["params"][path]["kernel"]))
  # The output channels with the lowest L1 norms, all their entries: a NumPy oracle.
  norms = np.moveaxis(kernel, axis, -1).reshape(-1, kernel.shape[axis]).sum(0)
  pruned = np.sort(np.argsort(norms)[:kernel.shape[axis] // 2])
  per_channel = np.moveaxis(mask, axis, -1).reshape(-1, kernel.shape[axis])
  assert np.all(per_channel == per_channel[:1])
  np.testing.assert_array_equal(np.flatnonzero(per_channel[0] == 0), pruned)


def test_a_batchnorm_stacked_by_scan_is_not_folded():
  x = _image(np.random.default_rng(0))
  model, variables = _linen(LinenScannedBatchNorm)(0, x)
  assert variables["batch_stats"]["blocks"]["bn"]["mean"].shape == (3, 6)
  traced = trace_layers(model, variables, x)
  assert traced.norms == {"stem_bn": "stem"}
  assert [(l.path, l.stacked) for l in traced.layers] == [("stem", 0), ("blocks/conv", 1),
                                                           ("Dense_0", 0)]
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                       quant=compose.QuantSpec(weight_bits=4))
  assert "blocks/bn" not in comp.fold_norms


def test_a_dropout_on_its_own_rng_stream_gets_the_step_key():
  class Noisy(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dropout(0.5, deterministic=not train, rng_collection="noise")(nn.Dense(64)(x))

  x = np.ones((4, 8), np.float32)
  model = Noisy()
  fm = functional(model)
  variables = model.init(jax.random.key(0), x)
  plain = np.asarray(fm.apply(variables, x)[0])
  out = np.asarray(fm.apply(variables, x, train=True, rngs=jax.random.key(1))[0])
  kept = out != 0
  assert 0.3 < kept.mean() < 0.7  # rate 0.5 over 256 entries
  np.testing.assert_allclose(out[kept], 2 * plain[kept], rtol=1e-6)  # kept entries scaled 1/0.5
  again = np.asarray(fm.apply(variables, x, train=True, rngs=jax.random.key(1))[0])
  np.testing.assert_array_equal(again, out)


def test_a_transposed_kernel_scales_its_output_channels():
  """8-bit weights stay within quantization noise of the float model even with uneven
  BatchNorm gains (folding them along the input axis, as before, is off by 60 %)."""
  model, variables, x = _uneven_bn_gains(LinenTransposedKernel, 6)
  state = _eight_bit_weights_keep_the_function(model, variables, x)
  assert next(l for l in state.model_state["quant"].layers if l.path == "up").weight_axis == 2
  assert trace_layers(model, variables, x).layer("up").reduce_axes == (3,)
  assert "bn" not in trace_layers(model, variables, x).norms


def test_a_batchnorm_over_another_axis_than_channels_is_not_folded():
  model, variables, x = _uneven_bn_gains(LinenRowNorm, 8)  # one gain per row
  assert "bn" not in trace_layers(model, variables, x).norms
  _eight_bit_weights_keep_the_function(model, variables, x)


def _uneven_bn_gains(cls, n):
  """``cls``'s model with its BatchNorm ``bn``'s ``n`` gains spread from 0.2 to 5."""
  x = _image(np.random.default_rng(0))
  model, variables = _linen(cls)(0, x)
  params = jax.tree.map(np.asarray, variables["params"])
  params["bn"]["scale"] = np.geomspace(0.2, 5.0, n).astype(np.float32)
  return model, {**variables, "params": params}, x


def _eight_bit_weights_keep_the_function(model, variables, x):
  """8-bit weights stay within quantization noise of the float model; returns the state."""
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=8, act_bits=None))
  state = comp.init_state(variables, x)
  want = np.asarray(functional(model).apply(variables, x)[0])
  got = np.asarray(comp.logits_fn(comp.eval_variables(state), x))
  assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
  return state


def test_trace_finds_norms_by_forward_not_by_name():
  x = _image(np.random.default_rng(0))
  model, variables = _linen(LinenRenamedNorms)(0, x)
  layers = trace_layers(model, variables, x)
  assert layers.norms == {"after_stem": "stem", "n2": "body", "gn": "mid", "zzz": "Dense_0"}
  assert set(layers.batchnorms) == {"after_stem", "n2", "zzz"}  # GroupNorm is not folded
  assert layers.first == "stem" and layers.last == "classifier"


def test_batchnorms_of_frozen_variables_are_folded_as_of_plain_dicts():
  x = _image(np.random.default_rng(0))
  model, variables = _linen(LinenRenamedNorms)(0, x)
  for given in (variables, flax.core.freeze(variables)):
    comp = compose.build(model, given, x, optimizer=optax.sgd(0.1), total_steps=2,
                         quant=compose.QuantSpec(weight_bits=4))
    assert set(comp.fold_norms) == {"after_stem", "n2", "zzz"}


class RecurrentLM(nn.Module):
  cell: type

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(11)(nn.RNN(self.cell(8))(nn.Embed(11, 8)(ids)))


def test_kernels_the_library_does_not_see_called_are_named_in_a_warning():
  """nn.OptimizedLSTMCell computes its gates' products itself (DenseParams hold the kernels):
  they stay float, and build says so; nn.LSTMCell's Dense gates are compressed, no warning."""
  ids = jnp.zeros((2, 5), jnp.int32)
  for cell, warned in ((nn.OptimizedLSTMCell, True), (nn.LSTMCell, False)):
    model = RecurrentLM(cell)
    variables = model.init(jax.random.key(0), ids)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      compose.build(model, variables, ids, optimizer=optax.sgd(0.1), total_steps=2,
                    quant=compose.QuantSpec(weight_bits=4))
    found = [str(w.message) for w in caught if "stay float and dense" in str(w.message)]
    assert bool(found) is warned, cell
    if warned:
      assert "OptimizedLSTMCell_0/hf/kernel" in found[0]


class LocallyConnected(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.ConvLocal(4, (3, 3))(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_a_conv_local_kernel_is_named_a_layer_type_the_library_does_not_compress():
  # nn.ConvLocal is a convolution the forward calls; the warning said its kernel belonged to no
  # Conv the forward calls, giving an LSTM cell's gates as the example.
  x = jnp.ones((1, 6, 6, 2))
  model = LocallyConnected()
  layers = trace_layers(model, model.init(jax.random.key(0), x), x)
  assert [l.weight for l in layers.layers] == ["Conv_0/kernel", "Dense_0/kernel"]
  with pytest.warns(UserWarning, match=r"^compression: ConvLocal_0/kernel belong to no Conv, .* "
                    r"the layer types the library compresses \(others, e\.g\. nn\.ConvLocal "
                    r"or nn\.OptimizedLSTMCell, .*\): they stay float and dense$"):
    layers.warn_uncovered("compression")
  row = [r for r in selection.table(layers).splitlines() if "ConvLocal_0/kernel" in r]
  assert len(row) == 1 and row[0].split("|")[3].strip() == "(type not compressed)"


def test_an_input_of_length_zero_is_one_line():
  model = RecurrentLM(nn.LSTMCell)
  ids = jnp.zeros((2, 5), jnp.int32)
  variables = model.init(jax.random.key(0), ids)
  empty = jnp.zeros((2, 0), jnp.int32)
  with pytest.raises(ConfigError, match=r"input of shape \(2, 0\) holds no entries"):
    compose.build(model, variables, empty, optimizer=optax.sgd(0.1), total_steps=2,
                  quant=compose.QuantSpec(weight_bits=4))
  comp = compose.build(model, variables, ids, optimizer=optax.sgd(0.1), total_steps=2,
                       quant=compose.QuantSpec(weight_bits=4))
  with pytest.raises(ConfigError, match=r"quantizer init: the model's input of shape \(2, 0\)"):
    comp.init_state(variables, empty)


def test_tied_embedding_is_both_first_and_last():
  x = _tokens(np.random.default_rng(0))
  model, variables = _linen(LinenEmbed)(0, x)
  layers = trace_layers(model, variables, x)
  assert layers.first == layers.last == "Embed_0"
  assert layers.prune_rules()[0] == ("Embed_0/embedding", False)


def test_attention_kernels_group_along_their_input_axes_in_linen_and_nnx():
  """N:M groups run along what a projection sums over: ``[in, heads, dim]`` -> the ``in`` axis,
  the output projection ``[heads, dim, out]`` -> both head axes (by hand, from the shapes)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5, 6)).astype(np.float32)
  linen = trace_layers(*_linen(LinenAttention)(0, x), x).reduce_axes()
  attn = "MultiHeadDotProductAttention_0"
  assert {k: linen[f"{attn}/{k}/kernel"] for k in ("query", "key", "value", "out")} == {
      "query": (0,), "key": (0,), "value": (0,), "out": (0, 1)}
  nnx_axes = trace_layers(*_nnx(NNXTransformer)(0, x), x).reduce_axes()
  assert {k: nnx_axes[f"blocks/0/{k}/kernel"] for k in ("query", "key", "value", "out")} == {
      "query": (0,), "key": (0,), "value": (0,), "out": (0, 1)}
  assert nnx_axes["mlp/kernel"] == (0,)  # LinearGeneral(16, (2, 8)): [16, 2, 8]


@pytest.mark.parametrize("make,paths", [
    (_linen(LinenKeywordInputs), ["Dense_0", "mid", "Dense_1"]),
    (_nnx(NNXKeywordInputs), ["inp", "mid", "out"])])
def test_layers_given_their_input_by_name_are_compressed(make, paths, tmp_path):
  x = _sequence(np.random.default_rng(0))
  model, variables = make(0, x)
  layers = trace_layers(model, variables, x)
  assert [l.path for l in layers.layers] == paths and layers.uncovered == ()
  assert layers.norms == {"bn": "mid"}
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=2,
                       prune=compose.PruneSpec(sparsity=0.5, schedule="one_shot"),
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, x, calibration=[x])
  assert [l.path for l in state.model_state["quant"].layers] == paths
  masks = comp.final_masks(state.params)["model"]
  assert int(np.sum(np.asarray(masks["mid"]["kernel"]) == 0)) == 128  # round(0.5 * 16 * 16)
  state = state.replace(params=jax.tree.map(lambda p, m: p * m, state.params,
                                            comp.final_masks(state.params)))
  comp.export(str(tmp_path / "export"), state)
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), x))
  got = np.asarray(export.load(str(tmp_path / "export"), model).logits(x))
  np.testing.assert_array_equal(got, want)


def test_weights_outside_layers_are_listed_not_compressed():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.ones, (x.shape[-1], 4))
      return nn.Dense(4)(nn.Dense(8)(x @ w))

  x = np.ones((2, 3), np.float32)
  model = Custom()
  layers = trace_layers(model, model.init(jax.random.key(0), x), x)
  assert layers.uncovered == ("w",)
  # Forward order, not name order: Dense(4) is constructed (named) first but called last.
  assert [l.path for l in layers.layers] == ["Dense_1", "Dense_0"]


def test_model_with_no_layer_and_failing_forward_are_one_line_errors():
  class NoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("s", nn.initializers.ones, (1,))

  x = np.ones((2, 3), np.float32)
  model = NoLayer()
  with pytest.raises(ConfigError, match="no layer to compress"):
    compose.build(model, model.init(jax.random.key(0), x), x, optimizer=optax.sgd(0.1),
                  total_steps=2, quant=compose.QuantSpec(weight_bits=4))
  mlp = LinenMLP()
  variables = mlp.init(jax.random.key(0), np.ones((2, 12), np.float32))
  with pytest.raises(ConfigError, match=r"model: LinenMLP's forward fails on inputs of shape "
                                       r"\(2, 5\)"):
    trace_layers(mlp, variables, np.ones((2, 5), np.float32))


@pytest.mark.parametrize("wrap", [lambda a, b: {"logits": a, "aux": b}, lambda a, b: (a, b)])
def test_a_model_of_several_outputs_is_one_line_at_build(wrap):
  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(8)(x))
      return wrap(nn.Dense(4)(h), nn.Dense(1)(h))

  x = np.ones((2, 3), np.float32)
  model = TwoHeads()
  variables = model.init(jax.random.key(0), x)
  kind = "dict" if isinstance(wrap(0, 0), dict) else "tuple"
  with pytest.raises(ConfigError, match=f"TwoHeads returns {kind} .*not one array"):
    compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2)
  held_out = [Batch(x, np.zeros(2, np.int32), np.ones(2, np.float32))]
  with pytest.raises(ConfigError, match="^model: TwoHeads returns"):
    budget.find_plan(model, variables, held_out, size_bytes=10**6)


def test_pruning_that_prunes_nothing_warns_or_is_one_line():
  x = np.ones((2, 3), np.float32)
  model = LinenMLP()
  with pytest.warns(UserWarning, match="prunes no weight"):
    compose.build(model, model.init(jax.random.key(0), x), x, optimizer=optax.sgd(0.1),
                  total_steps=4, prune=compose.PruneSpec(sparsity=0.0001))
  # The user's rules that select nothing are one line naming them; one of several that matches
  # nothing warns.
  with pytest.raises(ConfigError, match=re.escape(
      "prune.rules must be rules that select at least one weight to prune (Dense_0/bias, "
      "Dense_0/kernel, Dense_1/bias, Dense_1/kernel, ...), got (('nothing', True),)")):
    compose.build(model, model.init(jax.random.key(0), x), x, optimizer=optax.sgd(0.1),
                  total_steps=4, prune=compose.PruneSpec(sparsity=0.5, rules=(("nothing", True),)))
  with pytest.warns(UserWarning, match="these rules matched no path: .*nothing"):
    compose.build(model, model.init(jax.random.key(0), x), x, optimizer=optax.sgd(0.1),
                  total_steps=4, prune=compose.PruneSpec(
                      sparsity=0.5, rules=(("nothing", True), (".*kernel", True))))


def test_a_model_that_does_not_fit_the_artifact_is_refused(tmp_path):
  x = _image(np.random.default_rng(0))
  model, variables = _nnx(NNXCnn)(0, x)
  export.export_model(str(tmp_path), variables=variables, input_shape=x.shape[1:])
  other = LinenMLP()
  with pytest.raises(ConfigError, match="exported from another model"):
    export.load(str(tmp_path), other)
  # Nothing compressed: the artifact is the model itself (both compiled, as XLA fuses them).
  plain = jax.jit(lambda v, x: functional(model).apply(v, x)[0])
  np.testing.assert_array_equal(np.asarray(export.load(str(tmp_path), model).logits(x)),
                                np.asarray(plain(variables, x)))


class NNXFlagged(nnx.Module):
  """An NNX model passing its own call argument to BatchNorm and Dropout (the layers' attributes
  stay at their defaults: statistics updated, dropout on)."""

  def __init__(self, *, rngs):
    self.inp = nnx.Linear(10, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = False):
    h = nnx.relu(self.bn(self.inp(x), use_running_average=deterministic))
    return self.head(self.drop(h, deterministic=deterministic))


def test_an_nnx_models_own_train_flag_is_passed_in_every_call():
  x = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
  model = NNXFlagged(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  fm = functional(model)
  p = variables["params"]
  # Eval: running statistics (mean 0, var 1 at init) and no dropout, by hand in NumPy.
  h = x @ np.asarray(p["inp"]["kernel"]) + np.asarray(p["inp"]["bias"])
  h = np.maximum(h / np.sqrt(1 + 1e-5) * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"]),
                 0)
  want = h @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
  got, state = fm.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert state == {}
  # Train: batch statistics move, dropout differs by key.
  a, state = fm.apply(variables, x, train=True, rngs=jax.random.key(1))
  b, _ = fm.apply(variables, x, train=True, rngs=jax.random.key(2))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn"]["mean"]),
                             0.01 * _bn_input_mean(x, p), rtol=1e-4, atol=1e-6)


class DropBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(16, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(nnx.relu(self.lin(x)))


class DropStack(nnx.Module):
  """Three blocks with Dropout, stacked by nnx.vmap over split rngs and run by nnx.scan."""

  def __init__(self, *, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return DropBlock(rngs)

    self.blocks = blocks(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, block):
      return block(h)

    return run(x, self.blocks)


def test_scanned_nnx_blocks_draw_their_own_dropout_masks_and_need_a_key():
  model = DropStack(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  lin = variables["params"]["blocks"]["lin"]
  lin["kernel"], lin["bias"] = np.stack([np.eye(16, dtype=np.float32)] * 3), np.zeros((3, 16))
  x = np.ones((256, 16), np.float32)
  fm = functional(model)
  out, _ = fm.apply(variables, x, train=True, rngs=jax.random.key(1))
  # Identity blocks: each entry is 2^3 = 8 if all three blocks kept it, else 0. Three
  # independent masks keep 1/8 of the entries (one mask shared by the blocks would keep 1/2).
  out = np.asarray(out)
  assert set(np.unique(out)) <= {0.0, 8.0}
  assert abs((out == 8).mean() - 0.125) < 0.03
  again, _ = fm.apply(variables, x, train=True, rngs=jax.random.key(1))
  other, _ = fm.apply(variables, x, train=True, rngs=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(again), out)
  assert not np.array_equal(np.asarray(other), out)
  with pytest.raises(ConfigError, match=r"^rngs: the NNX model draws random numbers in training "
                                        r"\(its streams: default\); pass rngs="):
    fm.apply(variables, x, train=True)
  np.testing.assert_array_equal(np.asarray(fm.apply(variables, x)[0]), x)  # eval: no dropout


def _bn_input_mean(x, p):
  """The batch mean of the BatchNorm's input (nnx.BatchNorm's momentum is 0.99)."""
  return (x @ np.asarray(p["inp"]["kernel"]) + np.asarray(p["inp"]["bias"])).mean(0)


def test_a_pmap_style_batchnorm_is_one_line():
  class PmapStyle(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.BatchNorm(use_running_average=not train, axis_name="batch", name="bn")(
          nn.Conv(4, (3, 3))(x))
      return nn.Dense(CLASSES)(nn.relu(x).mean((1, 2)))

  x = np.zeros((2, 6, 6, 3), np.float32)
  model = PmapStyle()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ConfigError, match=r"^model: the BatchNorm 'bn' averages its statistics "
                     r"over axis_name='batch', a pmap collective; drop axis_name"):
    compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2)


def test_nnx_variables_of_another_module_are_one_line():
  x = _image(np.random.default_rng(0))
  model, variables = _nnx(NNXCnn)(0, x)
  wrong = jax.tree.map(lambda a: a, variables)
  name = next(iter(wrong["params"]))
  leaf = next(k for k, v in wrong["params"][name].items() if not isinstance(v, dict))
  wrong["params"][name][leaf] = np.zeros(np.shape(wrong["params"][name][leaf]) + (2,))
  cases = [(wrong, rf"^variables: params/{name}/{leaf} has shape \(.*\), the NNX module's has "),
           ({"params": {"other": variables["params"]}}, r"^variables: params/\w+ is missing")]
  if "batch_stats" in variables:
    cases.append(({"params": variables["params"]}, r"^variables: no 'batch_stats'"))
  for bad, match in cases:
    with pytest.raises(ConfigError, match=match):
      compose.build(model, bad, x, optimizer=optax.sgd(0.1), total_steps=2)
  with pytest.raises(ConfigError, match=r"^variables_of: module must be an NNX module"):
    variables_of(LinenMLP())


class NNXContainers(nnx.Module):
  """Layers in an nnx.List, an nnx.Dict and an nnx.Sequential: list indices in the paths."""

  def __init__(self, *, rngs: nnx.Rngs, width: int = 8):
    self.convs = nnx.List([nnx.Conv(3, width, (3, 3), rngs=rngs)])
    self.norms = nnx.Dict({"a": nnx.BatchNorm(width, rngs=rngs)})
    self.head = nnx.Sequential(nnx.Linear(width, 16, rngs=rngs), nnx.relu,
                               nnx.Linear(16, 16, rngs=rngs), nnx.relu,
                               nnx.Linear(16, CLASSES, rngs=rngs))

  def __call__(self, x):
    return self.head(nnx.relu(self.norms["a"](self.convs[0](x))).mean((1, 2)))


def test_nnx_trained_variables_go_back_into_the_module():
  rng = np.random.default_rng(0)
  x, y = _image(rng), rng.integers(0, CLASSES, 8).astype(np.int32)
  model = NNXContainers(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  comp = compose.build(model, variables, x, optimizer=optax.adam(1e-2), total_steps=2,
                       prune=compose.PruneSpec(sparsity=0.5),
                       quant=compose.QuantSpec(weight_bits=0, act_bits=0))
  state, step = comp.init_state(variables, x), comp.make_train_step()
  for _ in range(2):
    state, _ = step(state, Batch(x, y, np.ones(8, np.float32)))
  trained = comp.variables(state)
  assert jaxcompress.set_variables is set_variables
  fresh = NNXContainers(rngs=nnx.Rngs(1))
  set_variables(fresh, trained)
  for path, value in flat_paths(trained).items():  # "params/head/layers/2/kernel"
    node = fresh
    for key in path.split("/")[1:]:
      node = node[int(key)] if key.isdigit() else getattr(node, key)
    np.testing.assert_array_equal(np.asarray(node[...]), value)
  assert int(np.sum(np.asarray(fresh.head.layers[2].kernel[...]) == 0)) == 128  # 0.5 of 16x16
  with pytest.raises(ConfigError, match=r"^variables: params/\S+ has shape \(16,?\), the NNX "
                     r"module's has \(8,?\)"):
    set_variables(fresh, variables_of(NNXContainers(rngs=nnx.Rngs(2), width=16)))
  np.testing.assert_array_equal(np.asarray(fresh.convs[0].bias[...]),
                                trained["params"]["convs"]["0"]["bias"])  # nothing written
  set_variables(fresh, {"batch_stats": jax.tree.map(np.zeros_like, trained["batch_stats"])})
  assert not np.any(np.asarray(fresh.norms["a"].var[...]))  # what a training forward returns


class NNXCounted(nnx.Module):
  """Counts its calls in an integer nnx.BatchStat, as docs/own_models.md suggests for a counter."""

  def __init__(self, *, rngs):
    self.a = nnx.Linear(8, 16, rngs=rngs)
    self.b = nnx.Linear(16, 16, rngs=rngs)
    self.c = nnx.Linear(16, CLASSES, rngs=rngs)
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.count[...] = self.count[...] + 1
    return self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))


def test_an_integer_counter_trains_exports_and_loads_as_an_integer(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  y = rng.integers(0, CLASSES, 16).astype(np.int32)
  model = NNXCounted(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=3,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  state = comp.init_state(variables, x, calibration=[x])
  step = comp.make_train_step()
  for _ in range(3):
    state, _ = step(state, Batch(x, y, np.ones(16, np.float32)))
  assert int(state.model_state["batch_stats"]["count"]) == 3  # one forward per step
  comp.export(str(tmp_path / "a"), state)
  loaded = export.load(str(tmp_path / "a"), NNXCounted(rngs=nnx.Rngs(1)))
  count = loaded.variables["batch_stats"]["count"]
  assert count.dtype == np.int32 and int(count) == 3
  np.testing.assert_array_equal(np.asarray(loaded.logits(x)),
                                np.asarray(comp.logits_fn(comp.eval_variables(state), x)))
  big = state.replace(model_state={**state.model_state, "batch_stats": {"count": jnp.int32(2**25)}})
  with pytest.raises(ConfigError, match=r"^export: variable .*count' has dtype int32 and values "
                                        r"beyond \+-2\^24; only floating-point variables, or "):
    comp.export(str(tmp_path / "b"), big)
  assert not os.path.exists(tmp_path / "b")


class NNXTied(nnx.Module):
  """Two modules holding one kernel variable (``b.kernel = a.kernel``)."""

  def __init__(self, *, rngs):
    self.inp = nnx.Linear(4, 8, rngs=rngs)
    self.a = nnx.Linear(8, 8, rngs=rngs)
    self.b = nnx.Linear(8, 8, rngs=rngs)
    self.b.kernel = self.a.kernel
    self.out = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.b(nnx.relu(self.a(self.inp(x))))))


def test_a_kernel_shared_by_two_nnx_modules_is_named_not_skipped_silently():
  model = NNXTied(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  assert "kernel" not in variables["params"]["b"]  # NNX keeps the shared variable once
  with pytest.warns(UserWarning, match=r"^layer 'b' shares its weight with 'a/kernel' \(one "
                    r"variable in two modules\): the weight is compressed once, under 'a/kernel', "
                    r"and the inputs of layer 'b' are not quantized$"):
    traced = trace_layers(model, variables, np.ones((2, 4), np.float32))
  assert [l.path for l in traced.layers] == ["inp", "a", "out"]


class NNXTiedLast(nnx.Module):
  """The output layer holds the kernel of a middle layer (``out.kernel = a.kernel``)."""

  def __init__(self, *, rngs):
    self.inp = nnx.Linear(4, 8, rngs=rngs)
    self.a = nnx.Linear(8, 8, rngs=rngs)
    self.mid = nnx.Linear(8, 8, rngs=rngs)
    self.out = nnx.Linear(8, 8, rngs=rngs)
    self.out.kernel = self.a.kernel

  def __call__(self, x):
    return self.out(nnx.relu(self.mid(nnx.relu(self.a(self.inp(x))))))


def test_a_kernel_the_last_call_shares_is_the_last_layers():
  # The forward's last product runs on a/kernel (through 'out'): that weight is the last layer's,
  # kept dense and at 8 bits; 'mid', called before it, is an inner layer.
  model = NNXTiedLast(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  x = np.ones((2, 4), np.float32)
  with pytest.warns(UserWarning, match="shares its weight"):
    comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=2,
                         prune=compose.PruneSpec(sparsity=0.5),
                         quant=compose.QuantSpec(weight_bits=4, act_bits=8))
  assert comp.layers.last == "a"
  assert comp.layers.prune_rules()[:3] == [("a/kernel", False), ("inp/kernel", False),
                                           ("mid/kernel", True)]
  state = comp.init_state(variables, x)
  bits = {l.path: l.config.weight_bits for l in state.model_state["quant"].layers}
  assert bits == {"inp": 8, "a": 8, "mid": 4}
  qstate = quantization.quantize(model).init(variables, x)
  assert {l.path: l.config.weight_bits for l in qstate.layers} == {"inp": 8, "a": 8, "mid": 4}


class NNXTempered(nnx.Module):
  """Scales its logits by a custom nnx.Variable (neither Param nor BatchStat)."""

  def __init__(self, *, rngs):
    self.a = nnx.Linear(8, 16, rngs=rngs)
    self.b = nnx.Linear(16, CLASSES, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)  # RNG state: not a reason to warn
    self.temperature = nnx.Variable(jnp.array(2.0))

  def __call__(self, x):
    return self.b(self.drop(nnx.relu(self.a(x)))) / self.temperature[...]


def test_exporting_nnx_state_the_artifact_lacks_warns(tmp_path):
  x = np.ones((4, 8), np.float32)
  model = NNXTempered(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=1)
  state = comp.init_state(variables, x)
  with pytest.warns(UserWarning, match=r"^export: the NNX module's state 'temperature' is "
                    r"neither an nnx.Param nor an nnx.BatchStat and is not exported"):
    comp.export(str(tmp_path / "a"), state)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="export: the NNX module's state")
    _, plain = _nnx(NNXCounted)(0, x)
    comp = compose.build(NNXCounted(rngs=nnx.Rngs(0)), plain, x, optimizer=optax.sgd(0.1),
                         total_steps=1)
    comp.export(str(tmp_path / "b"), comp.init_state(plain, x))


class NNXCallRngs(nnx.Module):
  """Dropout without its own Rngs: __call__ hands it the caller's."""

  def __init__(self, *, rngs):
    self.lin = nnx.Linear(16, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    return self.drop(self.lin(x), rngs=rngs)


def test_an_nnx_call_taking_rngs_gets_them_from_the_step_key():
  model = NNXCallRngs(rngs=nnx.Rngs(0))
  variables = variables_of(model)
  variables["params"]["lin"]["kernel"] = np.eye(16, dtype=np.float32)
  variables["params"]["lin"]["bias"] = np.zeros(16, np.float32)
  x = np.ones((64, 16), np.float32)
  fm = functional(model)
  out = np.asarray(fm.apply(variables, x, train=True, rngs=jax.random.key(1))[0])
  assert set(np.unique(out)) <= {0.0, 2.0} and abs((out == 2).mean() - 0.5) < 0.06  # 1024 draws
  np.testing.assert_array_equal(
      np.asarray(fm.apply(variables, x, train=True, rngs=jax.random.key(1))[0]), out)
  assert not np.array_equal(
      np.asarray(fm.apply(variables, x, train=True, rngs=jax.random.key(2))[0]), out)
  np.testing.assert_array_equal(np.asarray(fm.apply(variables, x)[0]), x)  # eval: no dropout
  with pytest.raises(ConfigError, match=r"^rngs: the NNX model draws random numbers in training "
                                        r"\(its __call__ takes rngs\); pass rngs="):
    fm.apply(variables, x, train=True)
