"""Fake quantization (quantize, then dequantize) with a straight-through gradient.

``fake_quant`` keeps values in floating point but restricts them to the grid a ``bits``-bit integer
can represent, so a model trains (or is evaluated) as it will run in integer arithmetic. Rounding
has zero gradient almost everywhere; the straight-through estimator (Bengio et al. 2013) passes the
gradient through unchanged where the value is representable and stops it where it was clipped,
exactly as ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` do.

References:
  Bengio, Leonard, Courville. Estimating or Propagating Gradients Through Stochastic Neurons for
  Conditional Computation. arXiv:1308.3432, 2013.
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import invalid
from jaxcompress.quantization.qparams import check_grid, concrete


def check_qparams(scale: Any, qmin: Any = None, qmax: Any = None, field: str = "scale",
                  hint: str = "compute it with minmax_qparams or qparams_from_range, which guard "
                              "against 0") -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` for a non-positive or non-finite scale or
  ``qmin >= qmax`` (``hint``: how to get a valid scale).

  Only values known outside a trace are checked (``None`` skips one); under ``jit`` the arguments
  are trusted.
  """
  if qmin is not None and qmax is not None:
    check_grid(qmin, qmax)
  s = concrete(scale)
  if s is not None and not np.all(np.isfinite(s) & (s > 0)):
    bad = s[~(np.isfinite(s) & (s > 0))] if s.ndim else s
    raise invalid(field, bad.tolist(), "finite and > 0 everywhere", hint)


