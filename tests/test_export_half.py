"""Float16 scales and folds (``QuantSpec.scale_dtype``): exact agreement, bytes by hand, rounding
against NumPy, bad input."""

from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import compose, quantization
from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, load, read_spec
from jaxcompress.models import CharGPT
from jaxcompress.precision import to_half
from test_export_artifact import EPS, X8, ConvBN
from test_export_runtime import random_variables


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """ConvBN with 4-bit inner weights, exported with float32 and with float16 side arrays."""
  model = ConvBN()
  variables = random_variables(model, (8, 8, 3))
  out = {}
  for dtype in ("float32", "float16"):
    comp = compose.build(model, variables, X8[:8], optimizer=optax.sgd(0.1), total_steps=1,
                         quant=compose.QuantSpec(weight_bits=4, act_bits=8, scale_dtype=dtype))
    state = comp.init_state(variables, X8[:8], calibration=[X8[:32]])
    path = str(tmp_path_factory.mktemp(dtype) / "export")
    report = comp.export(path, state, input_shape=(8, 8, 3))
    out[dtype] = dict(comp=comp, state=state, path=path, report=report,
                      loaded=load(path, model), spec=read_spec(path))
  out["variables"] = variables
  return out


def test_the_float16_artifact_reproduces_the_evaluated_logits_exactly(exports):
  half = exports["float16"]
  comp, state = half["comp"], half["state"]
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), X8))
  np.testing.assert_array_equal(np.asarray(half["loaded"].logits(X8)), want)
  # The evaluation does see the rounding: the float32 model's logits differ.
  full = exports["float32"]
  other = np.asarray(jax.jit(full["comp"].logits_fn)(full["comp"].eval_variables(full["state"]),
                                                     X8))
  assert not np.array_equal(other, want)
  np.testing.assert_allclose(other, want, atol=1e-2 * np.abs(want).max())


def test_scales_and_folds_take_two_bytes_per_value(exports):
  layers = {m["path"]: m for m in exports["float16"]["spec"]["layers"]}
  # Every quantized kernel has one scale per output channel, its last axis.
  for path, channels in (("stem", 8), ("body", 16), ("head", 10)):
    meta = layers[f"params/{path}/kernel"]
    assert meta["scale_bits"] == 16 and meta["segments"]["scale"] == 2 * channels
  # norm_a and norm_b give their gains to the bias-free convs and store a bias; the biased head
  # keeps norm_c's gain: [gain; bias].
  for path, entries in (("norm_a", 8), ("norm_b", 16), ("norm_c", 20)):
    meta = layers[f"fold/{path}"]
    assert meta["bits"] == 16 and meta["segments"]["values"] == 2 * entries
  # By hand: 34 scales and 44 fold entries, 2 bytes less each than in float32.
  saved = exports["float32"]["report"]["arrays_raw_bytes"] - \
      exports["float16"]["report"]["arrays_raw_bytes"]
  assert saved == 2 * (8 + 16 + 10) + 2 * (8 + 16 + 20)


def test_stored_values_are_the_float16_rounding_of_the_numpy_fold(exports):
  """NumPy oracle: gain = scale / sqrt(var + eps), bias = beta - mean * gain, kernel scales
  max|w| / 7.5 per channel (4 bits, codes -8..7, PyTorch's symmetric min-max) times the gain
  moved into them."""
  v = exports["variables"]
  tensors = exports["float16"]["loaded"].finalized.tensors
  params, stats = v["params"], v["batch_stats"]

  def gain_bias(norm):
    g = params[norm]["scale"] / np.sqrt(stats[norm]["var"] + EPS)
    return g, params[norm]["bias"] - stats[norm]["mean"] * g

  g_c, b_c = gain_bias("norm_c")
  np.testing.assert_allclose(tensors["fold/norm_c"].codes, np.stack([g_c, b_c]), rtol=1e-3,
                             atol=1e-6)
  g_b, b_b = gain_bias("norm_b")
  np.testing.assert_allclose(tensors["fold/norm_b"].codes[0], b_b, rtol=1e-3, atol=1e-6)
  kernel = np.asarray(params["body"]["kernel"])
  step = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(0) / 7.5
  np.testing.assert_allclose(tensors["params/body/kernel"].scale, step * g_b, rtol=2e-3)
  for t in (tensors["fold/norm_c"].codes, tensors["params/body/kernel"].scale):
    np.testing.assert_array_equal(np.asarray(t, np.float16).astype(np.float32), t)


