"""Finalize a trained model's variables: bake masks, quantize weights to integers, fold BatchNorm.

Works on the variables dict of any Flax model (see :mod:`jaxcompress.models.functional`); nothing
here knows a model's names. Every leaf of every collection becomes one stored tensor, keyed by its
``collection/path`` (``params/blocks/0/mlp/kernel``):

- a weight with a quantization spec (``LayerSpec`` of its layer, from ``Quantizer.specs``) becomes
  its integer codes ``q = quantize_int(W, s, zp)``, the very integers fake quantization used, with
  one scale per channel along the spec's axis, or per entry of its axes (stored last, in order);
- a weight with a k-means codebook becomes the codebook plus indices;
- every other floating-point leaf stays float32 (stored sparse when that is smaller);
- a weight whose reduction axes are given (``reduce_axes``, from the model's trace) carries them,
  in its stored layout, so the export can store it in N:M groups along them, and one whose window
  axes are given (``window_axes``) carries those, so it can store whole kernels over them;
- a BatchNorm that directly follows a linear layer in the forward (``fold``: found by
  :func:`jaxcompress.selection.trace_layers`, never by names) is stored as its per-channel
  ``gain = rsqrt(var + eps) * scale`` and ``bias = beta - mean * gain``: two vectors instead of
  four, and the exported model runs it as ``x * gain + bias``, the same float32 operations as the
  fake-quant model evaluated with :meth:`jaxcompress.compose.Compression.eval_variables`. With
  ``gains_into`` the gain goes into the per-channel scales of the integer weight before the
  BatchNorm instead (``scale * gain``; the weight's codes stay those fake quantization used) and
  the BatchNorm stores its bias alone: one float32 per channel less.

With ``scale_dtype="float16"`` the folded gains and biases and the per-channel scales of integer
weights whose scale axes include their last (:func:`jaxcompress.quantization.half_scaled`; with
any gain already in them) are rounded to float16 (:func:`jaxcompress.precision.to_half`) and
stored in 2 bytes each.

Masks are applied first (the fake-quant model ran on masked weights), then weights are quantized.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018 (section 3.2, batch normalization folding).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from jaxcompress.errors import ConfigError, check_finite, check_variables, unknown
from jaxcompress.export.codec import LayerTensor, stored_order
from jaxcompress.models.batchnorm import fold_arrays
from jaxcompress.precision import SCALE_DTYPES, to_half
from jaxcompress.quantization import channels_last, half_scaled, scale_axes
from jaxcompress.quantization.fake_quant import quantize_int_numpy
from jaxcompress.rules import flat_paths

FOLD = "fold"  # pseudo-collection of folded BatchNorms: fold/<norm path> = [gain; bias]
FOLDED_LEAVES = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
                 ("batch_stats", "var"))


class Finalized(NamedTuple):
  """A finalized model.

  Attributes:
    tensors: ``{collection/leaf path: LayerTensor}`` in tree order; a folded BatchNorm is one
      ``[2, C]`` float tensor ``fold/<path>`` (row 0 the gain, row 1 the bias), or ``[1, C]``
      (the bias; gain 1) when its gain went into a weight's scales.
    axes: ``{tensor path: channel axes}`` of integer weights whose scales run along other axes
      than the last alone (those axes are stored last, in order, and moved back on load).
    acts: ``{layer path: {'bits', 'scale', 'zero_point', 'qmin', 'qmax'}}`` input quantization.
    folded: ``{norm path: epsilon}`` of the folded BatchNorms.
    float32_bytes: 4 bytes per entry of the original ``params`` (the float32 reference size).
  """
  tensors: dict[str, LayerTensor]
  axes: dict[str, tuple[int, ...]]
  acts: dict[str, dict]
  folded: dict[str, float]
  float32_bytes: int


_NOT_FINITE = ("an artifact of them would give NaN logits (a diverged run: export an earlier "
               "checkpoint)")


def check_finite_variables(variables: Mapping[str, Any]) -> None:
  """Raises one :class:`ConfigError` line naming the first variable (``export: params/...``)
  that holds NaN/Inf: checked before anything is derived from them (input ranges, scales)."""
  for collection, value in variables.items():
    for leaf_path, leaf in flat_paths(value).items():
      check_finite(f"export: {collection}/{leaf_path}", leaf, _NOT_FINITE)


def bake_masks(params: Any, masks: Any | None) -> Any:
  """``params`` with exactly 0 where ``masks`` is 0 (NumPy float32 leaves)."""
  if masks is None:
    return jax.tree.map(lambda p: np.asarray(p, np.float32), params)
  def bake(path, p, m):
    if np.shape(m) != np.shape(p):  # a broadcast mask would zero far more than it says
      raise ConfigError(f"masks{jax.tree_util.keystr(path)} has shape {np.shape(m)}, its weight "
                        f"{np.shape(p)}; a mask has its weight's shape")
    return np.where(np.asarray(m) != 0, np.asarray(p, np.float32), np.float32(0))

  try:
    return jax.tree_util.tree_map_with_path(bake, params, masks)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"masks must have the structure of variables['params'] (0/1 leaves, e.g. "
                      f"from jaxcompress.pruning), got a different tree: {e}") from None


def act_fields(spec: Any) -> dict | None:
  """The input quantization of a ``LayerSpec`` as JSON-able numbers (exact float32 text)."""
  if spec is None or getattr(spec, "act_bits", None) is None:
    return None
  # str(float32) is the shortest text that reads back as the same float32.
  return {"bits": int(spec.act_bits), "scale": float(str(np.float32(spec.act_scale))),
          "zero_point": int(np.asarray(spec.act_zero_point)), "qmin": int(spec.act_qmin),
          "qmax": int(spec.act_qmax)}


def _int_tensor(path: str, weight: np.ndarray, spec: Any, gain: np.ndarray | None = None,
                half: bool = False) -> tuple[LayerTensor, tuple[int, ...] | None]:
  """Codes ``q`` (channel axes moved last), zero points and scale of a spec-quantized weight,
  and the channel axes where they are not the last axis alone; with ``gain`` (one per channel),
  the scale times it; ``half``: per-channel scales along the last axis rounded to float16 (see
  the module docstring)."""
  q = quantize_int_numpy(weight, spec.weight_scale, spec.weight_zero_point,
                         qmin=spec.weight_qmin, qmax=spec.weight_qmax)
  axes = scale_axes(spec.weight_axis, weight.ndim)
  scale = np.asarray(spec.weight_scale, np.float32)
  zp = np.asarray(spec.weight_zero_point, np.int32)
  moved = None if axes in ((), (weight.ndim - 1,)) else axes
  if axes:
    order = stored_order(weight.ndim, axes)
    q = np.transpose(q, order)
    # one scale and zero point per entry of the channel axes, shaped as they are stored
    scale, zp = (np.transpose(np.broadcast_to(a, weight.shape), order)[
        (0,) * (weight.ndim - len(axes))] for a in (scale, zp))
  else:
    scale, zp = scale.reshape(-1), np.broadcast_to(zp.reshape(-1), (q.shape[-1],))
  if gain is not None:
    scale = np.asarray(scale * np.asarray(gain, np.float32), np.float32)
  half = half and half_scaled(spec.weight_axis, weight.ndim)
  if half:
    scale = np.asarray(to_half(scale))
  width = int(spec.weight_qmax) - int(spec.weight_qmin) + 1
  bits = max(2, math.ceil(math.log2(width)))
  return LayerTensor(path=path, kind="int", codes=q, bits=bits, qmin=int(spec.weight_qmin),
                     zero_point=np.array(zp, np.int32), scale=np.ascontiguousarray(scale),
                     scale_bits=16 if half else 32), moved


def _kmeans_tensor(path: str, codebook: Any, mask: np.ndarray | None) -> LayerTensor:
  book = np.asarray(codebook.codebook, np.float32)
  idx = np.asarray(codebook.indices, np.int32)
  bits = int(round(math.log2(book.shape[-1]))) if book.ndim and book.shape[-1] else 0
  # one codebook, or one per step of a weight stacked by nn.scan ([*steps, 2^bits])
  if (book.ndim < 1 or book.shape[-1] != 1 << bits or not 2 <= bits <= 8
      or book.shape[:-1] != idx.shape[:book.ndim - 1] or book.ndim > idx.ndim):
    raise ConfigError(f"codebooks[{path!r}] must hold 2^bits centroids (or one such row per step "
                      f"of the weight's leading axes), got shape {book.shape} for a weight of "
                      f"shape {idx.shape}")
  if mask is not None:
    idx = np.where(mask != 0, idx, 1 << bits)
  return LayerTensor(path=path, kind="kmeans", codes=idx, bits=bits, codebook=book)


def _float_tensor(path: str, leaf: Any) -> LayerTensor:
  """A variable stored as float32: a float, or integers float32 holds exactly (a step counter).

  ``export.load`` casts it back to the dtype the module declares.
  """
  a = np.asarray(leaf)
  exact = np.issubdtype(a.dtype, np.floating) or (
      (np.issubdtype(a.dtype, np.integer) or a.dtype == bool)
      and np.all(np.abs(a.astype(np.int64)) <= 1 << 24))
  if not exact:
    raise ConfigError(f"export: variable {path!r} has dtype {a.dtype}"
                      + (" and values beyond +-2^24" if np.issubdtype(a.dtype, np.integer) else "")
                      + "; only floating-point variables, or integers of at most 2^24 in size, "
                      "can be exported")
  return LayerTensor(path=path, kind="float", codes=np.asarray(a, np.float32).reshape(
      a.shape or (1,)), bits=32)


def _stored_axes(axes: Any, ndim: int, moved: tuple[int, ...] | None) -> tuple[int, ...]:
  """Axes of a weight as stored, its channel axes ``moved`` (if any) last."""
  order = stored_order(ndim, () if moved is None else moved)
  return tuple(order.index(int(a) % ndim) for a in axes)


def _weight_gains(gains_into: dict[str, str], folded: Mapping[str, tuple], weights: Mapping,
                  flat_params: Mapping) -> dict[str, np.ndarray]:
  """``{weight path: gain}`` of ``gains_into``, each checked: a folded BatchNorm, an integer
  weight with one scale per output channel (its last axis) as many as the gain has entries."""
  out = {}
  for norm, weight in gains_into.items():
    spec = weights.get(weight)
    if norm not in folded:
      raise ConfigError(f"export gains_into: {norm!r} is not a folded BatchNorm (fold: "
                        f"{sorted(folded)})")
    shape = np.shape(flat_params.get(weight, ()))
    gain = np.asarray(folded[norm][0], np.float32)
    if (spec is None or not channels_last(spec.weight_axis, len(shape))
        or shape[-1] != gain.size):
      raise ConfigError(f"export gains_into: {weight!r} (for {norm!r}) must be an integer weight "
                        f"with one scale per output channel, {gain.size} of them")
    out[weight] = gain
  return out


def finalize(variables: Mapping[str, Any], *, masks: Any = None,
             specs: Mapping[str, Any] | None = None,
             codebooks: Mapping[str, Any] | None = None,
             fold: Mapping[str, float] | None = None,
             gains_into: Mapping[str, str] | None = None,
             reduce_axes: Mapping[str, Any] | None = None,
             window_axes: Mapping[str, Any] | None = None,
             scale_dtype: str = "float32") -> Finalized:
  """Turns trained variables into finalized tensors (see the module docstring).

  Args:
    variables: the model's variables (the ones the fake-quant model runs with).
    masks: pruning masks, a tree like ``variables['params']`` of 0/1 leaves, or ``None``.
    specs: ``{layer path: LayerSpec}`` from ``Quantizer.specs(masked_variables, qstate)``.
      Compute them from the masked weights: min-max scales depend on the weights the fake-quant
      model saw.
    codebooks: ``{weight path: Codebook}`` (k-means), e.g. ``{'fc2/kernel': ...}``.
    fold: ``{BatchNorm path: epsilon}`` of the BatchNorms to fold (those that directly follow a
      linear layer in the forward, ``ModelLayers.batchnorms``).
    gains_into: ``{BatchNorm path: weight path}`` of folded BatchNorms whose gain goes into the
      per-output-channel scales of that integer weight (``Compression.gain_layers``).
    reduce_axes: ``{weight path: axes its layer's product sums over}``
      (``ModelLayers.reduce_axes()``); those weights may be stored as N:M groups.
    window_axes: ``{weight path: window axes}`` (``ModelLayers.window_axes()``); those weights
      may be stored as whole kernels over them (a conv stacked by ``nn.scan``).
    scale_dtype: ``float32`` or ``float16`` (see the module docstring).

  Returns:
    The :class:`Finalized` model.

  Raises:
    ConfigError: for variables without ``params`` (the params alone), a spec or codebook naming
      no weight, a weight with both, a BatchNorm to fold without running statistics, a gain given
      to a weight without per-output-channel integer scales, or a non-floating-point variable.
  """
  check_variables(variables, "export variables")
  if scale_dtype not in SCALE_DTYPES:
    raise unknown("export scale_dtype", scale_dtype, SCALE_DTYPES)
  half = scale_dtype == "float16"
  variables = dict(variables)
  if FOLD in variables:
    raise ConfigError(f"export: the model has a variable collection named {FOLD!r}, a name the "
                      "artifact reserves for folded BatchNorms; rename the collection")
  params = bake_masks(variables["params"], masks)
  flat_params = flat_paths(params)
  mask_flat = None if masks is None else flat_paths(masks)
  specs, books, fold = dict(specs or {}), dict(codebooks or {}), dict(fold or {})
  group = dict(reduce_axes or {})
  windows = {p: a for p, a in (window_axes or {}).items() if a}
  weights = {f"{p}/{getattr(s, 'weight', 'kernel')}": s for p, s in specs.items()}
  weights = {w: s for w, s in weights.items() if getattr(s, "weight_bits", None) is not None}
  for name, given in (("specs", {w.rpartition("/")[0] for w in weights}), ("codebooks", books)):
    missing = sorted(p for p in given if p not in flat_params and
                     not any(k.startswith(f"{p}/") for k in flat_params))
    if missing:
      raise ConfigError(f"export {name}: {missing[0]!r} names no weight of the model")
  both = sorted(set(weights) & set(books))
  if both:
    raise ConfigError(f"export: weight {both[0]!r} has both a quantization spec with weight_bits "
                      "and a k-means codebook; give it one of the two")
  folded_leaves: set[str] = set()
  tensors: dict[str, LayerTensor] = {}
  try:
    folded = fold_arrays(params, variables.get("batch_stats"), fold, half=half)
  except ConfigError as e:
    raise ConfigError(f"export: {e}") from None
  gains_into = dict(gains_into or {})
  gains = _weight_gains(gains_into, folded, weights, flat_params)
  for path, (gain, bias) in folded.items():
    rows = [bias] if path in gains_into else [gain, bias]
    tensors[f"{FOLD}/{path}"] = _float_tensor(f"{FOLD}/{path}", np.stack(rows))._replace(
        bits=16 if half else 32)
    folded_leaves |= {f"{c}/{path}/{leaf}" for c, leaf in FOLDED_LEAVES}
  axes: dict[str, tuple[int, ...]] = {}
  for collection, value in variables.items():
    leaves = flat_params if collection == "params" else flat_paths(value)
    for leaf_path, leaf in leaves.items():
      key = f"{collection}/{leaf_path}"
      if key in folded_leaves:
        continue
      check_finite(f"export: {key}", leaf, _NOT_FINITE)
      if collection == "params" and leaf_path in books:
        mask = None if mask_flat is None else np.asarray(mask_flat[leaf_path])
        tensors[key] = _kmeans_tensor(key, books[leaf_path], mask)
      elif collection == "params" and leaf_path in weights:
        tensors[key], moved = _int_tensor(key, np.asarray(leaf, np.float32), weights[leaf_path],
                                          gains.get(leaf_path), half)
        if moved is not None:
          axes[key] = moved
      else:
        tensors[key], moved = _float_tensor(key, leaf), None
      if collection == "params" and leaf_path in group and leaf_path not in books:
        tensors[key] = tensors[key]._replace(
            group_axes=_stored_axes(group[leaf_path], np.ndim(leaf), moved))
      if collection == "params" and leaf_path in windows:
        tensors[key] = tensors[key]._replace(
            window_axes=_stored_axes(windows[leaf_path], np.ndim(leaf), moved))
  acts = {p: a for p, a in ((p, act_fields(s)) for p, s in specs.items()) if a is not None}
  float32_bytes = 4 * sum(int(np.size(leaf)) for leaf in flat_params.values())
  return Finalized(tensors, axes, acts, fold, float32_bytes)
