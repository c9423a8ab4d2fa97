"""Model registry: every model jaxcompress trains or compresses, by name."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxcompress.errors import unknown
from jaxcompress.models.cnn import MLP, CifarCNN, MnistCNN
from jaxcompress.models.resnet import CifarResNet
from jaxcompress.models.torch_import import load_pytorch_npz, torch_to_flax

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": (lambda d=d, **kw: CifarResNet(depth=d, **kw)) for d in (20, 32, 44, 56, 110)},
    "cnn_mnist": MnistCNN,
    "cnn_cifar": CifarCNN,
    "mlp": MLP,
}


def model_names() -> list[str]:
  """Names accepted by :func:`get_model`."""
  return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: one of :func:`model_names` (``resnet20`` ... ``resnet110``, ``cnn_mnist``,
      ``cnn_cifar``, ``mlp``).
    num_classes: size of the classifier output.
    **kwargs: extra module attributes (e.g. ``inner_widths`` for a channel-pruned ResNet).

  Returns:
    An (unbound) Flax Linen module.

  Raises:
    ConfigError: for an unknown name.
  """
  if name not in _REGISTRY:
    raise unknown("model.name", name, _REGISTRY)
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


__all__ = ["CifarResNet", "MnistCNN", "CifarCNN", "MLP", "get_model", "model_names",
           "load_pytorch_npz", "torch_to_flax"]
