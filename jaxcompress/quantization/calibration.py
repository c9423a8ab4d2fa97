"""Range calibration: the real interval ``[lo, hi]`` a tensor is quantized over.

Four estimators of one tensor's range (per tensor or per channel):

- ``minmax``: the observed minimum and maximum (Jacob et al. 2018);
- ``absmax``: ``[-max|x|, max|x|]``, for symmetric quantization;
- ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles, which ignore rare outliers;
- ``mse``: the min-max range shrunk by the clip ratio (out of ``num_candidates`` evenly spaced in
  ``(0, 1]``) that minimises the squared fake-quantization error, trading clipping error for
  rounding error.

Activation ranges over many batches are a moving average (:func:`ema_range`), kept in the
quantizer's state and threaded through the train step, never in globals.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
  Banner, Nahshan, Soudry. Post training 4-bit quantization of convolutional networks for
  rapid-deployment. NeurIPS 2019 (MSE-optimal clipping).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, check_counts, check_range, unknown
from jaxcompress.quantization.fake_quant import _fake_quant
from jaxcompress.quantization.qparams import (check_values, concrete, qparams_from_range, qrange,
                                              reduce_axes)

# The range estimators of :func:`tensor_range` (module docstring).
RANGE_METHODS = ("minmax", "absmax", "percentile", "mse")


def check_method(method: str, field: str = "method") -> None:
  """Raises :class:`ConfigError` unless ``method`` is one of :data:`RANGE_METHODS`."""
  if method not in RANGE_METHODS:
    raise unknown(field, method, RANGE_METHODS)


def tensor_range(x: Any, *, method: str = "minmax", axis: int | Sequence[int] | None = None,
                 percentile: float = 99.99, bits: int = 8, symmetric: bool = False,
                 num_candidates: int = 64) -> tuple[jax.Array, jax.Array]:
  """Estimates the quantization range of ``x``.

  Args:
    x: the tensor (weights, or a batch of activations).
    method: one of :data:`RANGE_METHODS`.
    axis: channel axis (or axes) kept for per-channel ranges (keepdims shapes), ``None`` per
      tensor.
    percentile: for ``percentile``: ``p`` in (50, 100]; the range is the ``[100 - p, p]``
      percentiles.
    bits: for ``mse``: the code width the error is measured at.
    symmetric: for ``mse``: measure the error of the symmetric (signed) grid.
    num_candidates: for ``mse``: how many clip ratios ``k / num_candidates`` to try.

  Returns:
    ``(lo, hi)`` float32 arrays: scalars, or per-channel arrays broadcastable against ``x``.

  Raises:
    ConfigError: for an unknown method, ``axis`` out of range, ``percentile`` outside (50, 100],
      ``bits`` outside 2..8, a ``num_candidates`` that is not an integer >= 1 or an empty
      ``x``.
  """
  check_method(method)
  x = jnp.asarray(x, jnp.float32)
  check_values(x, "tensor_range")
  axes = reduce_axes(x.ndim, axis)
  keep = axes is not None
  if method == "percentile":
    check_range("percentile", percentile, 50, 100, lo_closed=False, hi_closed=True)
    q = jnp.array([100.0 - percentile, percentile], x.dtype)  # float32 under x64 too
    lo, hi = jnp.percentile(x, q, axis=axes, keepdims=keep)
    return lo, hi
  lo = jnp.min(x, axis=axes, keepdims=keep)
  hi = jnp.max(x, axis=axes, keepdims=keep)
  if method == "absmax":
    m = jnp.maximum(-lo, hi)
    return -m, m
  if method == "minmax":
    return lo, hi
  check_counts({"num_candidates": num_candidates})
  ratio = _mse_ratio(x, lo, hi, axes, qrange(bits, symmetric), symmetric, int(num_candidates))
  return lo * ratio, hi * ratio


def _mse_ratio(x, lo, hi, axes, q, symmetric, num_candidates):
  """Clip ratio in ``(0, 1]`` minimising ``sum((fake_quant(x) - x)^2)`` per channel."""
  qmin, qmax = q
  keep = axes is not None

  def try_ratio(best, k):
    ratio = k / num_candidates
    scale, zero_point = qparams_from_range(lo * ratio, hi * ratio, qmin=qmin, qmax=qmax,
                                           symmetric=symmetric)
    err = jnp.sum(jnp.square(_fake_quant(x, scale, zero_point, qmin, qmax) - x), axis=axes,
                  keepdims=keep)
    best_err, best_ratio = best
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

  init = (jnp.full(lo.shape, jnp.inf, lo.dtype), jnp.ones(lo.shape, lo.dtype))  # not float64
  candidates = jnp.arange(1, num_candidates + 1, dtype=jnp.float32)
  (_, ratio), _ = jax.lax.scan(try_ratio, init, candidates)
  return ratio


def union_range(a: Any, b: Any) -> jax.Array:
  """The ``[lo, hi]`` range covering both ``[lo, hi]`` ranges ``a`` and ``b``."""
  return jnp.stack([jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])])


def ema_range(old: Any, new: Any, momentum: Any) -> jax.Array:
  """Moving average ``momentum * old + (1 - momentum) * new`` of ``[lo, hi]`` ranges.

  ``momentum = 0.99`` matches PyTorch's ``MovingAverageMinMaxObserver`` (averaging constant 0.01).
  The average has the ranges' dtype, whatever the momentum's (a NumPy float64 one included).

  Raises:
    ConfigError: (outside ``jit`` only) if ``momentum`` is not a number in ``[0, 1)``: outside
      it the average is no average (1.5 moves the range away from the batches').
  """
  if not isinstance(momentum, jax.core.Tracer):
    check_range("momentum", momentum, 0.0, 1.0)
  old, new = jnp.asarray(old), jnp.asarray(new)
  momentum = jnp.asarray(momentum, jnp.result_type(old, new))
  return momentum * old + (1.0 - momentum) * new


def check_finite_range(field: str, lo: Any, hi: Any) -> None:
  """Raises :class:`ConfigError` if a concrete range holds NaN/Inf or has ``lo > hi``.

  A non-finite range would silently turn the whole quantized model into NaNs.
  """
  lo_c, hi_c = concrete(lo), concrete(hi)
  if lo_c is None or hi_c is None:
    return
  if not (np.all(np.isfinite(lo_c)) and np.all(np.isfinite(hi_c))):
    raise ConfigError(f"{field} must be finite, got lo={lo_c.tolist()}, hi={hi_c.tolist()}; "
                      "check the calibration batches (and the weights) for NaN/Inf")
  if np.any(lo_c > hi_c):
    raise ConfigError(f"{field} must have lo <= hi, got lo={lo_c.tolist()}, hi={hi_c.tolist()}")
