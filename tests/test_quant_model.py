"""quantize(model, rules): rules on a model defined here, oracles for the quantized forward,
range updates, gradients, no recompiles, export spec, bad input."""

from __future__ import annotations

import logging

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.models.functional import variables_of
from jaxcompress.quantization import (LayerConfig, bit_schedule, calibrate, dequantize,
                                      lsq_init_step, quantize, quantize_int)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), name="conv")(x))


class Net(nn.Module):
  """stem (Conv) - BN - ReLU - block/conv - mean - head (Dense)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    x = Block(name="block")(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class NNXBlocks(nnx.Module):
  def __init__(self, *, rngs):
    self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="fc2")(nn.relu(nn.Dense(5, name="fc1")(x)))


def untied(params):
  """Flips each output channel so its largest-magnitude weight is positive.

  On the symmetric grid a channel's most negative weight lands exactly on a rounding tie
  (``-max|w| / scale = -(qmax + 0.5)``), where either code is right and float noise decides;
  with the extreme positive the clip makes the answer unique, so oracles can compare exactly.
  """

  def flip(path, w):
    if path[-1].key != "kernel":
      return w
    idx = np.argmax(np.abs(w).reshape(-1, w.shape[-1]), axis=0)
    return w * np.sign(w.reshape(-1, w.shape[-1])[idx, np.arange(w.shape[-1])])

  return jax.tree_util.tree_map_with_path(flip, params)


def at(tree, path):
  """The subtree at a ``/``-joined module path."""
  for name in path.split("/"):
    tree = tree[name]
  return tree


RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((4, 6, 6, 2)), jnp.float32)
NET = Net()
VARS = NET.init(jax.random.key(0), X)
VARS = {**VARS, "params": untied(VARS["params"])}
MIXED = [("stem", dict(weight_bits=8, act_bits=8)),
         ("head", dict(weight_bits=6, act_bits=None)),
         ("block/.*", dict(weight_bits=4, act_bits=4, per_channel=False)),
         ("never/matches", dict(weight_bits=2))]


def np_minmax_fq(w, bits, per_channel):
  """Oracle: symmetric min-max fake quantization of a kernel, per output channel or per tensor."""
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  m = np.abs(w).max(axis=axes, keepdims=per_channel)
  qmax = 2 ** (bits - 1) - 1
  scale = np.maximum(m / ((2 * qmax + 1) / 2), np.finfo(np.float32).eps)
  return np.clip(np.round(w / scale), -qmax - 1, qmax) * scale


def np_act_fq(x, lo, hi, bits):
  """Oracle: asymmetric fake quantization of an input over [min(lo, 0), max(hi, 0)]."""
  lo, hi, qmax = min(lo, 0.0), max(hi, 0.0), 2 ** bits - 1
  scale = (hi - lo) / qmax
  zp = np.clip(np.round(-lo / scale), 0, qmax)
  return (np.clip(np.round(x / scale) + zp, 0, qmax) - zp) * scale


def test_rules_choose_bits_per_layer_and_report_unused():
  qz = quantize(NET, MIXED)
  with pytest.warns(UserWarning, match=r"matched no path: \['never/matches'\]"):
    qstate = qz.init(VARS, X)
  got = {l.path: (l.kind, l.config.weight_bits, l.config.act_bits, l.weight_axis)
         for l in qstate.layers}
  assert got == {"stem": ("Conv", 8, 8, 3), "block/conv": ("Conv", 4, 4, None),
                 "head": ("Dense", 6, None, 1)}
  assert sorted(qstate.ranges) == ["block/conv", "stem"] and qstate.steps == {}
  np.testing.assert_allclose(qstate.ranges["stem"], [X.min(), X.max()])  # init: the sample's range


def test_default_rules_keep_first_and_last_layer_at_8_bits():
  qstate = quantize(NET).init(VARS, X)
  got = {l.path: (l.config.weight_bits, l.config.act_bits) for l in qstate.layers}
  assert got == {"stem": (8, 8), "block/conv": (4, 8), "head": (8, 8)}


def test_none_rule_leaves_layer_float():
  qstate = quantize(NET, [("head", None), (".*", dict(weight_bits=4))]).init(VARS, X)
  assert [l.path for l in qstate.layers] == ["stem", "block/conv"]


def test_weight_only_forward_matches_oracle_and_export_spec():
  rules = [("stem", dict(weight_bits=3, act_bits=None)),
           (".*", dict(weight_bits=4, act_bits=None, per_channel=False))]
  qz = quantize(NET, rules)
  qstate = qz.init(VARS, X)
  params = jax.tree.map(np.asarray, VARS["params"])
  oracle = jax.tree.map(lambda a: a, params)
  for path, bits, per_channel in (("stem", 3, True), ("block/conv", 4, False), ("head", 4, False)):
    at(oracle, path)["kernel"] = np_minmax_fq(at(params, path)["kernel"], bits, per_channel)
  want = NET.apply({**VARS, "params": oracle}, X)
  got, _, _ = qz.apply(VARS, qstate, X)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Exported integer kernels, dequantized with the spec's numbers, reproduce the fake-quant model.
  specs = qz.specs(VARS, qstate)
  exported = jax.tree.map(lambda a: a, params)
  for path, spec in specs.items():
    node = at(exported, path)
    codes = quantize_int(node["kernel"], spec.weight_scale, spec.weight_zero_point,
                         qmin=spec.weight_qmin, qmax=spec.weight_qmax)
    node["kernel"] = dequantize(codes, spec.weight_scale, spec.weight_zero_point)
  np.testing.assert_allclose(NET.apply({**VARS, "params": exported}, X), got, rtol=1e-6, atol=1e-7)
  assert specs["stem"].weight_scale.shape == (1, 1, 1, 4) and specs["stem"].weight_axis == 3
  assert specs["head"].weight_scale.shape == () and specs["head"].act_bits is None


def test_activation_quantization_matches_numpy_forward():
  mlp = MLP()
  x = jnp.asarray(RNG.standard_normal((8, 3)), jnp.float32)
  variables = mlp.init(jax.random.key(1), x)
  variables = {"params": untied(variables["params"])}
  qz = quantize(mlp, [(".*", dict(weight_bits=4, act_bits=5))], train_kwarg=None)
  qstate = qz.init(variables, x)
  got, _, _ = qz.apply(variables, qstate, x)
  p = jax.tree.map(np.asarray, variables["params"])
  xn = np.asarray(x)
  h_float = np.maximum(xn @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  r = np.asarray(qstate.ranges["fc2"])  # init observes the float model
  np.testing.assert_allclose(r, [h_float.min(), h_float.max()], rtol=1e-5)
  w1, w2 = np_minmax_fq(p["fc1"]["kernel"], 4, True), np_minmax_fq(p["fc2"]["kernel"], 4, True)
  h = np.maximum(np_act_fq(xn, xn.min(), xn.max(), 5) @ w1 + p["fc1"]["bias"], 0)
  want = np_act_fq(h, r[0], r[1], 5) @ w2 + p["fc2"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  spec = qz.specs(variables, qstate)["fc2"]
  assert (spec.act_qmin, spec.act_qmax, spec.act_bits) == (0, 31, 5)
  np.testing.assert_allclose(spec.act_range, r, rtol=1e-6)


def test_specs_compile_one_function_for_the_whole_model(caplog):
  # Shapes no other test uses (a 6-input MLP), so that nothing compiled before is reused.
  mlp = MLP()
  x = jnp.asarray(RNG.standard_normal((4, 6)), jnp.float32)
  variables = jax.device_get({"params": untied(mlp.init(jax.random.key(2), x)["params"])})
  qz = quantize(mlp, [(".*", dict(weight_bits=3, act_bits=6))], train_kwarg=None)
  qstate = qz.init(variables, x)
  compiled = lambda: [r for r in caplog.records if r.getMessage().startswith("Compiling ")]
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    qz.specs(variables, qstate)
    assert len(compiled()) == 1  # not one function for each weight and input of each layer
    caplog.clear()
    qz.specs(variables, qstate)
    assert not compiled()


def test_train_mode_updates_ranges_and_batch_stats_eval_freezes_them():
  qz = quantize(NET, [(".*", dict(weight_bits=8, act_bits=8))], act_momentum=0.9)
  qstate = qz.init(VARS, X)
  x2 = 3.0 * X
  _, state, new_q = qz.apply(VARS, qstate, x2, train=True)
  want = 0.9 * np.asarray(qstate.ranges["stem"]) + 0.1 * np.array([x2.min(), x2.max()])
  np.testing.assert_allclose(new_q.ranges["stem"], want, rtol=1e-6)
  assert not np.allclose(state["batch_stats"]["bn"]["mean"], VARS["batch_stats"]["bn"]["mean"])
  _, state, same_q = qz.apply(VARS, qstate, x2, train=False)
  for path in qstate.ranges:
    np.testing.assert_array_equal(same_q.ranges[path], qstate.ranges[path])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], VARS["batch_stats"])


class TwiceCalled(nn.Module):
  """One Dense applied to x and to 10 x - 3: one weight, two input ranges."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(3, name="shared")
    return shared(x) + shared(10.0 * x - 3.0)


