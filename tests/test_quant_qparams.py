"""minmax_qparams / qrange / qparams_from_range against PyTorch's MinMaxObserver formulas."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import (lsq_init_step, minmax_qparams, qparams_from_range, qrange,
                                      tensor_range)

EPS = np.finfo(np.float32).eps


def np_observer(x, bits, axis, symmetric):
  """Oracle: torch.ao.quantization.MinMaxObserver._calculate_qparams, re-derived in NumPy."""
  kept = () if axis is None else [a % x.ndim for a in np.atleast_1d(axis)]
  axes = None if axis is None else tuple(i for i in range(x.ndim) if i not in kept)
  keep = axis is not None
  lo = np.minimum(x.min(axis=axes, keepdims=keep), 0)
  hi = np.maximum(x.max(axis=axes, keepdims=keep), 0)
  if symmetric:
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    scale = np.maximum(np.maximum(-lo, hi) / ((qmax - qmin) / 2), EPS)
    return scale, np.zeros_like(scale, np.int64), qmin, qmax
  qmin, qmax = 0, 2 ** bits - 1
  scale = np.maximum((hi - lo) / (qmax - qmin), EPS)
  return scale, np.clip(qmin - np.round(lo / scale), qmin, qmax), qmin, qmax


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 2, -1, (0, 2), (1, -1)])
def test_matches_minmax_observer(bits, symmetric, axis):
  x = (np.random.default_rng(bits).standard_normal((4, 3, 5)) * 2 + 0.5).astype(np.float32)
  scale, zp, qmin, qmax = minmax_qparams(x, bits=bits, axis=axis, symmetric=symmetric)
  want = np_observer(x, bits, axis, symmetric)
  np.testing.assert_allclose(scale, want[0], rtol=1e-6)
  np.testing.assert_array_equal(zp, want[1])
  assert (qmin, qmax) == want[2:]
  assert scale.shape == want[0].shape  # keepdims: broadcastable against x per channel
  assert zp.dtype == jnp.int32


def test_hand_computed_asymmetric_and_symmetric():
  x = jnp.array([-1.0, 3.0])
  scale, zp, qmin, qmax = minmax_qparams(x, bits=8)
  assert (qmin, qmax, int(zp)) == (0, 255, 64)  # round(0 - (-1) / (4 / 255)) = round(63.75)
  np.testing.assert_allclose(scale, 4 / 255, rtol=1e-6)
  scale, zp, qmin, qmax = minmax_qparams(x, bits=4, symmetric=True)
  assert (qmin, qmax, int(zp)) == (-8, 7, 0)
  np.testing.assert_allclose(scale, 3 / 7.5, rtol=1e-6)


def test_range_always_includes_zero():
  scale, zp, _, _ = minmax_qparams(jnp.array([2.0, 5.0]), bits=8)
  assert int(zp) == 0  # min is widened to 0
  np.testing.assert_allclose(scale, 5 / 255, rtol=1e-6)
  scale, zp, _, qmax = minmax_qparams(jnp.array([-5.0, -2.0]), bits=8)
  assert int(zp) == qmax  # max is widened to 0


def test_all_zero_tensor_gets_epsilon_scale():
  scale, zp, _, _ = minmax_qparams(jnp.zeros((3, 2)), bits=4, axis=1)
  np.testing.assert_array_equal(scale, np.full((1, 2), EPS, np.float32))
  np.testing.assert_array_equal(zp, np.zeros((1, 2)))


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "8"])
def test_bits_outside_2_to_8_raise(bits):
  with pytest.raises(ConfigError, match=r"bits must be an integer in \[2, 8\], got "):
    minmax_qparams(jnp.ones(3), bits=bits)


@pytest.mark.parametrize("axis", [3, -4, 1.0, (0, 3), (0, -3), ()])
def test_axis_out_of_range_raises(axis):
  with pytest.raises(ConfigError, match=r"axis must be None, an integer in \[-3, 3\) or a tuple "
                                        r"of distinct ones for a 3-d array, got "):
    minmax_qparams(jnp.ones((2, 2, 2)), bits=8, axis=axis)


def test_qrange_traced_bits_equal_static():
  traced = jax.jit(lambda b: jnp.stack([*qrange(b, True), *qrange(b, False)]))
  for bits in range(2, 9):
    np.testing.assert_array_equal(traced(bits), [*qrange(bits, True), *qrange(bits, False)])
  assert qrange(8, True) == (-128, 127) and qrange(2, False) == (0, 3)


def test_qparams_from_range_per_channel_broadcasts():
  lo, hi = jnp.array([[-1.0, 0.0]]), jnp.array([[3.0, 2.0]])
  scale, zp = qparams_from_range(lo, hi, qmin=0, qmax=255, symmetric=False)
  np.testing.assert_allclose(scale, [[4 / 255, 2 / 255]], rtol=1e-6)
  np.testing.assert_array_equal(zp, [[64, 0]])


@pytest.mark.parametrize("qmin, qmax", [(5, 5), (5, 0), (0, np.nan)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_qparams_from_range_refuses_a_grid_without_codes(qmin, qmax, symmetric):
  # (hi - lo) / (qmax - qmin) = 2 / 0 raised ZeroDivisionError, 2 / -5 < 0 came back as the
  # floor EPS (a scale for no grid), and a NaN code gave a NaN scale: no positive scale maps
  # [-1, 1] onto codes qmin..qmax unless qmin < qmax.
  with pytest.raises(ConfigError, match=rf"^qmin must be < qmax, got qmin={qmin}, "
                                        rf"qmax={qmax}; use qparams.qrange"):
    qparams_from_range(-1.0, 1.0, qmin=qmin, qmax=qmax, symmetric=symmetric)


@pytest.mark.parametrize("shape, axis", [((0,), None), ((0, 3), 1), ((3, 0), 0)])
def test_an_empty_tensor_has_no_range_or_step(shape, axis):
  # NumPy has no minimum of no values (ValueError) and their mean is NaN: minmax_qparams and
  # tensor_range died with tracebacks, lsq_init_step returned a NaN step.
  x = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match="zero-size array"):
    np.min(x)
  with pytest.warns(RuntimeWarning, match="Mean of empty slice"), np.errstate(invalid="ignore"):
    assert np.isnan(np.mean(np.abs(x)))
  for name, fn in (("minmax_qparams", lambda: minmax_qparams(x, bits=8, axis=axis)),
                   ("tensor_range", lambda: tensor_range(x, axis=axis)),
                   ("tensor_range", lambda: tensor_range(x, method="percentile", axis=axis)),
                   ("lsq_init_step", lambda: lsq_init_step(x, qmax=7, axis=axis))):
    with pytest.raises(ConfigError, match=rf"^{name}: the tensor is empty \(shape "
                                          rf"{re.escape(str(shape))}\); a range or a step"):
      fn()


def test_qparams_from_range_refuses_an_inverted_range():
  # Channel 1, [1, -1], holds no value: widened to [0, 0] it gave scale = eps, every x clipped.
  with pytest.raises(ConfigError, match=r"^qparams_from_range needs lo <= hi, got lo=\[0.0, 1.0\], "
                                        r"hi=\[2.0, -1.0\]; "):
    qparams_from_range(np.array([0.0, 1.0]), np.array([2.0, -1.0]), qmin=0, qmax=255,
                       symmetric=False)


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_is_the_same_for_static_and_traced_bits(symmetric):
  # A bit schedule traces ``bits``; an export computes the scale with a static ``bits``. Both
  # must give the same float32 scale to the last bit, and so must eager NumPy-style code.
  # Per-tensor ranges (scalars), where XLA divided when ``bits`` was traced and multiplied by
  # the reciprocal when it was static, and per-channel ranges (arrays).
  rng = np.random.default_rng(0)
  lo = -rng.uniform(0.01, 3.0, 200).astype(np.float32)
  hi = rng.uniform(0.01, 3.0, 200).astype(np.float32)

  def scale(lo, hi, bits):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    return qparams_from_range(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric)[0]

  traced = jax.jit(scale)
  for bits in range(2, 9):
    static_fn = jax.jit(functools.partial(scale, bits=bits))
    static = static_fn(lo, hi)
    np.testing.assert_array_equal(static, traced(lo, hi, jnp.int32(bits)))
    per_tensor = [(static_fn(a, b), traced(a, b, jnp.int32(bits))) for a, b in zip(lo, hi)]
    np.testing.assert_array_equal(*np.array(per_tensor).T)
    np.testing.assert_array_equal(static, np.array(per_tensor)[:, 0])
    width = np.float32((2 ** bits - 1) / (2 if symmetric else 1))
    top = np.maximum(-lo, hi) if symmetric else hi - lo
    np.testing.assert_array_equal(static, top * (np.float32(1) / width))


@pytest.mark.parametrize("symmetric", [True, False])
def test_numpy_int64_bounds_give_a_float32_scale_with_x64_on(symmetric):
  # Under x64, 1 / (qmax - qmin) of NumPy int64s was a float64 that made the scale float64.
  qmin, qmax = (np.int64(-128), np.int64(127)) if symmetric else (np.int64(0), np.int64(255))
  jax.config.update("jax_enable_x64", True)
  try:
    scale, zero_point = qparams_from_range(-1.0, 3.0, qmin=qmin, qmax=qmax, symmetric=symmetric)
  finally:
    jax.config.update("jax_enable_x64", False)
  width = np.float32(6.0 if symmetric else 4.0)  # 2 * max|x| on the signed grid, else max - min
  assert scale.dtype == jnp.float32 and zero_point.dtype == jnp.int32
  assert float(scale) == width * np.float32(1 / 255)
