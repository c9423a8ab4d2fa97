"""BatchNorm whose eval mode can run in folded form: ``x * gain + bias`` per channel.

Eval-mode BatchNorm is the affine map ``(x - mean) * g + beta`` with ``g = rsqrt(var + eps) *
gamma``; the export folds it into a per-channel ``gain = g`` and ``bias = beta - mean * g``
(:mod:`jaxcompress.export.fold`). The two forms are the same real numbers but not the same float32
operations, and a 1-ulp difference flips a value that sits on an activation-quantization boundary
of the next layer; such flips then propagate. Given the ``fold`` collection of
:func:`fold_collection`, the very arrays the export stores, :class:`BatchNorm` computes the folded
form itself, so a fake-quant model evaluated with it and its exported artifact run the same float32
arithmetic and agree bit for bit (tested). Training never uses the collection.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FOLD = "fold"
EPSILON = 1e-5  # Flax's and PyTorch's default


class BatchNorm(nn.BatchNorm):
  """``flax.linen.BatchNorm``; in eval mode, with a ``fold`` collection, ``x * gain + bias``."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, **kwargs):
    running = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    if running and self.has_variable(FOLD, "gain"):
      return x * self.get_variable(FOLD, "gain") + self.get_variable(FOLD, "bias")
    return super().__call__(x, use_running_average, **kwargs)


def bn_multiplier(scale: Any, var: Any, eps: float = EPSILON) -> np.ndarray:
  """``g = rsqrt(var + eps) * scale`` in float32, per channel, the way Flax's BatchNorm has it."""
  var = jnp.asarray(var, jnp.float32)
  return np.asarray(jax.lax.rsqrt(var + eps) * jnp.asarray(scale, jnp.float32), np.float32)


def fold_bias(bias: Any, g: np.ndarray, bn_bias: Any, mean: Any) -> np.ndarray:
  """Folded bias ``(b - mean) * g + beta`` (``b`` may be ``None``: a bias-free conv)."""
  b = np.zeros_like(g) if bias is None else np.asarray(bias, np.float32)
  return ((b - np.asarray(mean, np.float32)) * g + np.asarray(bn_bias, np.float32)).astype(
      np.float32)


def fold_collection(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                    eps: float = EPSILON) -> dict:
  """``{bn path...: {'gain', 'bias'}}`` for every BatchNorm, as the export folds it.

  Args:
    params: model parameters; a BatchNorm is a node with ``scale`` and ``bias``.
    batch_stats: running statistics; ``mean`` and ``var`` at the same paths.
    eps: BatchNorm epsilon.

  Returns:
    The nested ``fold`` collection (NumPy float32), empty for a model without BatchNorm.
  """
  stats = flax.traverse_util.flatten_dict(jax.device_get(batch_stats))
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for key in stats:
    if key[-1] != "mean" or key[:-1] + ("var",) not in stats:
      continue
    path = key[:-1]
    if path + ("scale",) not in flat or path + ("bias",) not in flat:
      continue
    g = bn_multiplier(flat[path + ("scale",)], stats[path + ("var",)], eps)
    out[path + ("gain",)] = g
    out[path + ("bias",)] = fold_bias(None, g, flat[path + ("bias",)], stats[key])
  return flax.traverse_util.unflatten_dict(out)
