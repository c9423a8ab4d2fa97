"""Quantization parameters: integer ranges, and (scale, zero_point) from a real range.

The affine map follows Jacob et al. (2018) and the PyTorch/ONNX convention: a real value ``r`` is
stored as the integer ``q = clip(round(r / scale) + zero_point, qmin, qmax)`` and read back as
``(q - zero_point) * scale``. The representable range always includes 0, so zero (padding, ReLU
outputs, pruned weights) is exact.

- asymmetric (unsigned): ``qmin = 0``, ``qmax = 2^bits - 1``,
  ``scale = (max - min) * (1 / (qmax - qmin))``, ``zero_point = clip(round(qmin - min / scale))``;
- symmetric (signed): ``qmin = -2^(bits-1)``, ``qmax = 2^(bits-1) - 1``, ``zero_point = 0``,
  ``scale = max|x| * (2 / (qmax - qmin))``.

On the symmetric grid the most negative value of a tensor lands exactly on a rounding tie
(``-max|x| / scale = qmin + 0.5``): either neighbouring code is correct, and which one a backend
picks depends on the last bit of its division (XLA may divide by a broadcast scale through its
reciprocal). Compare implementations there with a tolerance of one step, as for PyTorch.

``bits`` may be a Python int (validated, static ranges) or a traced integer array (a progressive
bit schedule), in which case ``qmin``/``qmax`` are computed with ``jnp`` and nothing recompiles.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, invalid

MIN_BITS, MAX_BITS = 2, 8
# PyTorch's observers clamp the scale to float32 eps so an all-zero tensor does not divide by 0.
EPS = float(np.finfo(np.float32).eps)
BITS_VALID = f"an integer in [{MIN_BITS}, {MAX_BITS}]"


def concrete(x: Any) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array when its value is known now, ``None`` under a JAX trace."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_bits(bits: Any, field: str = "bits") -> None:
  """Raises :class:`ConfigError` unless ``bits`` is an integer in 2..8 (traced values pass)."""
  if isinstance(bits, jax.core.Tracer):
    return
  value = np.asarray(bits)
  if (isinstance(bits, bool) or value.ndim or not np.issubdtype(value.dtype, np.integer)
      or not MIN_BITS <= int(value) <= MAX_BITS):
    raise invalid(field, bits, BITS_VALID, "4 or 8 bits are the usual choices")


def qrange(bits: Any, symmetric: bool) -> tuple[Any, Any]:
  """Integer range ``(qmin, qmax)`` of a ``bits``-bit code.

  Args:
    bits: a Python int in 2..8, or a traced integer array.
    symmetric: signed range ``[-2^(b-1), 2^(b-1) - 1]`` if true, else unsigned ``[0, 2^b - 1]``.

  Returns:
    ``(qmin, qmax)``: Python ints for an int ``bits``, int32 arrays for a traced one.

  Raises:
    ConfigError: for an int ``bits`` outside 2..8.
  """
  check_bits(bits)
  if isinstance(bits, jax.core.Tracer) or isinstance(bits, jax.Array):
    one = jnp.ones((), jnp.int32)
    bits = jnp.asarray(bits, jnp.int32)
    if symmetric:
      half = jnp.left_shift(one, bits - 1)
      return -half, half - 1
    return 0 * one, jnp.left_shift(one, bits) - 1
  bits = int(bits)
  if symmetric:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  return 0, (1 << bits) - 1


def reduce_axes(ndim: int, axis: int | Sequence[int] | None,
                field: str = "axis") -> tuple[int, ...] | None:
  """The axes to reduce over so that only the channel ``axis`` (or axes) is kept (``None``: all of
  them).

  Raises:
    ConfigError: if ``axis`` is not an integer in ``[-ndim, ndim)`` or a non-empty sequence of
      distinct such axes.
  """
  if axis is None:
    return None
  axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  valid = f"None, an integer in [{-ndim}, {ndim}) or a tuple of distinct ones for a {ndim}-d array"
  if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                     or not -ndim <= a < ndim for a in axes):
    raise invalid(field, axis, valid)
  kept = {int(a) % ndim for a in axes}
  if len(kept) != len(axes):
    raise invalid(field, axis, valid)
  return tuple(i for i in range(ndim) if i not in kept)


def check_values(x: Any, field: str) -> None:
  """Raises :class:`ConfigError` for an empty ``x``: it has no range to quantize over (its
  minimum and maximum do not exist, its mean is NaN)."""
  if not np.size(x):
    raise ConfigError(f"{field}: the tensor is empty (shape {tuple(np.shape(x))}); a range or "
                      "a step is measured on values")


def check_grid(qmin: Any, qmax: Any) -> None:
  """Raises :class:`ConfigError` unless concrete codes ``qmin < qmax`` (NaN fails) are finite
  integers; traced ones pass."""
  lo, hi = concrete(qmin), concrete(qmax)
  if lo is not None and hi is not None and not np.all(lo < hi):
    raise ConfigError(f"qmin must be < qmax, got qmin={qmin!r}, qmax={qmax!r}; "
                      "use qparams.qrange(bits, symmetric) to get a valid pair")
  for field, value, code in (("qmin", qmin, lo), ("qmax", qmax, hi)):
    if code is not None and not np.all(np.isfinite(code) & (code == np.round(code))):
      raise invalid(field, value, "an integer code (every value on the grid is one)",
                    "use qparams.qrange(bits, symmetric) to get a valid pair")


def qparams_from_range(lo: Any, hi: Any, *, qmin: Any, qmax: Any,
                       symmetric: bool) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)`` that map the real range ``[lo, hi]`` onto ``[qmin, qmax]``.

  The range is first widened to include 0. Arrays broadcast, so per-channel ranges give
  per-channel parameters.

  Args:
    lo: range minimum (scalar or per-channel array).
    hi: range maximum, same shape as ``lo``.
    qmin: smallest integer code.
    qmax: largest integer code.
    symmetric: ``zero_point = 0`` and the scale covers ``max(|lo|, |hi|)``.

  Returns:
    ``(scale, zero_point)``: float32 scale (at least :data:`EPS`) and int32 zero point.

  Raises:
    ConfigError: (outside ``jit`` only) if ``lo > hi`` anywhere: no real range; if
      ``qmin >= qmax``: no grid.
  """
  check_grid(qmin, qmax)
  lo_c, hi_c = concrete(lo), concrete(hi)
  if lo_c is not None and hi_c is not None and np.any(lo_c > hi_c):
    raise ConfigError(f"qparams_from_range needs lo <= hi, got lo={lo_c.tolist()}, "
                      f"hi={hi_c.tolist()}; pass the range's minimum first")
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  # Times the reciprocal of the grid's width, not divided by it: XLA turns a division by a
  # constant (static bits) into that product, and a traced ``bits`` (a schedule) keeps the
  # division, which may differ in the last bit; the product is the same everywhere.
  # (float32 whatever qmin and qmax are: NumPy int64s made a float64 scale under x64)
  if symmetric:
    scale = jnp.maximum(-lo, hi) * jnp.asarray(2.0 / (qmax - qmin), jnp.float32)
    return jnp.maximum(scale, EPS), jnp.zeros(scale.shape, jnp.int32)
  scale = jnp.maximum((hi - lo) * jnp.asarray(1.0 / (qmax - qmin), jnp.float32), EPS)
  zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax).astype(jnp.int32)
  return scale, zero_point


