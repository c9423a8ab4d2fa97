"""calibrate(): post-training input ranges against NumPy statistics of the layers' inputs."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import calibrate, quantize


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(6, name="fc1")(x)))


RNG = np.random.default_rng(0)
BATCHES = [RNG.standard_normal((16, 4)).astype(np.float32) * (1 + i) for i in range(3)]
MODEL = MLP()
VARS = MODEL.init(jax.random.key(0), BATCHES[0])
QZ = quantize(MODEL, [(".*", dict(weight_bits=8, act_bits=8))], train_kwarg=None)
QSTATE = QZ.init(VARS, BATCHES[0][:2])


def hidden(x):
  """Oracle: the float input of fc2."""
  p = jax.tree.map(np.asarray, VARS["params"])
  return np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)


def test_minmax_is_the_overall_range_of_each_layer_input():
  qstate = calibrate(QZ, VARS, QSTATE, BATCHES, method="minmax")
  xs = np.concatenate(BATCHES)
  np.testing.assert_allclose(qstate.ranges["fc1"], [xs.min(), xs.max()], rtol=1e-6)
  np.testing.assert_allclose(qstate.ranges["fc2"], [hidden(xs).min(), hidden(xs).max()], rtol=1e-5)
  assert qstate.layers == QSTATE.layers


def test_calibration_shows_a_bar_of_its_batches(capsys):
  # 3 batches of a list: a bar of 3, in batches (drawn at the start where stderr is not a
  # terminal, cleared at the end).
  calibrate(QZ, VARS, QSTATE, BATCHES, method="minmax")
  drawn = re.findall(r"calibrate: .*?(\d+)/(\d+) .*?batch/s", capsys.readouterr().err)
  assert drawn[0] == ("0", "3")


def test_percentile_is_the_mean_of_batch_percentiles():
  qstate = calibrate(QZ, VARS, QSTATE, iter(BATCHES), method="percentile", percentile=90)
  want = np.mean([[np.percentile(b, 10), np.percentile(b, 90)] for b in BATCHES], axis=0)
  np.testing.assert_allclose(qstate.ranges["fc1"], want, rtol=1e-5)


def test_ema_is_a_moving_average_from_the_first_batch():
  qstate = calibrate(QZ, VARS, QSTATE, BATCHES, method="ema", momentum=0.5)
  want = np.array([BATCHES[0].min(), BATCHES[0].max()])
  for b in BATCHES[1:]:
    want = 0.5 * want + 0.5 * np.array([b.min(), b.max()])
  np.testing.assert_allclose(qstate.ranges["fc1"], want, rtol=1e-5)


def test_mse_clips_inside_the_minmax_range():
  qstate = calibrate(QZ, VARS, QSTATE, BATCHES, method="mse")
  mm = calibrate(QZ, VARS, QSTATE, BATCHES, method="minmax")
  for path in ("fc1", "fc2"):
    lo, hi = np.asarray(qstate.ranges[path])
    assert mm.ranges[path][0] <= lo <= 0 <= hi <= mm.ranges[path][1]


def test_calibrated_int8_model_is_close_to_float_and_beats_int4():
  x = jnp.asarray(BATCHES[1])
  want = MODEL.apply(VARS, x)
  errors = {}
  for bits in (8, 4):
    qz = quantize(MODEL, [(".*", dict(weight_bits=bits, act_bits=bits))], train_kwarg=None)
    qstate = calibrate(qz, VARS, qz.init(VARS, x), BATCHES)
    errors[bits] = float(jnp.max(jnp.abs(qz.apply(VARS, qstate, x)[0] - want)))
  assert errors[8] < 0.05 * float(jnp.max(jnp.abs(want)))
  assert errors[8] < errors[4] / 4, errors


def test_unknown_method_raises():
  with pytest.raises(ConfigError, match=r"calibration.method must be one of ema, minmax, mse, "
                                        r"percentile, got 'entropy'"):
    calibrate(QZ, VARS, QSTATE, BATCHES, method="entropy")


def test_no_batches_raises():
  with pytest.raises(ConfigError, match="calibration batches must hold at least one batch"):
    calibrate(QZ, VARS, QSTATE, [])


def test_nan_in_batches_raises_naming_the_batch():
  """The NaN sits in batch 1 (one value): named so even when the first layer stays float and
  the NaN shows first in a later layer's range."""
  bad = BATCHES[0].copy()
  bad[3, 1] = np.nan
  with pytest.raises(ConfigError, match=r"^calibration batch 1 holds 1 NaN/Inf value\(s\); "):
    calibrate(QZ, VARS, QSTATE, [BATCHES[1], bad])
  qz = quantize(MODEL, [("fc2", dict(weight_bits=8, act_bits=8))], train_kwarg=None)
  with pytest.raises(ConfigError, match=r"^calibration batch 0 holds 1 NaN/Inf value\(s\); "):
    calibrate(qz, VARS, qz.init(VARS, BATCHES[0]), [bad])


def test_nan_weights_raise_naming_the_layer_whose_input_is_nan():
  variables = jax.tree.map(np.array, VARS)
  variables["params"]["fc1"]["kernel"][0, 0] = np.nan  # fc1's output, fc2's input
  with pytest.raises(ConfigError, match=r"^calibrated activation range of fc2 must be finite"):
    calibrate(QZ, variables, QSTATE, BATCHES)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="percentile", percentile=40), r"calibration.percentile must be in \(50, 100\]"),
    (dict(method="ema", momentum=1.5), r"calibration.momentum must be in \[0.0, 1.0\), got 1.5"),
])
def test_bad_parameters_raise(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    calibrate(QZ, VARS, QSTATE, BATCHES, **kwargs)


class RematMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.remat(nn.Dense)(6, name="fc1")(x))  # under jax.checkpoint
    return nn.Dense(3, name="fc2")(h)


def test_layers_under_remat_are_calibrated_on_the_batches():
  """The inputs of fc2 come out of a remat'd layer, fc1's are the batches themselves: both
  ranges are the NumPy min/max over every batch, not the init sample's."""
  model = RematMLP()
  variables = model.init(jax.random.key(0), BATCHES[0])
  qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))], train_kwarg=None)
  qstate = calibrate(qz, variables, qz.init(variables, 0.01 * BATCHES[0]), BATCHES,
                     method="minmax")
  p = jax.tree.map(np.asarray, variables["params"])
  x = np.concatenate(BATCHES)
  h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  np.testing.assert_allclose(qstate.ranges["fc1"], [x.min(), x.max()], rtol=1e-6)
  np.testing.assert_allclose(qstate.ranges["fc2"], [h.min(), h.max()], rtol=1e-5)


def test_batches_the_model_cannot_take_are_one_line():
  qstate = QZ.init(VARS, BATCHES[0])
  with pytest.raises(ConfigError, match=r"^calibration batches must be a sequence of input "
                                        r"batches, got 'one array of shape \(16, 4\)'; "
                                        r"pass \[x\]$"):
    calibrate(QZ, VARS, qstate, BATCHES[0])
  with pytest.raises(ConfigError, match=r"^calibration batch 1: the model fails on inputs of "
                                        r"shape \(16, 5\) \(.*\); give batches shaped like"):
    calibrate(QZ, VARS, qstate, [BATCHES[0], np.ones((16, 5), np.float32)])
