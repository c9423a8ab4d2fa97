"""The quantizers of one Conv/Dense layer: its kernel and its input.

Pure array functions shared by the model interception (:mod:`.model`), the PTQ calibration
(:mod:`.ptq`) and the export spec (:mod:`.spec`), so all three compute exactly the same grid.

- Kernel, ``minmax``: per-channel (last kernel axis) or per-tensor min-max parameters of the current
  kernel, recomputed every step (no gradient through them), then :func:`fake_quant` (STE).
- Kernel, ``lsq``: a learned step ``s`` on the signed grid, :func:`lsq_fake_quant`.
- Input, ``minmax``: asymmetric (or symmetric) parameters of the layer's moving-average range
  ``[lo, hi]``, then :func:`fake_quant`.
- Input, ``lsq``: a learned scalar step; unsigned grid ``[0, 2^b - 1]`` (the paper's choice for
  post-ReLU inputs) when the input was non-negative at ``init``, signed otherwise.

Under a progressive bit schedule a layer runs at ``bits >= target``. LSQ steps are the steps of the
target grid; at more bits the step used is ``s * qmax(target) / qmax(bits)``, so the clipping range
stays where training put it while the grid gets finer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import invalid
from jaxcompress.precision import to_half
from jaxcompress.quantization.calibration import check_finite_range
from jaxcompress.quantization.config import LayerConfig
from jaxcompress.quantization.fake_quant import (_fake_quant, check_qparams, dequantize,
                                                   quantize_int)
from jaxcompress.quantization.lsq import _lsq, lsq_grad_scale, lsq_init_step
from jaxcompress.quantization.qparams import EPS, minmax_qparams, qparams_from_range, qrange


class QuantLayer(NamedTuple):
  """The static description of one quantized layer (hashable; part of the state's treedef).

  Attributes:
    path: ``/``-joined module path, e.g. ``layer1_0/conv1``.
    kind: the module class name (``Conv``, ``Dense``, ``Linear``, ``Embed``, ...).
    config: the :class:`LayerConfig` its rule gave it.
    weight_axis: weight axis with one scale per channel (the output axis: ``kernel.ndim - 1``,
      an Einsum's output letter; the vocabulary axis 0 of an embedding), a tuple of axes with
      one scale per entry of their product (a ``DenseGeneral`` to ``(heads, dim)``: ``(1, 2)``;
      a weight stacked by ``nn.scan``: the step axis too), or ``None`` for per-tensor.
    act_signed: the input held negative values at ``init`` (decides the LSQ input grid).
    act_features: input values per example (``N_F`` of the LSQ gradient scale).
    weight: the parameter that holds the weight (``kernel``; ``embedding`` for Embed).
  """
  path: str
  kind: str
  config: LayerConfig
  weight_axis: int | tuple[int, ...] | None
  act_signed: bool
  act_features: int
  weight: str = "kernel"


def scale_axes(weight_axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
  """``weight_axis`` as a tuple of non-negative axes of a weight of ``ndim`` axes (``()``:
  one scale for the whole weight).

  Raises:
    ConfigError: for an axis that is no integer in ``[-ndim, ndim)``, or a repeated one.
  """
  if weight_axis is None:
    return ()
  axes = weight_axis if isinstance(weight_axis, (tuple, list)) else (weight_axis,)
  if (any(isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer))
          or not -ndim <= a < ndim for a in axes)
      or len({int(a) % ndim for a in axes}) != len(axes)):
    raise invalid("weight_axis", weight_axis, f"None, an axis in [{-ndim}, {ndim}) or a tuple "
                  f"of distinct ones for a {ndim}-d weight")
  return tuple(int(a) % ndim for a in axes)


def channels_last(weight_axis: int | tuple[int, ...] | None, ndim: int) -> bool:
  """Whether a weight of ``ndim`` axes has one scale per output channel along its last axis
  alone: the scales a following BatchNorm's gain can go into (``weight_axis`` may count from the
  end)."""
  return ndim >= 1 and scale_axes(weight_axis, ndim) == (ndim - 1,)


def half_scaled(weight_axis: int | tuple[int, ...] | None, ndim: int) -> bool:
  """Whether a weight of ``ndim`` axes has its scales along axes that include its last (a Dense
  or Conv's output channels, a ``DenseGeneral``'s ``(heads, dim)``, a stacked weight's steps and
  channels): the scales the export stores in float16 under ``scale_dtype='float16'``."""
  return ndim >= 1 and ndim - 1 in scale_axes(weight_axis, ndim)


def bits_at(target: int | None, schedule: Any, step: Any) -> Any:
  """Bits a layer uses at ``step``: ``max(target, schedule(step))``; without schedule ``target``."""
  if target is None or schedule is None or step is None:
    return target
  return jnp.maximum(target, schedule(step))


def act_grid(layer: QuantLayer, bits: Any) -> tuple[Any, Any]:
  """``(qmin, qmax)`` of the layer's input at ``bits``."""
  cfg = layer.config
  return qrange(bits, layer.act_signed if cfg.method == "lsq" else cfg.act_symmetric)


def _target_step(step: jax.Array, target: int, bits: Any, signed: bool) -> jax.Array:
  """An LSQ step learned for ``target`` bits, rescaled to ``bits`` (same clipping range).

  The step used is ``max(|step|, EPS)``: an optimizer update that carries a learned step across
  zero (Adam moves it by about the learning rate, whatever its size) leaves a valid grid, and
  the gradient pushes it back up."""
  step = jnp.maximum(jnp.abs(step), EPS)
  if isinstance(bits, int) and bits == target:
    return step
  return step * (qrange(target, signed)[1] / qrange(bits, signed)[1])


def weight_qparams(layer: QuantLayer, kernel: Any, steps: dict | None,
                   bits: Any) -> tuple[jax.Array, jax.Array, Any, Any]:
  """``(scale, zero_point, qmin, qmax)`` of the layer's kernel at ``bits``."""
  cfg = layer.config
  qmin, qmax = qrange(bits, cfg.symmetric)
  if cfg.method == "lsq":
    scale = _target_step(steps["weight"], cfg.weight_bits, bits, True)
    return scale, jnp.zeros(scale.shape, jnp.int32), qmin, qmax
  return minmax_qparams(jax.lax.stop_gradient(kernel), bits=bits, axis=layer.weight_axis,
                        symmetric=cfg.symmetric)


def act_qparams(layer: QuantLayer, act_range: Any, steps: dict | None,
                bits: Any) -> tuple[jax.Array, jax.Array, Any, Any]:
  """``(scale, zero_point, qmin, qmax)`` of the layer's input at ``bits``."""
  cfg = layer.config
  qmin, qmax = act_grid(layer, bits)
  if cfg.method == "lsq":
    scale = _target_step(steps["act"], cfg.act_bits, bits, layer.act_signed)
    return scale, jnp.zeros(scale.shape, jnp.int32), qmin, qmax
  scale, zero_point = qparams_from_range(act_range[0], act_range[1], qmin=qmin, qmax=qmax,
                                         symmetric=cfg.act_symmetric)
  return scale, zero_point, qmin, qmax


def quantize_kernel(layer: QuantLayer, kernel: Any, steps: dict | None, bits: Any) -> jax.Array:
  """Fake-quantized kernel (STE to the kernel; LSQ also to its step)."""
  scale, zero_point, qmin, qmax = weight_qparams(layer, kernel, steps, bits)
  if layer.config.method == "lsq":
    return _lsq(kernel, scale, qmin, qmax, lsq_grad_scale(kernel.size // scale.size, qmax))
  return _fake_quant(kernel, scale, zero_point, qmin, qmax)


def gained_kernel(layer: QuantLayer, kernel: Any, steps: dict | None, bits: Any,
                  gain: Any) -> jax.Array:
  """The kernel's integer codes times ``scale * gain``: a BatchNorm gain in the weight scale.

  ``(clip(round(kernel / scale) + zp, qmin, qmax) - zp) * (scale * gain)`` with ``gain`` one
  value per output channel (the last axis, where per-channel scales run): the kernel an export
  stores when it folds the BatchNorm after the layer into its scales. Evaluation only (no
  gradient); the product ``scale * gain`` is kept whole, as the export computes it. A float16
  ``gain`` (a value of 1 for a layer without a BatchNorm) means the export stores the product
  in float16: it is rounded so (:func:`jaxcompress.precision.to_half`).
  """
  scale, zero_point, qmin, qmax = weight_qparams(layer, kernel, steps, bits)
  q = quantize_int(kernel, scale, zero_point, qmin=qmin, qmax=qmax)
  merged = scale * jnp.asarray(gain, jnp.float32)
  if jnp.result_type(gain) == jnp.float16:
    merged = to_half(merged)
  merged = jax.lax.optimization_barrier(merged)
  return dequantize(q, merged, zero_point).astype(kernel.dtype)


def quantize_input(layer: QuantLayer, x: Any, act_range: Any, steps: dict | None,
                   bits: Any) -> jax.Array:
  """Fake-quantized layer input (STE to the input; LSQ also to its step)."""
  scale, zero_point, qmin, qmax = act_qparams(layer, act_range, steps, bits)
  if layer.config.method == "lsq":
    return _lsq(x, scale, qmin, qmax, lsq_grad_scale(layer.act_features, qmax))
  return _fake_quant(x, scale, zero_point, qmin, qmax)


def batch_range(x: Any) -> jax.Array:
  """``[min, max]`` of a batch, without gradient.

  Both in one reduction (one pass over the batch where ``jnp.min`` and ``jnp.max`` take two):
  the same minimum and maximum, NaN included.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  if x.size == 0:  # no identity to return: jnp.min's error
    return jnp.stack([jnp.min(x), jnp.max(x)])
  lo, hi = jax.lax.reduce((x, x), (np.float32(np.inf), np.float32(-np.inf)), _min_max,
                          tuple(range(x.ndim)))
  return jnp.stack([lo, hi])


def _min_max(a, b):
  return jax.lax.min(a[0], b[0]), jax.lax.max(a[1], b[1])


def init_layer_state(layer: QuantLayer, kernel: Any,
                     x: Any) -> tuple[dict[str, jax.Array], jax.Array | None]:
  """Initial LSQ steps (paper's init) and input range of a layer, from its kernel and a batch.

  Returns:
    ``(steps, act_range)``: ``steps`` holds ``weight``/``act`` for an ``lsq`` layer (empty
    otherwise); ``act_range`` is the batch's ``[min, max]`` for a ``minmax`` layer with quantized
    input, else ``None``.

  Raises:
    ConfigError: if the kernel or the batch holds NaN/Inf.
  """
  cfg = layer.config
  check_finite_range(f"kernel of {layer.path}", jnp.min(kernel), jnp.max(kernel))
  check_finite_range(f"input of {layer.path}", jnp.min(x), jnp.max(x))
  steps = {}
  if cfg.method == "lsq":
    if cfg.weight_bits is not None:
      steps["weight"] = lsq_init_step(kernel, qmax=qrange(cfg.weight_bits, True)[1],
                                      axis=layer.weight_axis)
    if cfg.act_bits is not None:
      steps["act"] = lsq_init_step(x, qmax=act_grid(layer, cfg.act_bits)[1])
    for name, s in steps.items():
      check_qparams(s, field=f"initial LSQ {name} step of {layer.path}")
  act_range = batch_range(x) if cfg.method == "minmax" and cfg.act_bits is not None else None
  return steps, act_range
