"""Models defined outside the library, for the main job's ``MODULE:FACTORY`` names.

  python -m experiments.cifar_distill --config=configs/cifar_distill.py:quick \
      --workdir=runs/own_nnx --config.student.name=examples.cifar_models:vgg_nnx \
      --config.student.weights= --config.distill.feature_weight=0

A factory takes ``num_classes`` (and ``rngs`` for an NNX module) and returns the module.
"""

from __future__ import annotations

import flax.linen as nn
from flax import nnx

WIDTHS = (32, 32, "pool", 64, 64, "pool", 128)


class VGGNNX(nnx.Module):
  """A small VGG-style CNN in Flax NNX: 3x3 conv + BatchNorm + ReLU blocks, global pooling."""

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    convs, norms, cin = [], [], 3
    for w in WIDTHS:
      if w != "pool":
        convs.append(nnx.Conv(cin, w, (3, 3), use_bias=False, rngs=rngs))
        norms.append(nnx.BatchNorm(w, momentum=0.9, rngs=rngs))
        cin = w
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    i = 0
    for w in WIDTHS:
      if w == "pool":
        x = nnx.max_pool(x, (2, 2), (2, 2))
      else:
        x = nnx.relu(self.norms[i](self.convs[i](x)))
        i += 1
    return self.head(x.mean((1, 2)))


class VGGLinen(nn.Module):
  """The same network in Flax Linen, with a ``train`` flag."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in WIDTHS:
      if w == "pool":
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.Conv(w, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def vgg_nnx(num_classes: int, rngs: nnx.Rngs) -> VGGNNX:
  return VGGNNX(num_classes, rngs=rngs)


def vgg_linen(num_classes: int) -> VGGLinen:
  return VGGLinen(num_classes)