def test_layer_called_twice_updates_its_range_once_from_both_calls():
  model = TwiceCalled()
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  variables = model.init(jax.random.key(0), x)
  qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))], act_momentum=0.9)
  qstate = qz.init(variables, x)
  both = np.concatenate([x, 10.0 * x - 3.0])
  np.testing.assert_allclose(qstate.ranges["shared"], [both.min(), both.max()], rtol=1e-6)
  x2 = 2.0 * x
  _, _, new_q = qz.apply(variables, qstate, x2, train=True)
  both2 = np.concatenate([x2, 10.0 * x2 - 3.0])
  want = 0.9 * np.asarray(qstate.ranges["shared"]) + 0.1 * np.array([both2.min(), both2.max()])
  np.testing.assert_allclose(new_q.ranges["shared"], want, rtol=1e-6)


def test_lsq_state_is_the_papers_init():
  qz = quantize(NET, [(".*", dict(weight_bits=4, act_bits=4, method="lsq"))])
  qstate = qz.init(VARS, X)
  assert qstate.ranges == {}
  kernel = VARS["params"]["stem"]["kernel"]
  np.testing.assert_allclose(qstate.steps["stem"]["weight"], lsq_init_step(kernel, qmax=7, axis=3))
  np.testing.assert_allclose(qstate.steps["stem"]["act"], 2 * np.abs(X).mean() / np.sqrt(7),
                             rtol=1e-6)  # stem input has negatives: signed grid, Q_P = 7
  assert qstate.layer("stem").act_signed and not qstate.layer("block/conv").act_signed


