"""CIFAR ResNets (He et al. 2016, section 4.2) with the parameter-free option-A shortcut.

Module names mirror the PyTorch reference (Idelbayev, 2018) so that imported weights and regex
rules read the same in both: ``conv1``, ``bn1``, ``layer{stage}_{block}/conv1``, ``linear``.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.models.batchnorm import EPSILON

STAGE_WIDTHS = (16, 32, 64)
BN_EPSILON = EPSILON
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1

# PyTorch pads a stride-2 3x3 conv by 1 on every side; Flax "SAME" would pad (0, 1).
PAD1 = ((1, 1), (1, 1))


def shortcut_a(x: jnp.ndarray, planes: int) -> jnp.ndarray:
  """Option-A shortcut: subsample by 2 and zero-pad ``planes // 4`` channels on each side.

  Args:
    x: NHWC activations with ``planes // 2`` channels.
    planes: the channel count after the block.

  Returns:
    ``x[:, ::2, ::2, :]`` with channels padded to ``planes``.
  """
  pad = planes // 4
  return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))


def conv_bn(x, features: int, stride: int, conv_name: str, bn_name: str, train: bool,
            folded: bool):
  """3x3 conv (PyTorch padding 1) then BatchNorm; with ``folded``, a biased conv alone."""
  x = nn.Conv(features, (3, 3), (stride, stride), padding=PAD1, use_bias=folded,
              name=conv_name)(x)
  if folded:
    return x
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=bn_name)(x)


class BasicBlock(nn.Module):
  """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus shortcut, then ReLU.

  ``inner`` is the width of the first conv (equal to ``planes`` in the original model; smaller after
  structured channel pruning). The block's output width is always ``planes``. With ``folded``
  every BatchNorm has been folded into the conv before it (export): convs carry a bias, no BN.
  """
  planes: int
  stride: int = 1
  inner: int | None = None
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    inner = self.inner or self.planes
    out = conv_bn(x, inner, self.stride, "conv1", "bn1", train, self.folded)
    out = nn.relu(out)
    out = conv_bn(out, self.planes, 1, "conv2", "bn2", train, self.folded)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = shortcut_a(x, self.planes)
    return nn.relu(out + x)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs.

  Attributes:
    depth: 20, 32, 44, 56, 110, ... (any ``6n + 2``).
    num_classes: size of the final linear layer.
    inner_widths: optional width of every block's first conv, in block order (``3n`` entries);
      used by structured channel pruning to build the physically smaller model.
    folded: BatchNorm folded into the preceding convs (biased convs, no BN), as exported.
  """
  depth: int = 20
  num_classes: int = 10
  inner_widths: Sequence[int] | None = None
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ConfigError(f"model depth must be 6n+2 (20, 32, 44, 56, 110), got {self.depth}")
    n = (self.depth - 2) // 6
    if self.inner_widths is not None and len(self.inner_widths) != 3 * n:
      raise ConfigError(f"inner_widths must have {3 * n} entries for depth {self.depth}, "
                        f"got {len(self.inner_widths)}")
    x = nn.relu(conv_bn(x, STAGE_WIDTHS[0], 1, "conv1", "bn1", train, self.folded))
    k = 0
    for stage, planes in enumerate(STAGE_WIDTHS):
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        inner = self.inner_widths[k] if self.inner_widths is not None else None
        x = BasicBlock(planes, stride, inner, self.folded,
                       name=f"layer{stage + 1}_{block}")(x, train)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="linear")(x)
