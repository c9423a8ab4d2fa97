"""Distillation losses against NumPy oracles, and the teacher getting no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import distillation as kd
from jaxcompress.errors import ConfigError


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_loss_matches_numpy_kl_times_t_squared(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
  p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
  expected = temperature ** 2 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
  got = kd.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)



def test_a_float64_temperature_gives_float32_losses_with_x64_on():
  # Under x64 a NumPy float64 T promoted the whole loss to float64 (0.56415928, not 0.5641602).
  rng = np.random.default_rng(0)
  s, t = (rng.normal(size=(5, 7)).astype(np.float32) * 3 for _ in range(2))
  want = kd.kd_loss(s, t, np.float64(0.3))
  jax.config.update("jax_enable_x64", True)
  try:
    got = kd.kd_loss(s, t, np.float64(0.3))
  finally:
    jax.config.update("jax_enable_x64", False)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  p_t, p_s = _softmax(t / 0.3), _softmax(s / 0.3)
  np.testing.assert_allclose(got, 0.09 * np.sum(p_t * np.log(p_t / p_s), -1), rtol=1e-4)


def test_losses_take_python_lists_as_arrays():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  p_t, p_s = _softmax(t / 2.0), _softmax(s / 2.0)
  expected = 4.0 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
  np.testing.assert_allclose(kd.kd_loss(s.tolist(), t.tolist(), 2.0), expected, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(kd.feature_loss(s.tolist(), t.tolist()),
                             np.mean((s - t) ** 2, axis=-1), rtol=1e-5)


def test_a_class_the_teacher_rules_out_adds_nothing():
  # A masked vocabulary: teacher logit -inf, probability 0, and 0 * log 0 = 0 in the KL.
  s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  t = np.array([[2.0, -np.inf, 1.0], [-np.inf, 0.0, 1.0]])
  p_t, p_s = _softmax(t), _softmax(s)
  expected = np.sum(np.where(p_t > 0, p_t * (np.log(np.where(p_t > 0, p_t, 1)) - np.log(p_s)),
                             0), axis=-1)
  got = kd.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 1.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grad = jax.grad(lambda z: kd.kd_loss(z, jnp.asarray(t, jnp.float32), 1.0).sum())(
      jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(grad, p_s - p_t, rtol=1e-5, atol=1e-6)


def test_a_model_distilled_from_itself_has_zero_kd_loss():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 10)) * 5, jnp.float32)
  np.testing.assert_allclose(kd.kd_loss(logits, logits, 4.0), 0.0, atol=1e-6)


def test_teacher_receives_no_gradient_and_student_does():
  s = jnp.array([[1.0, 2.0, 0.5]])
  t = jnp.array([[0.0, 3.0, 1.0]])
  g_s, g_t = jax.grad(lambda a, b: kd.kd_loss(a, b, 2.0).sum(), argnums=(0, 1))(s, t)
  assert np.all(g_t == 0)
  # d/ds [T^2 KL] = T * (softmax(s/T) - softmax(t/T)).
  expected = 2.0 * (_softmax(np.asarray(s) / 2) - _softmax(np.asarray(t) / 2))
  np.testing.assert_allclose(g_s, expected, rtol=1e-5)
  g_f = jax.grad(lambda b: kd.feature_loss(jnp.ones((2, 3)), b).sum())(jnp.zeros((2, 3)))
  assert np.all(g_f == 0)


def test_feature_loss_is_per_example_mse():
  a = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
  b = np.zeros_like(a)
  np.testing.assert_allclose(kd.feature_loss(a, b), [np.mean(a[0] ** 2), np.mean(a[1] ** 2)],
                             rtol=1e-6)
  with pytest.raises(ConfigError, match=r"teacher_feat must be the student feature's shape "
                                        r"\(2, 4\), got 'shape \(2, 5\)'"):
    kd.feature_loss(jnp.zeros((2, 4)), jnp.zeros((2, 5)))


def test_adapters_only_where_widths_differ():
  key = jax.random.key(0)
  s = {"a": jnp.zeros((2, 4, 4, 16)), "b": jnp.zeros((2, 4, 4, 32))}
  t = {"x": jnp.zeros((2, 4, 4, 64)), "y": jnp.zeros((2, 4, 4, 32))}
  adapters = kd.init_adapters([("a", "x"), ("b", "y")], s, t, key)
  assert set(adapters) == {"a->x"}
  out = kd.adapt(adapters, ("a", "x"), s["a"] + 1, 64)
  assert out.shape == (2, 4, 4, 64)
  assert kd.adapt(adapters, ("b", "y"), s["b"], 32) is s["b"]
  # One student layer hinted by two teacher layers of other widths: an adapter for each pair.
  two = kd.init_adapters([("a", "x"), ("a", "y")], s, t, key)
  assert {k: jax.tree.leaves(v)[0].shape for k, v in two.items()} == {
      "a->x": (1, 1, 16, 64), "a->y": (1, 1, 16, 32)}
  with pytest.raises(ConfigError, match="share batch and spatial shape"):
    kd.init_adapters([("a", "z")], s, {"z": jnp.zeros((2, 8, 8, 16))}, key)


def test_agreement():
  s = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
  t = jnp.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
  np.testing.assert_array_equal(kd.agreement(s, t), [1.0, 0.0, 1.0])


@pytest.mark.parametrize("temperature, shown", [
    (0.0, "0.0"), (0, "0.0"), (-2.0, "-2.0"), (float("nan"), "nan"), (np.float32(0.0), "0.0")])
def test_kd_loss_rejects_non_positive_temperature(temperature, shown):
  # T = 0 used to give NaN and T < 0 a plausible-looking number.
  logits = jnp.zeros((2, 3))
  with pytest.raises(ConfigError) as err:
    kd.kd_loss(logits, logits, temperature)
  assert str(err.value).startswith(f"distill.temperature must be > 0, got {shown}")
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("temperature, valid, shown", [
    (np.array(0.0), "> 0", "0.0"), (jnp.float32(-2.0), "> 0", "-2.0"),
    (float("inf"), "a finite number > 0", "inf"), (np.float32("inf"), "a finite number > 0", "inf"),
    (jnp.array(np.inf), "a finite number > 0", "inf")])
def test_kd_loss_checks_concrete_arrays_and_refuses_an_infinite_temperature(temperature, valid,
                                                                            shown):
  # 0-d arrays went unchecked (T = 0 gave 0 for logits that differ, T = -2 a plausible 0.35),
  # and T = inf gave nan: T^2 * KL = inf * 0.
  s, t = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.0, 3.0, 1.0]])
  with pytest.raises(ConfigError) as err:
    kd.kd_loss(s, t, temperature)
  assert str(err.value).startswith(f"distill.temperature must be {valid}, got {shown}")
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("teacher_shape", [(4, 7), (1, 5)])
def test_kd_loss_refuses_logits_of_another_shape(teacher_shape):
  with pytest.raises(ConfigError, match=r"teacher_logits must be the student logits' shape "
                     r"\(4, 5\), got 'shape \(" + ", ".join(map(str, teacher_shape))):
    kd.kd_loss(jnp.zeros((4, 5)), jnp.zeros(teacher_shape), 2.0)


def test_kd_loss_traced_temperature_is_not_checked():
  # A traced T has no value at trace time; a positive one gives the same loss as a Python T.
  s = jnp.array([[1.0, 2.0, 0.5]])
  t = jnp.array([[0.0, 3.0, 1.0]])
  traced = jax.jit(kd.kd_loss)(s, t, jnp.float32(2.0))
  p_t, p_s = _softmax(np.asarray(t) / 2), _softmax(np.asarray(s) / 2)
  expected = 4.0 * np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
  np.testing.assert_allclose(traced, expected, rtol=1e-5)
