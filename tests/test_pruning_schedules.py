"""Sparsity schedules against the hand formula, eagerly and on traced steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import constant_schedule, one_shot_schedule, polynomial_schedule


def zhu_gupta(t, s_f, t0, t1, s_i=0.0, power=3):
  """The paper's formula, written out by hand in plain Python."""
  if t < t0:
    return 0.0
  if t >= t1:
    return s_f
  return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power


@pytest.mark.parametrize("kwargs", [dict(), dict(s_i=0.2), dict(power=1), dict(s_i=0.1, power=2)])
def test_polynomial_matches_the_formula(kwargs):
  s_i, power = kwargs.get("s_i", 0.0), kwargs.get("power", 3)
  schedule = polynomial_schedule(0.9, 100, 1100, initial_sparsity=s_i, power=power)
  steps = [0, 99, 100, 101, 350, 600, 1099, 1100, 5000]
  got = jax.jit(jax.vmap(schedule))(jnp.array(steps))
  expected = [zhu_gupta(t, 0.9, 100, 1100, s_i, power) for t in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert float(schedule(600)) == pytest.approx(0.9 + (s_i - 0.9) * 0.5 ** power)


def test_polynomial_past_the_steps_float32_holds():
  # Past 2^24 a float32 step rounds to even: the ramp must count the steps apart in integers.
  t0 = 2**24 + 1
  schedule = jax.jit(polynomial_schedule(0.5, t0, t0 + 10))
  for t in (t0, t0 + 2, t0 + 5, t0 + 9):
    assert float(schedule(jnp.int32(t))) == pytest.approx(zhu_gupta(t, 0.5, t0, t0 + 10),
                                                           rel=1e-6), t


def test_polynomial_hand_values():
  schedule = polynomial_schedule(0.8, 0, 4)
  # t = 0..4: 0.8 * (1 - (1 - t/4)^3) = 0, 0.4625, 0.7, 0.7875, 0.8
  np.testing.assert_allclose([float(schedule(t)) for t in range(5)],
                             [0.0, 0.4625, 0.7, 0.7875, 0.8], rtol=1e-6)


def test_one_shot_and_constant():
  one_shot = jax.jit(one_shot_schedule(0.7, 10))
  assert [float(one_shot(t)) for t in (0, 9, 10, 11)] == pytest.approx([0, 0, 0.7, 0.7])
  assert float(jax.jit(constant_schedule(0.3))(jnp.int32(123))) == pytest.approx(0.3)


@pytest.mark.parametrize("call, needle", [
    (lambda: polynomial_schedule(1.0, 0, 10), "schedule.final_sparsity must be in [0.0, 1.0)"),
    (lambda: polynomial_schedule(0.5, 0, 10, initial_sparsity=-0.1),
     "schedule.initial_sparsity must be in [0.0, 1.0), got -0.1"),
    (lambda: polynomial_schedule(0.5, 0, 10, initial_sparsity=0.9),
     "schedule.initial_sparsity must be at most final_sparsity=0.5, got 0.9"),
    (lambda: polynomial_schedule(0.5, 10, 10), "schedule.end_step must be > begin_step=10"),
    (lambda: polynomial_schedule(0.5, -1, 10), "schedule.begin_step must be an integer >= 0"),
    (lambda: polynomial_schedule(0.5, 0, 10, power=0), "schedule.power must be a number > 0"),
    (lambda: polynomial_schedule(0.5, 0, 10, power=float("nan")),
     "schedule.power must be a number > 0, got nan"),
    (lambda: one_shot_schedule(0.5, 2.5), "schedule.step must be an integer >= 0, got 2.5"),
    (lambda: constant_schedule(1.5), "schedule.sparsity must be in [0.0, 1.0), got 1.5"),
])
def test_bad_input(call, needle):
  with pytest.raises(ConfigError) as err:
    call()
  assert needle in str(err.value)
