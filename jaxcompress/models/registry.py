"""Model registry by name, and building a model with its initial variables from a config."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from jaxcompress.errors import unknown
from jaxcompress.models.cnn import MLP, CifarCNN, MnistCNN
from jaxcompress.models.resnet import CifarResNet
from jaxcompress.models.torch_import import load_pytorch_npz

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": (lambda d=d, **kw: CifarResNet(depth=d, **kw)) for d in (20, 32, 44, 56, 110)},
    "cnn_mnist": MnistCNN,
    "cnn_cifar": CifarCNN,
    "mlp": MLP,
}


def model_names() -> list[str]:
  """Names accepted by :func:`get_model`."""
  return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, *, field: str = "model.name",
              **kwargs: Any) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: one of :func:`model_names` (``resnet20`` ... ``resnet110``, ``cnn_mnist``,
      ``cnn_cifar``, ``mlp``).
    num_classes: size of the classifier output.
    field: config field name used in the error message.
    **kwargs: extra module attributes (e.g. ``inner_widths`` for a channel-pruned ResNet).

  Returns:
    An (unbound) Flax Linen module.

  Raises:
    ConfigError: for an unknown name.
  """
  if name not in _REGISTRY:
    raise unknown(field, name, _REGISTRY)
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


def create_model(name: str, *, num_classes: int, image_shape: tuple[int, ...],
                 weights: str | None = None, seed: int = 0,
                 field: str = "model") -> tuple[nn.Module, dict]:
  """Builds a registered model and its variables: imported from ``weights`` or freshly initialised.

  Args:
    name: registry name.
    num_classes: classifier width.
    image_shape: ``(H, W, C)`` of one input.
    weights: optional PyTorch-layout ``.npz`` state dict to import.
    seed: initialisation seed when ``weights`` is empty.
    field: config section name, for messages (``model``, ``teacher``, ``student``).

  Returns:
    ``(model, variables)`` with ``variables['params']`` and, for BatchNorm models,
    ``variables['batch_stats']``, as float32 arrays.
  """
  model = get_model(name, num_classes, field=f"{field}.name")
  sample = np.zeros((1, *image_shape), np.float32)
  if weights:
    variables = load_pytorch_npz(model, weights, input_shape=sample.shape,
                                 field=f"{field}.weights")
    variables = jax.tree.map(jax.numpy.asarray, variables)
  else:
    variables = jax.jit(lambda: model.init(jax.random.key(seed), sample))()
  return model, dict(variables)