def minmax_qparams(x: Any, *, bits: Any, axis: int | Sequence[int] | None = None,
                   symmetric: bool = False) -> tuple[jax.Array, jax.Array, Any, Any]:
  """Min-max quantization parameters of ``x``, as PyTorch's ``MinMaxObserver`` computes them.

  Args:
    x: the tensor to quantize.
    bits: code width, 2..8 (or a traced integer).
    axis: channel axis kept for per-channel parameters (a tuple: one pair per entry of those
      axes, e.g. ``(1, 2)`` for a ``[in, heads, dim]`` kernel); ``None`` for one per-tensor pair.
    symmetric: signed range with ``zero_point = 0`` (weights) or unsigned asymmetric (activations).

  Returns:
    ``(scale, zero_point, qmin, qmax)``. Per-tensor: scalars. Per-channel: arrays with
    ``x.ndim`` dims, size 1 everywhere but ``axis``, so they broadcast against ``x``.

  Raises:
    ConfigError: for ``bits`` outside 2..8, ``axis`` out of range or an empty ``x``.

  Example:
    >>> scale, zp, qmin, qmax = minmax_qparams(jnp.array([-1.0, 3.0]), bits=8)
    >>> (qmin, qmax, int(zp))
    (0, 255, 64)
  """
  x = jnp.asarray(x)
  check_values(x, "minmax_qparams")
  qmin, qmax = qrange(bits, symmetric)
  axes = reduce_axes(x.ndim, axis)
  keep = axes is not None
  if symmetric and jnp.issubdtype(x.dtype, jnp.floating):
    # The symmetric scale reads max(-min(lo, 0), max(hi, 0)), which is max|x|: one reduction
    # instead of two, and the same scale (NaN and inf included; an integer x keeps min and max,
    # as |x| of its most negative value overflows).
    hi = jnp.max(jnp.abs(x), axis=axes, keepdims=keep)
    lo = -hi
  else:
    lo = jnp.min(x, axis=axes, keepdims=keep)
    hi = jnp.max(x, axis=axes, keepdims=keep)
  scale, zero_point = qparams_from_range(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric)
  return scale, zero_point, qmin, qmax
