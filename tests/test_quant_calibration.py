"""Range estimators: min-max, absmax, percentile, MSE-optimal clipping; moving averages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import ema_range, minmax_qparams, tensor_range
from jaxcompress.quantization.calibration import check_finite_range
from jaxcompress.quantization.fake_quant import fake_quant
from jaxcompress.quantization.qparams import qparams_from_range

X = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)


@pytest.mark.parametrize("axis", [None, 1])
def test_minmax_absmax_percentile_match_numpy(axis):
  axes = None if axis is None else 0
  keep = axis is not None
  lo, hi = tensor_range(X, method="minmax", axis=axis)
  np.testing.assert_allclose(lo, X.min(axis=axes, keepdims=keep))
  np.testing.assert_allclose(hi, X.max(axis=axes, keepdims=keep))
  lo, hi = tensor_range(X, method="absmax", axis=axis)
  np.testing.assert_allclose(hi, np.abs(X).max(axis=axes, keepdims=keep))
  np.testing.assert_allclose(lo, -np.abs(X).max(axis=axes, keepdims=keep))
  lo, hi = tensor_range(X, method="percentile", axis=axis, percentile=95)
  np.testing.assert_allclose(lo, np.percentile(X, 5, axis=axes, keepdims=keep), rtol=1e-5)
  np.testing.assert_allclose(hi, np.percentile(X, 95, axis=axes, keepdims=keep), rtol=1e-5)


def sq_error(x, lo, hi, bits, symmetric):
  qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
  scale, zp = qparams_from_range(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric)
  return float(jnp.sum((fake_quant(x, scale, zp, qmin=qmin, qmax=qmax) - x) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clipping_beats_minmax_with_an_outlier(symmetric):
  x = np.append(np.random.default_rng(1).standard_normal(1000), 12.0).astype(np.float32)
  lo, hi = tensor_range(x, method="mse", bits=4, symmetric=symmetric)
  mm_lo, mm_hi = tensor_range(x, method="minmax")
  assert float(hi) < 12.0  # the outlier is clipped
  assert sq_error(x, lo, hi, 4, symmetric) < 0.9 * sq_error(x, mm_lo, mm_hi, 4, symmetric)
  # Oracle: brute force over the same candidate ratios in Python.
  ratios = np.arange(1, 65) / 64
  errs = [sq_error(x, mm_lo * r, mm_hi * r, 4, symmetric) for r in ratios]
  np.testing.assert_allclose(hi, mm_hi * ratios[int(np.argmin(errs))], rtol=1e-6)


def test_mse_per_channel_shapes_and_ratio_at_most_one():
  lo, hi = tensor_range(X, method="mse", axis=1, bits=3, num_candidates=16)
  assert lo.shape == hi.shape == (1, 3)
  assert np.all(hi <= X.max(axis=0) + 1e-6) and np.all(lo >= X.min(axis=0) - 1e-6)



def with_x64(fn):
  """``fn()`` with ``jax_enable_x64`` on (restored after)."""
  jax.config.update("jax_enable_x64", True)
  try:
    return fn()
  finally:
    jax.config.update("jax_enable_x64", False)


def test_mse_range_is_float32_and_the_same_with_x64_on():
  # The search's carry started as float64 under x64: the range came back float64, lo * ratio
  # unrounded. Oracle: the min-max range times a candidate ratio k / 64, rounded to float32.
  x = np.append(np.random.default_rng(1).standard_normal(1000), 12.0).astype(np.float32)
  want = tensor_range(x, method="mse", bits=4, symmetric=True)
  got = with_x64(lambda: tensor_range(x, method="mse", bits=4, symmetric=True))
  assert [v.dtype for v in got] == [jnp.float32] * 2
  np.testing.assert_array_equal(got, want)
  k = round(float(got[1]) / float(x.max()) * 64)
  assert float(got[1]) == np.float32(x.max()) * np.float32(k / 64)



def test_percentile_range_is_the_same_with_x64_on():
  # The percentiles were asked for in float64 under x64: another interpolation than with x64 off.
  x = np.random.default_rng(2).standard_normal(1152).astype(np.float32)
  want = tensor_range(x, method="percentile")
  got = with_x64(lambda: tensor_range(x, method="percentile"))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got, np.percentile(x, [0.01, 99.99]), rtol=1e-5)


def test_ema_range_formula():
  np.testing.assert_allclose(ema_range(jnp.array([-1.0, 1.0]), jnp.array([-3.0, 5.0]), 0.9),
                             [-1.2, 1.4], rtol=1e-6)


@pytest.mark.parametrize("momentum, match", [
    (1.5, r"^momentum must be in \[0.0, 1.0\), got 1.5$"),
    (-0.1, r"^momentum must be in \[0.0, 1.0\), got -0.1$"),
    (1.0, r"^momentum must be in \[0.0, 1.0\), got 1.0$"),
    (np.nan, r"^momentum must be in \[0.0, 1.0\), got nan$"),
    ("0.9", r"^momentum must be a number in \[0.0, 1.0\), got '0.9'$")])
def test_a_momentum_outside_0_1_is_one_line(momentum, match):
  # 1.5 * -1 + (1 - 1.5) * -3 = 0: the "average" of two negative minima is 0, outside both.
  with pytest.raises(ConfigError, match=match):
    ema_range(jnp.array([-1.0, 1.0]), jnp.array([-3.0, 5.0]), momentum)


def test_a_traced_momentum_averages_inside_jit():
  got = jax.jit(ema_range)(jnp.array([-1.0, 1.0]), jnp.array([-3.0, 5.0]), jnp.float32(0.9))
  np.testing.assert_allclose(got, [0.9 * -1 + 0.1 * -3, 0.9 * 1 + 0.1 * 5], rtol=1e-6)


def test_ema_range_keeps_float32_ranges_float32_with_x64_on():
  # A NumPy float64 momentum is no weak type: under x64 the product was float64, and the range
  # came back float64, unrounded. Oracle: the same average in float32 NumPy arithmetic.
  old = np.array([-1.1, 1.3], np.float32)
  new = np.array([-3.7, 5.9], np.float32)
  got = with_x64(lambda: ema_range(jnp.asarray(old), jnp.asarray(new), np.float64(0.9)))
  assert got.dtype == jnp.float32
  m = np.float32(0.9)
  np.testing.assert_array_equal(got, m * old + (np.float32(1) - m) * new)


def test_calibrated_range_feeds_qparams():
  lo, hi = tensor_range(X, method="minmax")
  want = minmax_qparams(X, bits=8)
  got = qparams_from_range(lo, hi, qmin=0, qmax=255, symmetric=False)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_mse_takes_a_numpy_integer_count_of_candidates():
  # np.int64(16) (a count from NumPy or a config) was refused as "no positive integer".
  # Oracle: the same search with the Python int.
  want = tensor_range(X, method="mse", bits=3, num_candidates=16)
  got = tensor_range(X, method="mse", bits=3, num_candidates=np.int64(16))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n, match", [(0, r">= 1, got 0$"), (2.5, r"an integer >= 1, got 2.5$"),
                                      (True, r">= 1, got True$")])
def test_a_count_of_candidates_below_one_or_fractional_is_one_line(n, match):
  with pytest.raises(ConfigError, match=r"^num_candidates must be " + match):
    tensor_range(X, method="mse", num_candidates=n)


def test_unknown_method_raises():
  with pytest.raises(ConfigError, match=r"method must be one of absmax, minmax, mse, percentile, "
                                        r"got 'kl'"):
    tensor_range(X, method="kl")


@pytest.mark.parametrize("p", [50, 100.5])
def test_bad_percentile_raises(p):
  with pytest.raises(ConfigError, match=rf"percentile must be in \(50, 100\], got {p}"):
    tensor_range(X, method="percentile", percentile=p)


def test_axis_out_of_range_raises():
  with pytest.raises(ConfigError, match=r"axis must be None, an integer in \[-2, 2\) or a tuple"):
    tensor_range(X, method="minmax", axis=2)


@pytest.mark.parametrize("lo,hi", [(np.nan, 1.0), (0.0, np.inf), (2.0, 1.0)])
def test_non_finite_or_inverted_range_raises(lo, hi):
  with pytest.raises(ConfigError, match=r"act range of conv1 must"):
    check_finite_range("act range of conv1", jnp.float32(lo), jnp.float32(hi))


def test_nan_input_gives_nan_range_that_is_caught():
  lo, hi = tensor_range(np.array([1.0, np.nan], np.float32), method="minmax")
  with pytest.raises(ConfigError, match="must be finite"):
    check_finite_range("range", lo, hi)