def test_jitted_qat_step_gives_gradients_and_does_not_recompile():
  sched = bit_schedule((8, 4), (2,))
  qz = quantize(NET, [("stem", dict(weight_bits=8, act_bits=8)),
                      (".*", dict(weight_bits=4, act_bits=4, method="lsq"))], bit_schedule=sched)
  qstate = qz.init(VARS, X)
  traces = []

  @jax.jit
  def train_step(params, model_state, qstate, step):
    traces.append(1)

    def loss_fn(trainable):
      out, new_state, new_q = qz.apply({"params": trainable["params"], **model_state},
                                       qstate.replace(steps=trainable["qsteps"]), X, train=True,
                                       step=step)
      return jnp.mean(out ** 2), (new_state, new_q)

    trainable = {"params": params, "qsteps": qstate.steps}
    (loss, (new_state, new_q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable = jax.tree.map(lambda p, g: p - 0.01 * g, trainable, grads)
    return trainable["params"], new_state, new_q.replace(steps=trainable["qsteps"]), grads, loss

  params, state = VARS["params"], {"batch_stats": VARS["batch_stats"]}
  for step in range(4):  # crosses the 8 -> 4 bit phase change at step 2
    params, state, qstate, grads, loss = train_step(params, state, qstate, step)
    assert np.isfinite(float(loss))
  assert len(traces) == 1
  for path in ("stem", "block/conv", "head"):
    g = np.asarray(at(grads["params"], path)["kernel"])
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, path
  for path, steps in grads["qsteps"].items():
    for name, g in steps.items():
      assert np.abs(np.asarray(g)).sum() > 0, (path, name)


def test_progressive_bits_equal_fixed_bits_per_phase():
  rules = [(".*", dict(weight_bits=4, act_bits=4))]
  qz = quantize(NET, rules, bit_schedule=bit_schedule((8, 6, 4), (10, 20)))
  qstate = qz.init(VARS, X)
  f = jax.jit(lambda s: qz.apply(VARS, qstate, X, step=s)[0])
  for step, bits in ((0, 8), (15, 6), (25, 4)):
    fixed = quantize(NET, [(".*", dict(weight_bits=bits, act_bits=bits))])
    want, _, _ = fixed.apply(VARS, fixed.init(VARS, X), X)
    np.testing.assert_allclose(f(step), want, rtol=1e-6, atol=1e-6)
    assert qz.specs(VARS, qstate, step=step)["stem"].weight_bits == bits


def test_nan_in_sample_or_range_raises():
  qz = quantize(NET, [(".*", dict(weight_bits=8, act_bits=8))])
  with pytest.raises(ConfigError, match=r"input of stem must be finite, got lo=nan"):
    qz.init(VARS, X.at[0, 0, 0, 0].set(jnp.nan))
  qstate = qz.init(VARS, X)
  broken = qstate.replace(ranges={**qstate.ranges, "block/conv": jnp.array([0.0, jnp.inf])})
  with pytest.raises(ConfigError, match=r"activation range of block/conv must be finite"):
    qz.specs(VARS, broken)


@pytest.mark.parametrize("rules,match", [
    ([(".*", dict(bits=4))], r"quantization.rules\[0\] key must be one of .*, got 'bits'"),
    ([(".*", dict(weight_bits=9))],
     r"quantization.rules\[0\].weight_bits must be an integer in \[2, 8\], got 9"),
    ([(".*", dict(act_bits=1))], r"quantization.rules\[0\].act_bits must be .* got 1"),
    ([(".*", dict(method="apot"))],
     r"quantization.rules\[0\].method must be one of lsq, minmax, got 'apot'"),
    ([(".*", LayerConfig(method="lsq", symmetric=False))],
     r"quantization.rules\[0\].symmetric must be True with method='lsq', got False"),
    ([(".*", 4)], r"quantization.rules\[0\] must be None, a dict of LayerConfig fields"),
    ([("(", dict(weight_bits=4))], r"regex '\(' does not compile"),
    ("conv1", r"quantization.rules must be a list of \(regex, settings\) pairs, got 'conv1'"),
])
def test_bad_rules_raise_when_built(rules, match):
  with pytest.raises(ConfigError, match=match):
    quantize(NET, rules)


def test_params_alone_instead_of_variables_is_one_line():
  qz = quantize(NET, [(".*", dict(weight_bits=8, act_bits=8))])
  qstate = qz.init(VARS, X)
  match = r"variables must be the model's variables, a dict with a 'params' entry"
  for call in (lambda: qz.init(VARS["params"], X), lambda: qz.apply(VARS["params"], qstate, X),
               lambda: qz.specs(VARS["params"], qstate),
               lambda: calibrate(qz, VARS["params"], qstate, [X])):
    with pytest.raises(ConfigError, match=match):
      call()


def test_nnx_state_instead_of_variables_of_is_one_line():
  model = NNXBlocks(rngs=nnx.Rngs(0))
  qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))])
  x = jnp.ones((2, 4))
  qstate = qz.init(variables_of(model), x)
  # nnx.state keeps the list index 0 an int; the quantizer reads variables_of's string keys
  with pytest.raises(ConfigError, match=r"^variables\['params'\] has no layers/0/kernel for the "
                     r"quantized layer 'layers/0'; .* variables_of\(module\)\)$"):
    qz.apply({"params": nnx.state(model, nnx.Param)}, qstate, x)


