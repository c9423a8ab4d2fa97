"""BatchNorm folding arithmetic: eval-mode BatchNorm as a per-channel ``x * gain + bias``.

Eval-mode BatchNorm is the affine map ``(x - mean) * g + beta`` with ``g = rsqrt(var + eps) *
gamma``; folded, it is ``x * gain + bias`` with ``gain = g`` and ``bias = beta - mean * g``. The
two forms are the same real numbers but not the same float32 operations, and a 1-ulp difference
flips a value that sits on an activation-quantization boundary of the next layer. So the export
(:mod:`jaxcompress.export.finalize`) and the fake-quant model's evaluation
(:meth:`jaxcompress.compose.Compression.eval_variables`) both compute the folded arrays with these
functions and run the folded form, and their outputs agree bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.precision import to_half
from jaxcompress.rules import tree_get

EPSILON = 1e-5  # Flax's and PyTorch's default


def bn_multiplier(scale: Any, var: Any, eps: float = EPSILON) -> np.ndarray:
  """``g = rsqrt(var + eps) * scale`` in float32, per channel, the way Flax's BatchNorm has it."""
  var = jnp.asarray(var, jnp.float32)
  return np.asarray(jax.lax.rsqrt(var + eps) * jnp.asarray(scale, jnp.float32), np.float32)


def fold_bias(bias: Any, g: np.ndarray, bn_bias: Any, mean: Any) -> np.ndarray:
  """Folded bias ``(b - mean) * g + beta`` (``b`` may be ``None``: a bias-free conv)."""
  b = np.zeros_like(g) if bias is None else np.asarray(bias, np.float32)
  return ((b - np.asarray(mean, np.float32)) * g + np.asarray(bn_bias, np.float32)).astype(
      np.float32)


def fold_arrays(params: Any, batch_stats: Any, norms: Mapping[str, float], *,
                half: bool = False) -> dict:
  """``{norm path: (gain, bias)}`` of the BatchNorms ``norms`` (``{path: epsilon}``).

  ``gain = rsqrt(var + eps) * scale`` and ``bias = beta - mean * gain`` in float32 (scale 1 and
  beta 0 where the BatchNorm has none): the arrays the export stores and the fake-quant model's
  evaluation uses, computed here once for both. ``half``: each then rounded to float16 values
  (:func:`jaxcompress.precision.to_half`), still float32 arrays, as an export with float16 side
  arrays stores them.

  Raises:
    ConfigError: if a BatchNorm has no running statistics in ``batch_stats``.
  """
  params, batch_stats = jax.device_get(params), jax.device_get(batch_stats)
  out = {}
  for path, eps in norms.items():
    stats, p = tree_get(batch_stats or {}, path) or {}, tree_get(params, path) or {}
    if "mean" not in stats or "var" not in stats:
      raise ConfigError(f"BatchNorm {path!r} has no running statistics in "
                        "variables['batch_stats']; pass the full model variables")
    mean, var = stats["mean"], stats["var"]
    gain = bn_multiplier(p.get("scale", jnp.ones_like(var)), var, eps)
    out[path] = (gain, fold_bias(None, gain, p.get("bias", jnp.zeros_like(mean)), mean))
    if half:
      out[path] = tuple(np.asarray(to_half(a)) for a in out[path])
  return out
