"""BatchNorm folding: a conv followed by BatchNorm (eval mode) becomes one biased conv.

BatchNorm in eval mode computes ``(y - mean) * g + beta`` per output channel with
``g = gamma / sqrt(var + eps)``. For ``y = conv(x, W) + b`` that is
``conv(x, W * g) + (b - mean) * g + beta``: the kernel's output channels (its last axis) are
multiplied by ``g`` and the bias becomes ``(b - mean) * g + beta``.

A quantized kernel ``W = (q - zp) * s`` folds without touching it: the folded layer is
``conv(x, (q - zp) * s) * g + (b - mean) * g + beta``, i.e. the integers ``q`` and scale ``s``
fake quantization used, then a per-channel gain ``g`` and bias. Multiplying ``g`` into the kernel
instead would be the same real number but not the same float32 conv: on a one-shot pruned
ResNet-20 that cost 0.08 % of the predictions against the fake-quant model, this form 0.04 %.
The remaining 0.04 % was BatchNorm's own rounding, ``(y - mean) * g + beta`` against
``y * g + bias``; evaluated with the ``fold`` collection of
:func:`jaxcompress.models.batchnorm.fold_collection` (the gains and biases computed here), the
fake-quant model runs the folded form too and the artifact reproduces its logits exactly.

Which BatchNorm follows which conv is read from the module names, the convention of the CIFAR
ResNets and the PyTorch models they mirror: ``.../convK`` is followed by ``.../bnK`` in the same
parent module (``conv1`` -> ``bn1``, ``layer1_0/conv2`` -> ``layer1_0/bn2``).

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018 (section 3.2, batch normalization folding).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.models.batchnorm import bn_multiplier, fold_bias
from jaxcompress.models.resnet import BN_EPSILON

_CONV_NAME = re.compile(r"(.*?)conv(\d*)$")


def bn_path(conv_path: str) -> str | None:
  """The BatchNorm that follows a conv by naming convention: ``a/conv2`` -> ``a/bn2``."""
  parent, _, name = conv_path.rpartition("/")
  m = _CONV_NAME.fullmatch(name)
  if not m:
    return None
  return f"{parent}/{m.group(1)}bn{m.group(2)}" if parent else f"{m.group(1)}bn{m.group(2)}"


def subtree(tree: Mapping[str, Any], path: str) -> Any:
  """The node at a ``/``-joined path of a nested dict, or ``None``."""
  node = tree
  for name in path.split("/"):
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
  return node


def fold_bn(kernel: Any, bias: Any, bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any],
            eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
  """Folds a BatchNorm into the float conv or dense layer before it.

  Args:
    kernel: the layer's kernel; output channels on the last axis (HWIO, or ``[in, out]``).
    bias: the layer's bias or ``None``.
    bn_params: ``{'scale': gamma, 'bias': beta}``.
    bn_stats: ``{'mean': ..., 'var': ...}`` running statistics.
    eps: BatchNorm epsilon.

  Returns:
    ``(kernel * g, (bias - mean) * g + beta)``, float32.
  """
  g = bn_multiplier(bn_params["scale"], bn_stats["var"], eps)
  return ((np.asarray(kernel, np.float32) * g).astype(np.float32),
          fold_bias(bias, g, bn_params["bias"], bn_stats["mean"]))


def find_bn(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None,
            layer_path: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
  """``(bn params, bn stats)`` of the BatchNorm after ``layer_path``, or ``None`` if there is none.

  Raises:
    ConfigError: if the BatchNorm has parameters but no running statistics.
  """
  path = bn_path(layer_path)
  bn = subtree(params, path) if path else None
  if bn is None:
    return None
  stats = subtree(batch_stats or {}, path)
  if stats is None or "mean" not in stats or "var" not in stats:
    raise ConfigError(f"variables['batch_stats'] has no {path}/mean and {path}/var to fold "
                      f"BatchNorm {path!r} into {layer_path!r}; pass the full model variables "
                      "(params and batch_stats)")
  return bn, stats
