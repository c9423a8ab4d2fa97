"""The model an artifact rebuilds: a folded Flax model of the same family plus input fake-quant.

The finalized layers become ordinary float32 variables of ``get_model(name, **model_kwargs)``
(for the CIFAR ResNets ``folded=True`` and, after surgery, ``inner_widths``): each kernel is its
dequantized, BatchNorm-folded value. Layers whose input the fake-quant model quantized get the
same input quantization here, by intercepting their ``__call__`` (``flax.linen.intercept_methods``)
with the stored ``(scale, zero_point, qmin, qmax)``, so the rebuilt model computes what the
fake-quant model computed, up to float rounding of the fold.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.export.codec import LayerTensor
from jaxcompress.models import get_model
from jaxcompress.quantization import fake_quant

LAYER_TYPES = (nn.Conv, nn.Dense)


def input_quantizer(acts: Mapping[str, dict]) -> Callable:
  """An interceptor that fake-quantizes the input of every layer named in ``acts``."""
  acts = {p: (np.float32(a["scale"]), int(a["zero_point"]), int(a["qmin"]), int(a["qmax"]))
          for p, a in acts.items()}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not args or not isinstance(module, LAYER_TYPES):
      return next_fun(*args, **kwargs)
    act = acts.get("/".join(module.path))
    if act is None:
      return next_fun(*args, **kwargs)
    scale, zero_point, qmin, qmax = act
    x = fake_quant(args[0], scale, zero_point, qmin=qmin, qmax=qmax)
    return next_fun(x, *args[1:], **kwargs)

  return interceptor


def make_apply_fn(model: nn.Module, acts: Mapping[str, dict]) -> Callable:
  """``apply_fn(variables, x) -> logits``: the model in eval mode with quantized layer inputs."""
  interceptor = input_quantizer(acts)

  def apply_fn(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x)

  return apply_fn


def layer_variables(layers: Mapping[str, LayerTensor]) -> dict:
  """``{'params': ...}`` with each layer's real kernel and bias (float32 NumPy)."""
  flat = {}
  for path, t in layers.items():
    flat[(*path.split("/"), "kernel")] = t.kernel()
    if t.bias is not None:
      flat[(*path.split("/"), "bias")] = np.asarray(t.bias, np.float32)
  return {"params": flax.traverse_util.unflatten_dict(flat)}


def build_model(name: str, num_classes: int, model_kwargs: Mapping[str, Any],
                input_shape: tuple[int, ...], variables: Mapping[str, Any], *,
                field: str = "model.exported") -> nn.Module:
  """Rebuilds the model and checks that ``variables`` has exactly the shapes it needs.

  Raises:
    ConfigError: naming the first missing, extra or wrongly shaped parameter.
  """
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_kwargs.items()
            if v is not None}
  model = get_model(name, num_classes, field=f"{field} model", **kwargs)
  ref = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                          np.zeros((1, *input_shape), np.float32)))
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(ref), sep="/")
  have = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
  for key in sorted(set(want) | set(have)):
    if key not in have:
      raise ConfigError(f"{field}: the artifact has no {key!r}, which {name} needs; the spec "
                        "does not match this model")
    if key not in want:
      raise ConfigError(f"{field}: the artifact holds {key!r}, which {name} does not have; the "
                        "spec does not match this model")
    if tuple(want[key].shape) != tuple(np.shape(have[key])):
      raise ConfigError(f"{field}: {key} has shape {list(np.shape(have[key]))} in the artifact, "
                        f"{name} with {dict(kwargs)} needs {list(want[key].shape)}; the spec "
                        "does not match the arrays")
  return model


class LoadedModel:
  """A callable exported model.

  Attributes:
    model: the Flax module (e.g. a folded ``CifarResNet`` with ``inner_widths``).
    variables: its float32 variables (``{'params': ...}``, BatchNorm folded in).
    apply_fn: ``apply_fn(variables, x) -> logits`` with the input fake-quantization.
    spec: the artifact's JSON spec.
    layers: ``{path: LayerTensor}`` as stored (integer codes, scales, codebooks).
  """

  def __init__(self, model: nn.Module, variables: dict, apply_fn: Callable, spec: dict,
               layers: Mapping[str, LayerTensor]):
    self.model, self.variables, self.apply_fn, self.spec = model, variables, apply_fn, spec
    self.layers = dict(layers)
    self._jitted = jax.jit(apply_fn)

  def logits(self, x: Any) -> jax.Array:
    """Logits for a batch of (normalised) images, jitted."""
    return self._jitted(self.variables, x)

  def __iter__(self):  # (model, variables, apply_fn) = load(...)
    return iter((self.model, self.variables, self.apply_fn))
