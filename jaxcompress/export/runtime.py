"""The model an artifact rebuilds: a folded Flax model of the same family, run by ``apply_fn``.

The finalized layers become float32 variables of ``get_model(name, **model_kwargs)`` (for the CIFAR
ResNets ``folded=True`` and, after surgery, ``inner_widths``): ``params`` holds each dequantized
kernel and folded bias, and the extra collection ``fold`` holds the BatchNorm gain of quantized
layers. ``apply_fn`` intercepts every Conv/Dense call (``flax.linen.intercept_methods``):

- its input is fake-quantized with the stored ``(scale, zero_point, qmin, qmax)``, as the
  fake-quant model quantized it; scale and zero point are read from the variables' ``act``
  collection, so they are inputs of the compiled function as they are in the fake-quant model
  (XLA turns a division by a compile-time constant into a multiplication by its reciprocal, which
  rounds differently now and then);
- with a gain, the layer runs without bias and returns ``y * gain + bias``, so its kernel stays
  the very kernel fake quantization used (see :mod:`.fold`).

The rebuilt model thus computes what the fake-quant model computed; evaluated with its ``fold``
collection (:mod:`jaxcompress.models.batchnorm`) and its quantization state as an input of the
compiled function (as in a train or eval step), the fake-quant model runs the same float32
operations, and the logits agree bit for bit. ``model.apply`` alone (without ``apply_fn``)
ignores all this and is not the exported model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.export.codec import LayerTensor
from jaxcompress.models import get_model
from jaxcompress.quantization import fake_quant

LAYER_TYPES = (nn.Conv, nn.Dense)
ACT = "act"  # collection of the input scales and zero points


def exported_layers(acts: Mapping[str, dict]) -> Callable:
  """An interceptor: fake-quantized inputs of the layers in ``acts``; output gains from ``fold``.

  A layer's input scale and zero point come from its ``act`` variables when the variables hold
  them (:func:`layer_variables` puts them there), else from ``acts``.
  """
  acts = {p: (np.float32(a["scale"]), int(a["zero_point"]), int(a["qmin"]), int(a["qmax"]))
          for p, a in acts.items()}
  inside = [False]  # the gain path runs a clone of the layer, which must not be intercepted

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (inside[0] or context.method_name != "__call__" or not args
        or not isinstance(module, LAYER_TYPES)):
      return next_fun(*args, **kwargs)
    x, act = args[0], acts.get("/".join(module.path))
    if act is not None:
      scale, zero_point, qmin, qmax = act
      if module.has_variable(ACT, "scale"):
        scale = module.get_variable(ACT, "scale")
        zero_point = module.get_variable(ACT, "zero_point")
      x = fake_quant(x, scale, zero_point, qmin=qmin, qmax=qmax)
    if not module.has_variable("fold", "gain"):
      return next_fun(x, *args[1:], **kwargs)
    params = module.variables["params"]
    bias = params["bias"]
    inside[0] = True
    try:
      y = module.clone(parent=None).apply(
          {"params": {**params, "bias": jnp.zeros_like(bias)}}, x, *args[1:], **kwargs)
    finally:
      inside[0] = False
    return y * module.get_variable("fold", "gain") + bias

  return interceptor


def make_apply_fn(model: nn.Module, acts: Mapping[str, dict]) -> Callable:
  """``apply_fn(variables, x) -> logits``: the exported model (see the module docstring)."""
  interceptor = exported_layers(acts)

  def apply_fn(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x)

  return apply_fn


def layer_variables(layers: Mapping[str, LayerTensor], *, fold_gain: bool = False) -> dict:
  """Variables of the exported model (float32 NumPy).

  Args:
    layers: the finalized layers.
    fold_gain: multiply gains into the kernels (``LayerTensor.folded_kernel``) for a plain
      ``model.apply``; by default they go to the ``fold`` collection that ``apply_fn`` applies.

  Returns:
    ``{'params': {path: {'kernel', 'bias'}}}``; unless ``fold_gain``, ``{'fold': {path:
    {'gain'}}}`` for the layers with a gain; ``{'act': {path: {'scale', 'zero_point'}}}`` for the
    layers with quantized inputs.
  """
  params, fold, act = {}, {}, {}
  for path, t in layers.items():
    key = tuple(path.split("/"))
    params[(*key, "kernel")] = t.folded_kernel() if fold_gain else t.kernel()
    if t.bias is not None:
      params[(*key, "bias")] = np.asarray(t.bias, np.float32)
    if t.gain is not None and not fold_gain:
      fold[(*key, "gain")] = np.asarray(t.gain, np.float32)
    if t.act is not None:
      act[(*key, "scale")] = np.float32(t.act["scale"])
      act[(*key, "zero_point")] = np.int32(t.act["zero_point"])
  out = {"params": flax.traverse_util.unflatten_dict(params)}
  for name, tree in (("fold", fold), (ACT, act)):
    if tree:
      out[name] = flax.traverse_util.unflatten_dict(tree)
  return out


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
  for key in [k for k in have if k.startswith("fold/")]:  # gains: one per output channel
    bias = f"params/{key[len('fold/'):-len('/gain')]}/bias"
    if bias in want:
      want[key] = want[bias]
  for key in [k for k in have if k.startswith(f"{ACT}/")]:  # input scale, zero point: scalars
    if f"params/{key[len(ACT) + 1:].rpartition('/')[0]}/kernel" in want:
      want[key] = jax.ShapeDtypeStruct((), np.float32)
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
    variables: its float32 variables (``params`` and the ``fold`` gains, see the module
      docstring).
    apply_fn: ``apply_fn(variables, x) -> logits``: the exported model.
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
