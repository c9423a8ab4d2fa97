"""Progressive bit-width schedules: ``step -> bits``, from 8 bits down to the target.

Lowering the precision in stages ("multiple rounds of quantization", as in incremental network
quantization) lets each stage fine-tune from a nearby solution instead of jumping to low bits.

A schedule is a plain function of the (possibly traced) step that returns an int32 scalar. Inside a
jitted train step the bit width is therefore a traced value: ``qmin``/``qmax`` and scales are
computed from it with ``jnp`` (see :func:`~jaxcompress.quantization.qparams.qrange`), so moving
from one phase to the next changes data, not the compiled program, and nothing recompiles. The
same function evaluated on a Python int (``int(schedule(step))``) gives the bits of a phase for
code that runs each phase separately.

References:
  Zhou, Yao, Guo, Xu, Chen. Incremental Network Quantization: Towards Lossless CNNs with
  Low-Precision Weights. ICLR 2017.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, invalid
from jaxcompress.quantization.qparams import MAX_BITS, check_bits

BitSchedule = Callable[[Any], jax.Array]


def _is_int(value: Any) -> bool:
  """A Python or NumPy integer (a step count from ``np.arange`` or a config), not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def bit_schedule(bits: Sequence[int], boundaries: Sequence[int]) -> BitSchedule:
  """Piecewise-constant schedule: ``bits[i]`` for ``boundaries[i-1] <= step < boundaries[i]``.

  Args:
    bits: the bit width of each phase, non-increasing, each in 2..8 (e.g. ``(8, 6, 4)``).
    boundaries: the steps where a new phase starts, strictly increasing, ``len(bits) - 1`` of them.

  Returns:
    ``schedule(step) -> int32 bits``, valid for Python ints and traced steps alike.

  Raises:
    ConfigError: for bits outside 2..8 or increasing, or misplaced boundaries.

  Example:
    >>> sched = bit_schedule((8, 6, 4), (1000, 2000))
    >>> [int(sched(s)) for s in (0, 999, 1000, 5000)]
    [8, 8, 6, 4]
  """
  bits, boundaries = tuple(bits), tuple(boundaries)
  if not bits:
    raise ConfigError("bits must list at least one bit width, got ()")
  for i, b in enumerate(bits):
    check_bits(b, f"bits[{i}]")
  if any(later > earlier for earlier, later in zip(bits, bits[1:])):
    raise invalid("bits", bits, "non-increasing (precision only goes down)")
  if len(boundaries) != len(bits) - 1:
    raise invalid("boundaries", boundaries, f"{len(bits) - 1} steps, one per phase change")
  if any(not _is_int(s) or s < 0 for s in boundaries) or list(boundaries) != sorted(
      set(boundaries)):
    raise invalid("boundaries", boundaries, "strictly increasing non-negative integers")
  boundaries = tuple(int(s) for s in boundaries)
  bits_arr = jnp.asarray(bits, jnp.int32)
  bounds_arr = jnp.asarray(boundaries, jnp.int32)

  def schedule(step: Any) -> jax.Array:
    phase = jnp.searchsorted(bounds_arr, jnp.asarray(step, jnp.int32), side="right")
    return bits_arr[phase]

  return schedule


def progressive_bits(target: int, num_steps: int, *, start: int = MAX_BITS) -> BitSchedule:
  """One bit at a time from ``start`` down to ``target``, in equal phases over ``num_steps``.

  Phase ``i`` of ``start - target + 1`` uses ``start - i`` bits; from ``num_steps`` on (and in the
  last phase) the bits are ``target``.

  Args:
    target: final bit width (2..8).
    num_steps: steps over which the precision is lowered (> number of phases).
    start: initial bit width, at least ``target`` (default 8).

  Returns:
    A schedule as from :func:`bit_schedule`.

  Raises:
    ConfigError: for bad bit widths or too few steps.

  Example:
    >>> sched = progressive_bits(4, 1000)  # 8, 7, 6, 5, 4 bits, 200 steps each
    >>> [int(sched(s)) for s in (0, 200, 999)]
    [8, 7, 4]
  """
  check_bits(target, "target")
  check_bits(start, "start")
  if start < target:
    raise invalid("start", start, f">= target ({target})")
  phases = start - target + 1
  if not _is_int(num_steps) or num_steps < phases:
    raise invalid("num_steps", num_steps, f"an integer >= {phases} (one step per phase at least)")
  num_steps = int(num_steps)
  boundaries = tuple(round(num_steps * i / phases) for i in range(1, phases))
  return bit_schedule(tuple(range(start, target - 1, -1)), boundaries)
