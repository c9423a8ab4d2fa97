"""The small models of the original design notes: two CNNs and an MLP."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn


class MnistCNN(nn.Module):
  """conv 32 - conv 64 - maxpool 2 - dense 128 - dense ``num_classes`` (3x3 convs, ReLU)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    return nn.Dense(self.num_classes, name="fc2")(x)


class CifarCNN(nn.Module):
  """conv 64 - conv 128 - avgpool 4 - dense ``num_classes`` (3x3 convs, ReLU)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(64, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(128, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (4, 4), (4, 4))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name="fc")(x)


class MLP(nn.Module):
  """Flatten, then ``hidden`` ReLU layers, then a linear classifier."""
  num_classes: int = 10
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)
