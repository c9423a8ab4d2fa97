"""Per-layer export spec: everything an integer exporter needs about each quantized layer.

For a quantized layer with kernel ``W`` and input ``x``, the fake-quantized model computes
``layer(dequantize(x_q, act_scale, act_zero_point), dequantize(W_q, weight_scale,
weight_zero_point))`` with ``x_q = quantize_int(x, act_scale, act_zero_point, qmin=act_qmin,
qmax=act_qmax)`` and ``W_q`` likewise; the spec gives exactly those numbers, so an exporter that
uses them reproduces the fake-quant model bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from jaxcompress.errors import ConfigError, check_variables
from jaxcompress.quantization.calibration import check_finite_range
from jaxcompress.quantization.fake_quant import check_qparams
from jaxcompress.quantization.layer import act_qparams, bits_at, weight_qparams
from jaxcompress.quantization.schedule import BitSchedule


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _qparams(layers: tuple, weight_bits: tuple, act_bits: tuple, kernels: list, ranges: list,
             steps: list) -> list:
  """``(weight qparams or None, input qparams or None)`` of each layer, all in one compiled
  function (one compilation for a model, not two a layer).

  Compiled, as the model computes them inside its jitted step: XLA rewrites some float arithmetic
  (a division by a constant becomes a multiplication by its reciprocal), so op-by-op evaluation
  can give a scale one ulp away from the model's, and that ulp moves inputs that sit on a rounding
  boundary to the neighbouring integer code.
  """
  return [(None if wb is None else weight_qparams(layer, kernel, step, wb),
           None if ab is None else act_qparams(layer, act_range, step, ab))
          for layer, wb, ab, kernel, act_range, step in zip(layers, weight_bits, act_bits, kernels,
                                                            ranges, steps)]


class LayerSpec(NamedTuple):
  """The integer-arithmetic description of one quantized layer (NumPy values).

  Weight fields are ``None`` when the kernel stays float, ``act_*`` fields when the input does.

  Attributes:
    path: ``/``-joined module path (the kernel is ``params[path]['kernel']``).
    kind: module class name (``Conv``: HWIO kernel; ``Dense``: ``[in, out]`` kernel).
    method: ``minmax`` or ``lsq``.
    weight_bits: kernel code width.
    weight_axis: kernel axis with one scale per channel (last axis), ``None`` per tensor.
    weight_scale: float32 scale, shape ``()`` or broadcastable against the kernel
      (``(1, 1, 1, C)`` / ``(1, C)``); for ``lsq`` the learned step.
    weight_zero_point: int32, same shape (0 for the symmetric grid).
    weight_qmin: smallest kernel code.
    weight_qmax: largest kernel code.
    act_bits: input code width.
    act_scale: float32 scalar input scale (the LSQ step for ``lsq``).
    act_zero_point: int32 scalar.
    act_qmin: smallest input code.
    act_qmax: largest input code.
    act_range: ``(lo, hi)`` calibrated real input range (``minmax``) or ``(qmin * s, qmax * s)``
      (``lsq``).
    weight: the layer's weight parameter (``kernel``, or ``embedding`` for Embed).
  """
  path: str
  kind: str
  method: str
  weight_bits: int | None = None
  weight_axis: int | None = None
  weight_scale: np.ndarray | None = None
  weight_zero_point: np.ndarray | None = None
  weight_qmin: int | None = None
  weight_qmax: int | None = None
  act_bits: int | None = None
  act_scale: np.ndarray | None = None
  act_zero_point: np.ndarray | None = None
  act_qmin: int | None = None
  act_qmax: int | None = None
  act_range: tuple[float, float] | None = None
  weight: str = "kernel"


def weight_of(params: Any, path: str, weight: str = "kernel") -> Any:
  """The weight of the quantized layer at ``path`` in nested dicts ``params``.

  Raises:
    ConfigError: ``params`` does not hold it (another model's, or not nested dicts with string
      keys: an ``nnx.State``).
  """
  node = params
  for name in path.split("/") + [weight]:
    if not isinstance(node, Mapping) or name not in node:
      raise ConfigError(f"variables['params'] has no {path}/{weight} for the quantized layer "
                        f"{path!r}; pass the variables of the model qz.init saw (an NNX "
                        "module's: variables_of(module))")
    node = node[name]
  return node


def layer_specs(variables: Any, qstate: Any, *, step: Any = None,
                bit_schedule: BitSchedule | None = None) -> dict[str, LayerSpec]:
  """The :class:`LayerSpec` of every quantized layer, in call order.

  Args:
    variables: the model variables (``variables['params']`` holds the kernels).
    qstate: the :class:`~jaxcompress.quantization.model.QuantState`.
    step: train step for a progressive bit schedule; ``None`` gives the target bits.
    bit_schedule: the quantizer's schedule (``Quantizer.specs`` fills it in).

  Returns:
    ``{path: LayerSpec}``.

  Raises:
    ConfigError: if a range or step is NaN/Inf or not positive (a silently NaN model otherwise),
      or a kernel is missing.
  """
  check_variables(variables)
  params = variables["params"]
  layers = tuple(qstate.layers)
  bits_of = lambda target: None if target is None else int(bits_at(target, bit_schedule, step))
  weight_bits = tuple(bits_of(layer.config.weight_bits) for layer in layers)
  act_bits = tuple(bits_of(layer.config.act_bits) for layer in layers)
  kernels = [None if wb is None else weight_of(params, layer.path, layer.weight)
             for layer, wb in zip(layers, weight_bits)]
  ranges = [None if ab is None else qstate.ranges.get(layer.path)
            for layer, ab in zip(layers, act_bits)]
  for layer, act_range in zip(layers, ranges):
    if act_range is not None:
      check_finite_range(f"activation range of {layer.path}", act_range[0], act_range[1])
  qparams = jax.device_get(_qparams(layers, weight_bits, act_bits, kernels, ranges,
                                    [qstate.steps.get(layer.path) for layer in layers]))
  specs = {}
  for layer, wb, ab, act_range, (weight, act) in zip(layers, weight_bits, act_bits, ranges,
                                                      qparams):
    fields = dict(path=layer.path, kind=layer.kind, method=layer.config.method,
                  weight=layer.weight)
    if weight is not None:
      scale, zero_point, qmin, qmax = weight
      check_qparams(scale, qmin, qmax, field=f"weight scale of {layer.path}")
      fields.update(weight_bits=wb, weight_axis=layer.weight_axis, weight_scale=np.asarray(scale),
                    weight_zero_point=np.asarray(zero_point), weight_qmin=int(qmin),
                    weight_qmax=int(qmax))
    if act is not None:
      scale, zero_point, qmin, qmax = act
      check_qparams(scale, qmin, qmax, field=f"activation scale of {layer.path}")
      if act_range is None:  # in float32, as the model's step has it
        act_range = (np.float32(qmin) * scale, np.float32(qmax) * scale)
      fields.update(act_bits=ab, act_scale=np.asarray(scale),
                    act_zero_point=np.asarray(zero_point), act_qmin=int(qmin), act_qmax=int(qmax),
                    act_range=(float(act_range[0]), float(act_range[1])))
    specs[layer.path] = LayerSpec(**fields)
  return specs