def test_to_half_rounds_to_nearest_and_saturates():
  x = np.array([1 / 3, 1e6, -1e6, 1e-9, 2049.0, 2051.0], np.float32)
  np.testing.assert_array_equal(np.asarray(to_half(x)),
                                [np.float16(1 / 3), 65504, -65504, 0, 2048, 2052])


def test_bad_scale_dtype_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"quant.scale_dtype.*float16"):
    compose.QuantSpec(weight_bits=4, scale_dtype="bfloat16")
  with pytest.raises(ConfigError, match="scale_dtype"):
    export_model(str(tmp_path), variables={"params": {"w": np.ones(3, np.float32)}},
                 input_shape=(3,), scale_dtype="float8")
  assert not os.listdir(tmp_path)


def test_a_spec_with_other_scale_bits_is_refused(exports, tmp_path):
  src = exports["float16"]["path"]
  spec = read_spec(src)
  meta = next(m for m in spec["layers"] if m["path"] == "params/body/kernel")
  meta["scale_bits"] = 8
  os.makedirs(tmp_path / "bad")
  with open(tmp_path / "bad" / "spec.json.gz", "wb") as f:
    f.write(gzip.compress(json.dumps(spec).encode()))
  with open(os.path.join(src, "arrays.bin"), "rb") as f:
    (tmp_path / "bad" / "arrays.bin").write_bytes(f.read())
  with pytest.raises(ConfigError, match="scale_bits is 16 or 32"):
    load(str(tmp_path / "bad"), ConvBN())


def test_a_transformer_without_batchnorms_halves_its_scales_exactly(tmp_path):
  """CharGPT: every Dense/DenseGeneral kernel has its channels last and gets float16 scales; the
  embedding's channels are its rows (axis 0, moved last in storage) and keep float32."""
  model = CharGPT(vocab_size=13, context=8, width=16, depth=1, heads=2, mlp_ratio=2)
  ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 13, jnp.int32)
  variables = model.init(jax.random.key(0), ids)
  comp = compose.build(model, variables, ids, optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=4, act_bits=8, scale_dtype="float16"))
  state = comp.init_state(variables, ids, calibration=[ids])
  comp.export(str(tmp_path), state, input_shape=(8,), input_dtype="int32")
  want = np.asarray(jax.jit(comp.logits_fn)(comp.eval_variables(state), ids))
  np.testing.assert_array_equal(np.asarray(load(str(tmp_path), model).logits(ids)), want)
  scale_bits = {m["path"]: m.get("scale_bits", 32) for m in read_spec(str(tmp_path))["layers"]
                if m["kind"] == "int"}
  embed = [p for p in scale_bits if "embed" in p]
  assert embed and all(scale_bits[p] == 32 for p in embed)
  assert len(scale_bits) > len(embed) + 4
  assert all(b == 16 for p, b in scale_bits.items() if p not in embed)


@pytest.mark.parametrize("axis, ndim, expected", [
    (3, 4, True), (-1, 4, True), (1, 2, True), (0, 2, False), (2, 4, False), (None, 4, False)])
def test_gains_go_into_per_output_channel_scales_only(axis, ndim, expected):
  assert quantization.channels_last(axis, ndim) is expected


@pytest.mark.parametrize("axis, ndim, expected", [
    (3, 4, True), ((1, 2), 3, True), ((0, 2), 3, True), ((0, 1), 3, False), (0, 2, False),
    (None, 4, False)])
def test_float16_scales_go_to_scales_along_the_last_axis(axis, ndim, expected):
  assert quantization.half_scaled(axis, ndim) is expected


@pytest.mark.parametrize("axis", [5, -3, (0, 2), (1, -1), 1.0, True])
def test_a_scale_axis_the_weight_does_not_have_is_one_line(axis):
  # A 2-d weight has axes 0 and 1 (NumPy: np.moveaxis(w, 5, -1) raises); 5 % 2 = 1 and
  # -3 % 2 = 1 passed as the last axis, and (1, -1) as the last axis twice.
  with pytest.raises(np.exceptions.AxisError):
    np.moveaxis(np.zeros((3, 4)), 5, -1)
  with pytest.raises(ConfigError, match=r"^weight_axis must be None, an axis in \[-2, 2\) or a "
                                        r"tuple of distinct ones for a 2-d weight, got "):
    quantization.scale_axes(axis, 2)
  with pytest.raises(ConfigError, match=r"^weight_axis must be "):
    quantization.channels_last(axis, 2)
