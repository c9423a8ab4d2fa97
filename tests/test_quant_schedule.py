"""Progressive bit schedules: values per phase, traced steps without recompiles, bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import bit_schedule, progressive_bits, qrange


def test_piecewise_constant_values():
  sched = bit_schedule((8, 6, 4), (100, 200))
  assert [int(sched(s)) for s in (0, 99, 100, 199, 200, 10 ** 6)] == [8, 8, 6, 6, 4, 4]


def test_progressive_bits_one_bit_per_phase():
  sched = progressive_bits(4, 500)
  assert [int(sched(s)) for s in (0, 99, 100, 200, 300, 400, 499, 5000)] == [8, 8, 7, 6, 5, 4, 4, 4]
  assert int(progressive_bits(8, 10)(3)) == 8  # start == target: a constant schedule


def test_traced_step_does_not_recompile_across_phases():
  sched = progressive_bits(2, 70)
  traces = []

  @jax.jit
  def qmax_at(step):
    traces.append(1)
    return qrange(sched(step), True)[1]

  assert [int(qmax_at(s)) for s in (0, 10, 20, 69)] == [127, 63, 31, 1]
  assert len(traces) == 1


@pytest.mark.parametrize("bits,boundaries,match", [
    ((8, 9), (10,), r"bits\[1\] must be an integer in \[2, 8\], got 9"),
    ((4, 8), (10,), r"bits must be non-increasing"),
    ((8, 4), (), r"boundaries must be 1 steps"),
    ((8, 6, 4), (20, 10), r"boundaries must be strictly increasing"),
])
def test_bad_schedule_raises(bits, boundaries, match):
  with pytest.raises(ConfigError, match=match):
    bit_schedule(bits, boundaries)


def test_bad_progressive_raises():
  with pytest.raises(ConfigError, match=r"start must be >= target \(6\), got 4"):
    progressive_bits(6, 100, start=4)
  with pytest.raises(ConfigError, match=r"num_steps must be an integer >= 5"):
    progressive_bits(4, 3)
  with pytest.raises(ConfigError, match=r"target must be an integer in \[2, 8\], got 1"):
    progressive_bits(1, 100)


def test_numpy_integer_steps_are_integers():
  """Boundaries from np.arange or a config's NumPy ints: the same schedule as Python ints."""
  sched = bit_schedule((8, 6, 4), np.array([10, 20]))
  assert [int(sched(s)) for s in (0, 9, 10, 19, 20, 99)] == [8, 8, 6, 6, 4, 4]
  sched = progressive_bits(4, np.int64(50))  # 5 phases of 10 steps
  assert [int(sched(s)) for s in (0, 10, 20, 30, 40, 49)] == [8, 7, 6, 5, 4, 4]
  with pytest.raises(ConfigError, match=r"boundaries must be strictly increasing"):
    bit_schedule((8, 4), (True,))
