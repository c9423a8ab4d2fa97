"""Sparsity schedules: plain ``step -> sparsity`` functions, jnp only, so ``step`` may be traced.

Example:
  >>> schedule = polynomial_schedule(0.9, begin_step=1000, end_step=9000)
  >>> round(float(schedule(5000)), 6)  # 0.9 + (0 - 0.9) * (1 - 0.5) ** 3, in float32
  0.7875

References:
  Zhu, Gupta. To prune, or not to prune: exploring the efficacy of pruning for model compression.
  arXiv:1710.01878, 2017 (the gradual polynomial schedule).
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from jaxcompress.errors import invalid
from jaxcompress.pruning.masks import check_sparsity

# ``schedule(step) -> sparsity``: a jnp scalar, ``step`` a Python int or a traced one.
Schedule = Callable[["int | jax.Array"], jax.Array]


def _ending_at(schedule: Schedule, final: float) -> Schedule:
  """``schedule`` with its final sparsity, the Python number, as ``schedule.final``.

  The values are float32 (0.7 is 0.69999999): :func:`~jaxcompress.pruning.prune` masks at the
  final sparsity with this number instead, so a run ends with ``round(final * n)`` pruned, the
  count of :func:`~jaxcompress.pruning.compute_masks` (0.7 of 45 entries: 31, not 32).
  """
  schedule.final = float(final)
  return schedule


def _check_step(field: str, step: int) -> None:
  if not isinstance(step, numbers.Integral) or step < 0:
    raise invalid(field, step, "an integer >= 0")


def constant_schedule(sparsity: float) -> Schedule:
  """``sparsity`` at every step.

  Raises:
    ConfigError: unless ``sparsity`` is in [0, 1).
  """
  check_sparsity(sparsity, "schedule.sparsity")
  return _ending_at(lambda step: jnp.full(jnp.shape(step), sparsity, jnp.float32), sparsity)


def one_shot_schedule(sparsity: float, step: int) -> Schedule:
  """0 before ``step``, ``sparsity`` from ``step`` on (prune once, then fine-tune).

  Raises:
    ConfigError: unless ``sparsity`` is in [0, 1) and ``step`` is an integer >= 0.
  """
  check_sparsity(sparsity, "schedule.sparsity")
  _check_step("schedule.step", step)
  return _ending_at(
      lambda t: jnp.where(jnp.asarray(t) >= step, sparsity, 0.0).astype(jnp.float32), sparsity)


def polynomial_schedule(final_sparsity: float, begin_step: int, end_step: int, *,
                        initial_sparsity: float = 0.0, power: float = 3) -> Schedule:
  """Gradual pruning of Zhu & Gupta (2017).

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` for ``t0 <= t <= t1``;
  ``s_f`` after ``t1``; and 0 before ``t0`` (pruning has not started, whatever ``s_i``).

  Args:
    final_sparsity: ``s_f``, in [0, 1).
    begin_step: ``t0``, the first pruning step.
    end_step: ``t1 > t0``, the step the final sparsity is reached.
    initial_sparsity: ``s_i``, in ``[0, s_f]``: the sparsity only grows (a hard mask zeroes
      the weights it prunes, so a falling sparsity would not bring them back).
    power: the exponent, > 0 (3 in the paper).

  Returns:
    The schedule, a float32 scalar for a scalar step.

  Raises:
    ConfigError: for sparsities outside [0, 1), ``initial_sparsity > final_sparsity``,
      negative or non-integer steps, ``end_step <= begin_step`` or ``power`` not > 0 (NaN included).
  """
  check_sparsity(final_sparsity, "schedule.final_sparsity")
  check_sparsity(initial_sparsity, "schedule.initial_sparsity")
  if initial_sparsity > final_sparsity:
    raise invalid("schedule.initial_sparsity", initial_sparsity,
                  f"at most final_sparsity={final_sparsity}", "pruning only adds zeros")
  _check_step("schedule.begin_step", begin_step)
  _check_step("schedule.end_step", end_step)
  if end_step <= begin_step:
    raise invalid("schedule.end_step", end_step, f"> begin_step={begin_step}")
  if not isinstance(power, numbers.Real) or not power > 0:  # NaN: every sparsity NaN
    raise invalid("schedule.power", power, "a number > 0", "Zhu & Gupta use 3")

  def schedule(step):
    step = jnp.asarray(step)  # steps apart in integers: float32 holds steps exactly to 2^24
    progress = jnp.clip((step - begin_step).astype(jnp.float32) / (end_step - begin_step),
                        0.0, 1.0)
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
    return jnp.where(step < begin_step, 0.0, s).astype(jnp.float32)

  return _ending_at(schedule, final_sparsity)