def test_frozen_variables_are_quantized_as_plain_dicts():
  # A FrozenDict (flax.core.freeze, older flax's model.init) used to select no layer at all
  qz = quantize(NET, [(".*", dict(weight_bits=4, act_bits=8))])
  frozen = flax.core.freeze(VARS)
  qstate = qz.init(frozen, X)
  assert [layer.path for layer in qstate.layers] == ["stem", "block/conv", "head"]
  got, _, _ = qz.apply(frozen, qstate, X)
  want, _, _ = qz.apply(VARS, qz.init(VARS, X), X)  # plain dicts: the NumPy-checked path
  np.testing.assert_array_equal(got, want)
  assert not np.allclose(got, NET.apply(VARS, X), atol=1e-3)


def test_a_sample_the_model_cannot_take_is_one_line():
  qz = quantize(NET, [(".*", dict(weight_bits=8, act_bits=8))])
  with pytest.raises(ConfigError, match=r"^quantizer init: Net's forward fails on inputs of "
                                        r"shape \(4, 6, 6, 5\) \(ScopeParamShapeError: "):
    qz.init(VARS, jnp.ones((4, 6, 6, 5)))


def test_bad_momentum_raises():
  with pytest.raises(ConfigError, match=r"act_momentum must be in \[0.0, 1.0\), got 1.0"):
    quantize(NET, act_momentum=1.0)


class Residual(nn.Module):
  @nn.compact
  def __call__(self, h):
    return h + nn.Dense(6, name="b")(nn.relu(nn.Dense(6, name="a")(h)))