def check_zero_point(zero_point: Any, qmin: Any, qmax: Any) -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` unless a concrete ``zero_point`` holds integers
  in ``[qmin, qmax]``: it is the code of the real value 0, which the grid holds (PyTorch's
  ``fake_quantize_*`` refuses another too). Only values known outside a trace are checked."""
  zp, lo, hi = concrete(zero_point), concrete(qmin), concrete(qmax)
  if zp is None:
    return
  fractional = zp != np.round(zp)  # NaN included
  if np.any(fractional):
    bad = zp[fractional].tolist() if zp.ndim else zp.item()
    raise invalid("zero_point", bad, "integer codes (the code of the real value 0)",
                  "qparams_from_range and minmax_qparams give one")
  if lo is None or hi is None:
    return
  outside = (zp < lo) | (zp > hi)
  if np.any(outside):
    bad = np.broadcast_to(zp, outside.shape)[outside].tolist() if zp.ndim else zp.item()
    raise invalid("zero_point", bad, f"in [qmin, qmax] = [{lo}, {hi}] (the code of the real "
                  "value 0)", "qparams_from_range and minmax_qparams give one")


def check_shape(x: Any, value: Any, field: str) -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` unless ``value`` (a scale, zero point or step)
  broadcasts against ``x`` without changing ``x``'s shape: a scalar, or one value per channel,
  size 1 elsewhere."""
  shape = tuple(np.shape(x))
  if not all(isinstance(d, int) for d in shape + tuple(np.shape(value))):
    return  # a symbolic dimension (jax.export's batch): no numbers to check
  try:
    fits = np.broadcast_shapes(tuple(np.shape(value)), shape) == shape
  except ValueError:
    fits = False
  if not fits:
    raise invalid(field, f"of shape {tuple(np.shape(value))}", "a scalar or an array "
                  f"broadcastable against x of shape {shape} (one value per channel, size 1 "
                  "elsewhere)")


def scaled(x: Any, scale: Any) -> jax.Array:
  """``x / scale`` as ``x * (1 / scale)`` (float32): the same number eagerly, in any compiled
  graph and in NumPy. XLA turns a division by a broadcast scalar into this product inside ``jit``
  but not eagerly, so a code computed eagerly (the export) and one in a compiled step (the model)
  could differ by one where ``x / scale`` is an exact rounding tie."""
  return jnp.asarray(x) * (1.0 / jnp.asarray(scale, jnp.float32))



def _check_args(x: Any, scale: Any, zero_point: Any, qmin: Any, qmax: Any) -> None:
  """The checks of :func:`fake_quant`, :func:`quantize_int` and :func:`quantize_int_numpy`: the
  grid (:func:`check_qparams`), the shapes of ``scale`` and ``zero_point`` against ``x``
  (:func:`check_shape`) and the zero point on the grid (:func:`check_zero_point`)."""
  check_qparams(scale, qmin, qmax)
  for field, value in (("scale", scale), ("zero_point", zero_point)):
    check_shape(x, value, field)
  check_zero_point(zero_point, qmin, qmax)

@jax.custom_jvp
def _fake_quant(x, scale, zero_point, qmin, qmax):
  # float32 grid values whatever the dtypes of scale and zero point (a float64 NumPy scale is
  # float64 under x64: the product would round to other values than the export's)
  scale, zero_point = jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.float32)
  q = jnp.clip(jnp.round(scaled(x, scale)) + zero_point, qmin, qmax)
  return ((q - zero_point) * scale).astype(x.dtype)


@_fake_quant.defjvp
def _fake_quant_jvp(primals, tangents):
  x, scale, zero_point, qmin, qmax = primals
  q = jnp.round(scaled(x, scale)) + zero_point
  inside = (q >= qmin) & (q <= qmax)
  # Straight-through: d out / d x = 1 where representable, 0 where clipped; no gradient flows
  # to scale or zero_point (PyTorch's observers compute them outside autograd as well). The
  # primal is the function itself, so a second derivative (jax.hessian, a Hessian-vector
  # product) is straight-through too, not the zero derivative of jnp.round.
  out = _fake_quant(x, scale, zero_point, qmin, qmax)
  return out, jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


def fake_quant(x: Any, scale: Any, zero_point: Any, *, qmin: Any, qmax: Any) -> jax.Array:
  """Quantize-dequantize ``x`` onto the grid ``(q - zero_point) * scale``, ``qmin <= q <= qmax``.

  Forward: ``(clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with round
  half to even. Backward w.r.t. ``x``: the mask ``qmin <= round(x / scale) + zero_point <= qmax``
  (straight-through estimator); ``scale`` and ``zero_point`` get no gradient (use
  :func:`~jaxcompress.quantization.lsq_fake_quant` to learn the scale).

  Args:
    x: values to quantize, any shape and float dtype (the output keeps it).
    scale: positive step, a scalar (per-tensor) or an array broadcastable against ``x``
      (per-channel, e.g. shape ``(1, 1, 1, C)`` for an HWIO kernel).
    zero_point: integer code of the real value 0, broadcastable like ``scale``.
    qmin: smallest code (e.g. 0 or -128); a Python int or a traced integer.
    qmax: largest code (e.g. 255 or 127).

  Returns:
    An array of ``x``'s shape and dtype whose every value is ``(k - zero_point) * scale`` for an
    integer ``k`` in ``[qmin, qmax]``.

  Raises:
    ConfigError: (outside ``jit`` only) if ``scale`` is zero, negative or not finite, or if
      ``qmin >= qmax``; if ``scale`` or ``zero_point`` does not broadcast against ``x`` (to
      ``x``'s shape); if ``zero_point`` is not an integer in ``[qmin, qmax]``.

  Example:
    >>> fake_quant(jnp.array([0.26, -3.0]), 0.1, 0, qmin=-8, qmax=7)
    Array([ 0.3, -0.8], dtype=float32)
  """
  _check_args(x, scale, zero_point, qmin, qmax)
  return _fake_quant(jnp.asarray(x), scale, zero_point, qmin, qmax)


def quantize_int(x: Any, scale: Any, zero_point: Any, *, qmin: Any, qmax: Any) -> jax.Array:
  """The integer codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` as int32 (no gradient).

  ``dequantize(quantize_int(x, ...), scale, zero_point)`` equals ``fake_quant(x, ...)``; an
  exporter stores these codes.

  Raises:
    ConfigError: (outside ``jit`` only) for a bad ``scale`` or ``qmin >= qmax``; for a
      ``scale`` or ``zero_point`` that does not broadcast against ``x``; for a ``zero_point``
      that is not an integer in ``[qmin, qmax]``.
  """
  _check_args(x, scale, zero_point, qmin, qmax)
  q = jnp.clip(jnp.round(scaled(x, scale)) + zero_point, qmin, qmax)
  return q.astype(jnp.int32)


def quantize_int_numpy(x: Any, scale: Any, zero_point: Any, *, qmin: Any,
                       qmax: Any) -> np.ndarray:
  """:func:`quantize_int` of float32 values, computed by NumPy: the same float32 operations, so
  the same integers, without compiling a JAX program for each shape (the export's weights).

  Raises:
    ConfigError: as :func:`quantize_int`.
  """
  _check_args(x, scale, zero_point, qmin, qmax)
  x = np.asarray(x, np.float32) * (np.float32(1) / np.asarray(scale, np.float32))
  q = np.clip(np.round(x) + np.asarray(zero_point).astype(np.float32), qmin, qmax)
  return q.astype(np.int32)


def dequantize(q: Any, scale: Any, zero_point: Any) -> jax.Array:
  """Real values ``(q - zero_point) * scale`` of integer codes ``q`` (float32)."""
  return ((jnp.asarray(q, jnp.float32) - jnp.asarray(zero_point, jnp.float32))
          * jnp.asarray(scale, jnp.float32))
