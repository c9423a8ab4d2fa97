"""Learned Step Size Quantization (LSQ, Esser et al. 2019).

The quantizer is ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with a trainable step ``s``. Its
gradients, with the straight-through estimator for ``round`` (paper, eq. 3), are

- w.r.t. ``v``: 1 where ``-Q_N < v / s < Q_P``, else 0;
- w.r.t. ``s``: ``-v / s + round(v / s)`` strictly inside the range, ``-Q_N`` at or below it,
  ``Q_P`` at or above it (on a bound ``v_hat = s * Q_P`` on both sides, whose slope is ``Q_P``),

and the step's gradient is multiplied by ``g = 1 / sqrt(N * Q_P)`` (paper, section 2.2), where
``N`` is the number of values sharing the step (weights of the layer or channel, or features of the
layer per example). In this module's notation ``qmin = -Q_N`` and ``qmax = Q_P``.

References:
  Esser, McKinstry, Bablani, Appuswamy, Modha. Learned Step Size Quantization. ICLR 2020
  (arXiv:1902.08153, 2019).
  Bengio, Leonard, Courville. Estimating or Propagating Gradients Through Stochastic Neurons for
  Conditional Computation. arXiv:1308.3432, 2013.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import check_counts, invalid
from jaxcompress.quantization.fake_quant import check_qparams, check_shape, scaled
from jaxcompress.quantization.qparams import EPS, check_values, concrete, reduce_axes


def check_qmax(qmax: Any) -> None:
  """Raises :class:`~jaxcompress.errors.ConfigError` unless a concrete ``qmax`` (``Q_P``) is a
  positive integer code everywhere (NaN and infinity fail); a traced one passes."""
  q = concrete(qmax)
  if q is not None and not np.all(np.isfinite(q) & (q > 0) & (q == np.round(q))):
    raise invalid("qmax", qmax, "an integer > 0 (the largest code, e.g. 7 for signed 4 bits)")


def lsq_init_step(x: Any, *, qmax: Any, axis: int | Sequence[int] | None = None) -> jax.Array:
  """The paper's initial step ``2 * mean(|x|) / sqrt(Q_P)``, per tensor or per channel.

  Args:
    x: the weights (or a first batch of activations) the step will quantize.
    qmax: largest code ``Q_P`` (e.g. 7 for signed 4-bit).
    axis: channel axis (or axes) kept for per-channel steps (shape broadcastable against ``x``).

  Returns:
    A float32 step, at least :data:`~jaxcompress.quantization.qparams.EPS`.

  Raises:
    ConfigError: if ``axis`` is out of range, ``qmax`` is not a positive integer or ``x`` is
      empty (its mean is NaN).
  """
  check_qmax(qmax)
  x = jnp.asarray(x, jnp.float32)
  check_values(x, "lsq_init_step")
  axes = reduce_axes(x.ndim, axis)
  mean_abs = jnp.mean(jnp.abs(x), axis=axes, keepdims=axes is not None)
  return jnp.maximum(2.0 * mean_abs / jnp.sqrt(jnp.asarray(qmax, jnp.float32)), EPS)


def lsq_grad_scale(n: Any, qmax: Any) -> jax.Array:
  """The paper's step-gradient scale ``g = 1 / sqrt(n * Q_P)``.

  Args:
    n: ``N``, how many values share the step (an integer >= 1).
    qmax: largest code ``Q_P`` (> 0).

  Raises:
    ConfigError: (outside ``jit`` only) if ``n`` is not an integer >= 1 or ``qmax`` not a
      positive integer: the scale would be infinite, NaN or 0.
  """
  if not isinstance(n, jax.core.Tracer):
    check_counts({"n": n})
  check_qmax(qmax)
  return 1.0 / jnp.sqrt(jnp.asarray(n, jnp.float32) * qmax)


@jax.custom_jvp
def _lsq(x, step, qmin, qmax, grad_scale):
  return (jnp.clip(jnp.round(scaled(x, step)), qmin, qmax) * step).astype(x.dtype)


@_lsq.defjvp
def _lsq_jvp(primals, tangents):
  x, step, qmin, qmax, grad_scale = primals
  dx, dstep = tangents[0], tangents[1]
  v = scaled(x, step)
  out = _lsq(x, step, qmin, qmax, grad_scale)  # itself: second derivatives stay straight-through
  inside = (v > qmin) & (v < qmax)
  dout_dstep = jnp.where(inside, jnp.round(v) - v, jnp.where(v <= qmin, qmin, qmax)) * grad_scale
  tangent = jnp.where(inside, dx, jnp.zeros_like(dx)) + (dout_dstep * dstep).astype(x.dtype)
  return out, tangent


def lsq_fake_quant(x: Any, step: Any, *, qmin: Any, qmax: Any,
                   grad_scale: Any | None = None) -> jax.Array:
  """LSQ quantize-dequantize ``round(clip(x / step, qmin, qmax)) * step`` with a learnable step.

  The forward equals :func:`~jaxcompress.quantization.fake_quant` with ``zero_point = 0``; the
  backward also differentiates ``step`` with the paper's formula (see the module docstring), scaled
  by ``grad_scale``.

  Args:
    x: values to quantize.
    step: positive step size ``s``, a scalar or per-channel array broadcastable against ``x``.
    qmin: ``-Q_N`` (e.g. -8 for signed 4-bit, 0 for unsigned activations).
    qmax: ``Q_P`` (e.g. 7, or 15 for unsigned 4-bit).
    grad_scale: ``g``; defaults to ``1 / sqrt(N * Q_P)`` with ``N = x.size / step.size``, the
      number of values sharing each step. Pass the per-example feature count for activations
      (``lsq_grad_scale(x[0].size, qmax)``), as the paper does.

  Returns:
    Quantized values with ``x``'s shape and dtype.

  Raises:
    ConfigError: (outside ``jit`` only) if ``step`` or ``grad_scale`` is not positive and
      finite, ``qmin >= qmax`` or ``qmax`` is not a positive integer.

  Example:
    >>> g = jax.grad(lambda s: lsq_fake_quant(jnp.array(0.7), s, qmin=-8, qmax=7).sum())(0.5)
  """
  check_qparams(step, qmin, qmax, field="step",
                hint="lsq_init_step gives the paper's initial step from the values")
  x = jnp.asarray(x)
  step = jnp.asarray(step, jnp.float32)
  check_shape(x, step, "step")
  if grad_scale is None:
    # an empty x has no value the scale applies to: N = 1 keeps it finite
    grad_scale = lsq_grad_scale(max(x.size // max(step.size, 1), 1), qmax)
  elif concrete(grad_scale) is not None and not np.all(np.isfinite(concrete(grad_scale))
                                                      & (concrete(grad_scale) > 0)):
    raise invalid("grad_scale", grad_scale, "finite and > 0 (the paper's 1 / sqrt(N * Q_P))")
  return _lsq(x, step, qmin, qmax, grad_scale)