class Remat(nn.Module):
  """in - remat(Residual) - out: the block's layers run inside jax.checkpoint."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="in")(x)
    return nn.Dense(3, name="out")(nn.remat(Residual)(name="block")(h))


class Scanned(nn.Module):
  """in - scan over 2 steps of Residual (stacked parameters) - out."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, name="in")(x)
    stack = nn.scan(lambda m, c, _: (m(c), None), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2)
    h, _ = stack(Residual(name="block"), h, None)
    return nn.Dense(3, name="out")(h)


def test_layers_inside_remat_are_quantized_from_their_own_inputs():
  """Init sees the inputs of layers run under nn.remat (the float forward by hand in NumPy)."""
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  model = Remat()
  variables = model.init(jax.random.key(0), x)
  qstate = quantize(model).init(variables, x)
  assert [l.path for l in qstate.layers] == ["in", "block/a", "block/b", "out"]
  assert [l.config.weight_bits for l in qstate.layers] == [8, 4, 4, 8]
  p = jax.tree.map(np.asarray, variables["params"])
  h = x @ p["in"]["kernel"] + p["in"]["bias"]
  a = np.maximum(h @ p["block"]["a"]["kernel"] + p["block"]["a"]["bias"], 0)
  for path, inputs in (("block/a", h), ("block/b", a)):
    np.testing.assert_allclose(qstate.ranges[path], [inputs.min(), inputs.max()], rtol=1e-6)


class _Tenfold(nn.Module):
  proj: nn.Module

  def __call__(self, h):
    return self.proj(10.0 * h)


class SharedInAndOutOfRemat(nn.Module):
  """One Dense called on x, and again under nn.remat on ten times its output."""

  def setup(self):
    self.proj = nn.Dense(5)
    self.block = nn.remat(_Tenfold)(self.proj)

  def __call__(self, x):
    return self.block(self.proj(x))


def test_calibration_covers_the_calls_of_a_layer_inside_and_outside_remat():
  # The jitted calibration cannot see the call under nn.remat; its range was the direct call's
  # alone ([-2.33, 1.30] where both calls' inputs span [-19.28, 16.56]).
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  model = SharedInAndOutOfRemat()
  variables = model.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, variables["params"]["proj"])
  both = np.concatenate([x.ravel(), 10.0 * (x @ p["kernel"] + p["bias"]).ravel()])
  qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))])
  qstate = calibrate(qz, variables, qz.init(variables, x), [x])
  np.testing.assert_allclose(qstate.ranges["proj"], [both.min(), both.max()], rtol=1e-6)


def test_scanned_layers_say_their_ranges_stay_calibrated_in_training():
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  model = Scanned()
  variables = model.init(jax.random.key(0), x)
  qz = quantize(model)
  qstate = qz.init(variables, x)
  with pytest.warns(UserWarning, match=r"input ranges of \['block/a', 'block/b'\] stay as "
                                       "calibrated"):
    _, _, new_q = jax.jit(lambda v, q, x: qz.apply(v, q, x, train=True))(variables, qstate,
                                                                       3 * x)
  np.testing.assert_array_equal(new_q.ranges["block/a"], qstate.ranges["block/a"])
  assert not np.allclose(new_q.ranges["in"], qstate.ranges["in"])  # outside the scan: updated


class _ScaledCell(nn.RNNCellBase):
  """A recurrent cell applying a Dense it is given to 10 x at every step."""
  proj: nn.Module

  @nn.compact
  def __call__(self, carry, x):
    h = jnp.tanh(self.proj(10.0 * x) + carry)
    return h, h

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape)

  @property
  def num_feature_axes(self):
    return 1


class SharedInAndOutOfScan(nn.Module):
  """One Dense called on x, and again inside the scan of an nn.RNN on ten times its output."""

  def setup(self):
    self.proj = nn.Dense(5)
    self.rnn = nn.RNN(_ScaledCell(self.proj))

  def __call__(self, x):
    return self.rnn(self.proj(x))


def test_a_layer_also_called_inside_a_scan_keeps_its_calibrated_range_in_training():
  # Only the call outside the scan reaches the training update: a moving average of its range
  # alone would shrink the range towards it and clip the larger inputs of the calls inside.
  x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
  model = SharedInAndOutOfScan()
  variables = model.init(jax.random.key(0), x)
  qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))])
  qstate = qz.init(variables, x)
  with pytest.warns(UserWarning, match=r"input ranges of \['proj'\] stay as calibrated"):
    _, _, new_q = jax.jit(lambda v, q, x: qz.apply(v, q, x, train=True))(variables, qstate, x)
  np.testing.assert_array_equal(new_q.ranges["proj"], qstate.ranges["proj"])
