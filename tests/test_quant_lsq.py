"""LSQ: forward, and gradients w.r.t. input and step against the paper's formula in NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import fake_quant, lsq_fake_quant, lsq_grad_scale, lsq_init_step


def np_lsq(x, step, qmin, qmax, g, upstream, axes):
  """Oracle, Esser et al. 2019 eq. 1-3: forward, dL/dx, dL/ds (summed over the step's values)."""
  v = x / step
  out = np.round(np.clip(v, qmin, qmax)) * step
  inside = (v > qmin) & (v < qmax)
  ds = np.where(inside, -v + np.round(v), np.where(v <= qmin, qmin, qmax)) * g
  dstep = np.sum(upstream * ds, axis=axes, keepdims=axes is not None)
  return out, upstream * inside, dstep


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (4, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_and_gradients_match_paper(bits, signed, per_channel):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((6, 4)).astype(np.float32)
  qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  step = (rng.uniform(0.5, 1.5, (1, 4)) if per_channel else np.array(0.9)) * 2.5 / qmax
  step = step.astype(np.float32)
  upstream = rng.standard_normal(x.shape).astype(np.float32)
  n = 6 if per_channel else 24
  g = 1 / np.sqrt(n * qmax)  # paper's gradient scale, the function's default
  axes = (0,) if per_channel else None
  want_out, want_dx, want_ds = np_lsq(x, step, qmin, qmax, g, upstream, axes)

  loss = lambda v, s: jnp.sum(lsq_fake_quant(v, s, qmin=qmin, qmax=qmax) * upstream)
  dx, ds = jax.grad(loss, argnums=(0, 1))(x, step)
  np.testing.assert_allclose(lsq_fake_quant(x, step, qmin=qmin, qmax=qmax), want_out, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_array_equal(dx, want_dx)
  np.testing.assert_allclose(ds, want_ds, rtol=1e-5, atol=1e-6)
  assert ds.shape == step.shape


def test_hand_computed_step_gradient():
  # s = 0.5, Q_N = 8, Q_P = 7, g = 1: x = 0.7 -> v = 1.4 -> -1.4 + 1 = -0.4;
  # x = 10 -> above: Q_P = 7; x = -10 -> below: -Q_N = -8.
  x = jnp.array([0.7, 10.0, -10.0])
  ds = jax.grad(lambda s: lsq_fake_quant(x, s, qmin=-8, qmax=7, grad_scale=1.0).sum())(0.5)
  np.testing.assert_allclose(ds, -0.4 + 7 - 8, rtol=1e-6)


def test_gradients_on_the_bounds_are_the_papers():
  # s = 0.5: x = 3.5 -> v = Q_P = 7 and x = -4 -> v = -Q_N = -8, exactly on the bounds: the
  # output is s * Q_P (s * -Q_N) on both sides, so d/ds = 7 (-8) and d/dx = 0 (paper, eq. 3).
  x = jnp.array([3.5, -4.0])
  dx, ds = jax.grad(lambda v, s: lsq_fake_quant(v, s, qmin=-8, qmax=7, grad_scale=1.0).sum(),
                    argnums=(0, 1))(x, 0.5)
  np.testing.assert_array_equal(dx, [0.0, 0.0])
  np.testing.assert_allclose(ds, 7 - 8, rtol=1e-6)
  h = 1e-3  # finite differences of the forward in s agree
  f = lambda s: float(lsq_fake_quant(x[:1], s, qmin=-8, qmax=7).sum())
  np.testing.assert_allclose((f(0.5 + h) - f(0.5 - h)) / (2 * h), 7.0, rtol=1e-3)


def test_second_derivative_in_x_is_straight_through():
  # s = 0.5: v = -9.2 (below), 0.6, 7.2 (above): d/dx sum(q^2) = 2 q * inside, Hessian
  # diag(2 * inside), not the 0 of jnp.round.
  x = jnp.array([-4.6, 0.3, 3.6])
  h = jax.hessian(lambda v: jnp.sum(lsq_fake_quant(v, 0.5, qmin=-8, qmax=7) ** 2))(x)
  np.testing.assert_array_equal(h, np.diag([0.0, 2.0, 0.0]))


def test_forward_equals_fake_quant_with_zero_point_zero():
  x = jnp.linspace(-3, 3, 41)
  np.testing.assert_array_equal(lsq_fake_quant(x, 0.3, qmin=-4, qmax=3),
                                fake_quant(x, 0.3, 0, qmin=-4, qmax=3))


def test_paper_init_and_grad_scale():
  w = jnp.array([[1.0, -2.0], [3.0, 0.0]])
  np.testing.assert_allclose(lsq_init_step(w, qmax=7), 2 * 1.5 / np.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(lsq_init_step(w, qmax=7, axis=1),
                             [[2 * 2 / np.sqrt(7), 2 * 1 / np.sqrt(7)]], rtol=1e-6)
  np.testing.assert_allclose(lsq_grad_scale(100, 7), 1 / np.sqrt(700), rtol=1e-6)



def test_init_step_is_float32_for_a_numpy_qmax_with_x64_on():
  # sqrt of a NumPy int64 Q_P is float64 under x64: the step came back float64.
  w = np.array([[1.0, -2.0], [3.0, 0.0]], np.float32)
  jax.config.update("jax_enable_x64", True)
  try:
    step = lsq_init_step(w, qmax=np.int64(7))
  finally:
    jax.config.update("jax_enable_x64", False)
  assert step.dtype == jnp.float32
  assert float(step) == np.float32(2.0) * np.float32(1.5) / np.sqrt(np.float32(7))


def test_learning_the_step_reduces_quantization_error():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(512), jnp.float32)
  err = jax.jit(lambda s: jnp.mean((lsq_fake_quant(x, s, qmin=-2, qmax=1) - x) ** 2))
  step = jnp.float32(0.05)  # far too small: most values clip
  first = err(step)
  grad = jax.jit(jax.grad(err))
  for _ in range(50):  # a rate that descends (x 512 overshot to a step of 25 and wandered)
    step = step - 2.0 * grad(step)
  assert err(step) < 0.25 * first  # 0.16 of it at step 1.10


@pytest.mark.parametrize("step", [0.0, -1.0])
def test_non_positive_step_raises(step):
  with pytest.raises(ConfigError, match=r"step must be finite and > 0 everywhere, got -?[01]\.0"):
    lsq_fake_quant(jnp.ones(3), step, qmin=-8, qmax=7)


def test_a_step_for_no_positive_code_is_refused():
  with pytest.raises(ConfigError, match=r"^qmax must be an integer > 0 \(the largest code"):
    lsq_init_step(np.ones(3, np.float32), qmax=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=jnp.full((3,), 0.1)), r"step must be a scalar or an array broadcastable against "
                                     r"x of shape \(4, 5\)"),
    (dict(step=0.1, grad_scale=-1.0), r"grad_scale must be finite and > 0"),
    # an infinite scale made the step's gradient inf (and NaN where its slope is 0)
    (dict(step=0.1, grad_scale=np.inf), r"grad_scale must be finite and > 0 .*, got inf$"),
    (dict(step=0.0), r"step must be finite and > 0 everywhere, got 0.0; lsq_init_step gives")])
