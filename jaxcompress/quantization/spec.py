"""Per-layer export spec: everything an integer exporter needs about each quantized layer.

For a quantized layer with kernel ``W`` and input ``x``, the fake-quantized model computes
``layer(dequantize(x_q, act_scale, act_zero_point), dequantize(W_q, weight_scale,
weight_zero_point))`` with ``x_q = quantize_int(x, act_scale, act_zero_point, qmin=act_qmin,
qmax=act_qmax)`` and ``W_q`` likewise; the spec gives exactly those numbers, so an exporter that
uses them reproduces the fake-quant model bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxcompress.errors import ConfigError, check_variables
from jaxcompress.quantization.calibration import check_finite_range
from jaxcompress.quantization.fake_quant import check_qparams
from jaxcompress.quantization.layer import act_qparams, bits_at, weight_qparams
from jaxcompress.quantization.schedule import BitSchedule


# The quantization parameters compiled, as the model computes them inside its jitted step: XLA
# rewrites some float arithmetic (a division by a constant becomes a multiplication by its
# reciprocal), so op-by-op evaluation can give a scale one ulp away from the model's, and that ulp
# moves inputs that sit on a rounding boundary to the neighbouring integer code.
_weight_qparams = jax.jit(weight_qparams, static_argnums=(0, 3))
_act_qparams = jax.jit(act_qparams, static_argnums=(0, 3))


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


def _kernel(params: Any, path: str, weight: str = "kernel") -> Any:
  node = params
  for name in path.split("/") + [weight]:
    if not isinstance(node, dict) or name not in node:
      raise ConfigError(f"variables['params'] has no {path}/{weight} for the quantized layer "
                        f"{path!r}; pass the variables of the model qz.init saw")
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
  specs = {}
  for layer in qstate.layers:
    cfg, steps = layer.config, qstate.steps.get(layer.path)
    fields = dict(path=layer.path, kind=layer.kind, method=cfg.method, weight=layer.weight)
    if cfg.weight_bits is not None:
      bits = int(bits_at(cfg.weight_bits, bit_schedule, step))
      kernel = _kernel(params, layer.path, layer.weight)
      scale, zero_point, qmin, qmax = _weight_qparams(layer, kernel, steps, bits)
      check_qparams(scale, qmin, qmax, field=f"weight scale of {layer.path}")
      fields.update(weight_bits=bits, weight_axis=layer.weight_axis, weight_scale=np.asarray(scale),
                    weight_zero_point=np.asarray(zero_point), weight_qmin=int(qmin),
                    weight_qmax=int(qmax))
    if cfg.act_bits is not None:
      bits = int(bits_at(cfg.act_bits, bit_schedule, step))
      act_range = qstate.ranges.get(layer.path)
      if act_range is not None:
        check_finite_range(f"activation range of {layer.path}", act_range[0], act_range[1])
      scale, zero_point, qmin, qmax = _act_qparams(layer, act_range, steps, bits)
      check_qparams(scale, qmin, qmax, field=f"activation scale of {layer.path}")
      if act_range is None:
        act_range = (qmin * scale, qmax * scale)
      fields.update(act_bits=bits, act_scale=np.asarray(scale),
                    act_zero_point=np.asarray(zero_point), act_qmin=int(qmin), act_qmax=int(qmax),
                    act_range=(float(act_range[0]), float(act_range[1])))
    specs[layer.path] = LayerSpec(**fields)
  return specs