def test_a_step_or_gradient_scale_that_cannot_be_is_one_line(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    lsq_fake_quant(jnp.ones((4, 5)), qmin=-8, qmax=7, **kwargs)


@pytest.mark.parametrize("n, qmax, match", [
    (0, 7, r"^n must be >= 1, got 0$"), (-3, 7, r"^n must be >= 1, got -3$"),
    (10, 0, r"^qmax must be an integer > 0 \(the largest code"),
    (10, -1, r"^qmax must be an integer > 0 \(the largest code")])
def test_a_gradient_scale_of_no_values_or_no_positive_code_is_one_line(n, qmax, match):
  # 1 / sqrt(0 * 7) = inf and 1 / sqrt(10 * -1) = NaN (NumPy says so too): it came back as the
  # scale of the step's gradient.
  with np.errstate(divide="ignore", invalid="ignore"):
    assert not np.isfinite(1 / np.sqrt(np.float32(n) * qmax))
  with pytest.raises(ConfigError, match=match):
    lsq_grad_scale(n, qmax)


def test_a_gradient_scale_of_a_fraction_of_a_value_is_one_line():
  with pytest.raises(ConfigError, match=r"^n must be an integer >= 1, got 2.5$"):
    lsq_grad_scale(2.5, 7)


@pytest.mark.parametrize("qmax", [np.inf, 7.5])
def test_a_largest_code_that_is_no_integer_is_one_line(qmax):
  # Q_P = inf: g = 1 / sqrt(10 * inf) = 0 froze the step and the initial step
  # 2 mean|x| / sqrt(inf) = 0 came back as EPS; 7.5 is no code of any grid.
  with pytest.raises(ConfigError, match=r"^qmax must be an integer > 0 \(the largest code"):
    lsq_grad_scale(10, qmax)
  with pytest.raises(ConfigError, match=r"^qmax must be an integer > 0 \(the largest code"):
    lsq_init_step(np.ones(3, np.float32), qmax=qmax)


def test_a_traced_gradient_scale_is_computed_inside_jit():
  g = jax.jit(lsq_grad_scale)(jnp.int32(100), jnp.int32(7))
  np.testing.assert_allclose(g, 1 / np.sqrt(700), rtol=1e-6)


def test_an_empty_input_has_a_finite_step_gradient():
  ds = jax.grad(lambda s: lsq_fake_quant(jnp.zeros((0,)), s, qmin=-8, qmax=7).sum())(0.5)
  assert float(ds) == 0.0
