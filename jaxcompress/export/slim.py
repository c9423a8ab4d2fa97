"""Skip pruned output channels at inference, for any Flax model: each layer computes what it keeps.

A linear layer whose kernel has a whole output channel at exactly 0 outputs, in that channel, its
bias alone (or 0): a constant that needs no multiplication. :func:`slim` turns a loaded artifact
into one whose convolutions and dense layers (Linen ``Conv``/``Dense``, NNX ``Conv``/``Linear``)
multiply by their kept output channels only and place the constants of the others around the
result, so a channel-pruned model (``prune.structure=channel``, the ``int8-npu`` budget preset)
runs with about the multiply-accumulates its plan counts (the computed channels are rounded up to
a multiple of 8, and a layer keeping more than 3/4 runs whole: narrow or nearly full layers ran
slower than the full ones). It needs no knowledge of the model's graph:
the layer's inputs and outputs keep their shapes, so the layers before and after are unchanged.
Where a layer cannot be slimmed (grouped or circular convolutions, a layer with a ``mask``,
inputs without one batch axis) it runs at full width, and :func:`slim` says so.

The slimmed model computes the same function; its float sums may round differently from the full
convolution's (another kernel shape, another XLA algorithm). :func:`slim` checks it on a random
batch and reports the largest difference.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.linear import canonicalize_padding

from jaxcompress.errors import ConfigError, check_positive, invalid
from jaxcompress.export import inputs as io
from jaxcompress.rules import flat_paths

CONVS = (nn.Conv, nnx.Conv)
DENSES = (nn.Dense, nnx.Linear)
MULTIPLE = 8  # computed channels are rounded up to this (odd widths run slowly)
MAX_KEPT = 0.75  # a layer is slimmed only when it computes at most this fraction of its outputs


class Slimmed(NamedTuple):
  """What :func:`slim` did.

  Attributes:
    loaded: the artifact with the channel-skipping ``apply_fn`` (a ``LoadedModel``).
    channels: ``{layer path: (computed, all)}`` output channels of each slimmed layer.
    full_width: ``{layer path: reason}`` of layers with removed channels that run at full width.
    max_abs_diff: the largest difference of the outputs on the check batch.
  """
  loaded: Any
  channels: dict[str, tuple[int, int]]
  full_width: dict[str, str]
  max_abs_diff: float


def kept_outputs(kernel: Any) -> np.ndarray:
  """Indices of the output channels (last axis) of ``kernel`` with any non-zero entry."""
  k = np.asarray(kernel)
  return np.flatnonzero(np.any(k.reshape(-1, k.shape[-1]) != 0, axis=0))


def slim_arrays(params: Mapping[str, Any], *, multiple: int = MULTIPLE,
                max_kept: float = MAX_KEPT) -> dict[str, dict[str, np.ndarray]]:
  """Per layer worth slimming: its kept kernel, output order and constants.

  A ``.../kernel`` of ``params`` (rank 2 or more, output channels last) is slimmed when its kept
  channels, rounded up to a multiple of ``multiple`` (the first removed channels fill the
  rounding: their zero kernels compute their bias exactly), are at most ``max_kept`` of its
  channels. For each: ``{layer path: {'kernel': kernel[..., computed], 'bias': bias[..., computed]
  (or zeros), 'const': bias[..., removed] (or zeros), 'index': the position of each output channel
  in concat([computed outputs, removed constants])}}``, and ``'place'``, the one-hot
  ``[computed, channels]`` matrix that puts the computed outputs in their channels, where that
  product costs at most a quarter of the layer's (:func:`places_by_product`).

  Raises:
    ConfigError: for a ``multiple`` that is not an integer >= 1 or a ``max_kept`` that is not a
      finite number >= 0.
  """
  if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
    raise invalid("slim multiple", multiple, "an integer >= 1 (1: no rounding)")
  check_positive("slim max_kept", max_kept, zero=True)
  flat = flat_paths(params)
  out = {}
  for key, kernel in flat.items():
    if not key.endswith("kernel") or np.ndim(kernel) < 2:
      continue
    path = key[:-len("kernel")].rstrip("/")
    kernel = np.asarray(kernel)
    channels = kernel.shape[-1]
    keep = kept_outputs(kernel)
    width = min(channels, -(-max(keep.size, 1) // multiple) * multiple)
    if width == channels or width > max_kept * channels:
      continue
    removed = np.setdiff1d(np.arange(channels), keep)
    keep, removed = np.sort(np.concatenate([keep, removed[:width - keep.size]])), removed[
        width - keep.size:]
    bias = flat.get(f"{path}/bias" if path else "bias")
    bias = np.zeros(channels, kernel.dtype) if bias is None else np.asarray(bias)  # [..., C]
    index = np.empty(channels, np.int32)
    index[keep] = np.arange(keep.size)
    index[removed] = keep.size + np.arange(removed.size)
    out[path] = {"kernel": kernel[..., keep], "bias": bias[..., keep],
                 "const": bias[..., removed],
                 "index": index}
    if places_by_product(kernel.shape):
      place = np.zeros((keep.size, channels), np.float32)
      place[np.arange(keep.size), keep] = 1
      out[path]["place"] = place
  return out


def places_by_product(shape: tuple[int, ...]) -> bool:
  """Whether a slimmed layer puts its outputs in place by a one-hot product (else by slices).

  XLA gathers along the channel axis slowly, and a concatenation of many slices breaks
  fusions; a product with a one-hot matrix runs as a fast matmul, at ``computed x channels``
  multiply-adds per output position against the layer's ``window x inputs x computed``: taken
  where the window and inputs are at least 4 times the channels (a 3x3 conv: no more than 11 %
  more; a Dense layer would double its cost).
  """
  return len(shape) >= 3 and int(np.prod(shape[:-1])) >= 4 * shape[-1]


def segments(index: np.ndarray) -> list[tuple[int, int]]:
  """Runs of consecutive positions of ``index``: the slices of concat([computed, constants])
  that, concatenated, give the channels in order."""
  cuts = np.flatnonzero(np.diff(index) != 1) + 1
  return [(int(r[0]), int(r[-1]) + 1) for r in np.split(index, cuts)]


def _pairs(padding: Any, rank: int) -> Any:
  """``padding`` as ``lax.conv_general_dilated`` takes it (Flax's own canonical form), or None
  where the layer pads by itself first (``CIRCULAR``, ``REFLECT``, ``CAUSAL``)."""
  padding = canonicalize_padding(padding, rank)
  return None if isinstance(padding, str) and padding not in ("SAME", "VALID") else padding


def _spread(value: Any, rank: int) -> tuple[int, ...]:
  value = 1 if value is None else value
  return (value,) * rank if isinstance(value, int) else tuple(value)


def why_full_width(module: Any, x: Any, kernel: Any) -> str | None:
  """Why a layer must run at full width, or None when it can be slimmed."""
  if getattr(module, "mask", None) is not None:
    return "the layer multiplies its kernel by a mask"
  stacked = "its kernel is stacked by a lifted transform (nn.scan, nn.vmap)"
  if isinstance(module, DENSES):
    return None if np.ndim(kernel) == 2 else stacked
  if not isinstance(module, CONVS):
    return f"{type(module).__name__} is not a Conv or Dense layer"
  rank = np.ndim(kernel) - 2
  size = module.kernel_size
  if rank != (1 if isinstance(size, int) else len(size)):
    return stacked
  if np.ndim(x) != rank + 2:
    return "the input does not have exactly one batch axis"
  if module.feature_group_count != 1:
    return "a grouped convolution"
  if _pairs(module.padding, rank) is None:
    return f"padding {module.padding!r}"
  return None


def _linear(module: Any, x: Any, kernel: Any) -> jax.Array:
  dtype = getattr(module, "dtype", None) or jnp.result_type(x, kernel)
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  if isinstance(module, DENSES):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               precision=module.precision)
  rank = kernel.ndim - 2
  lhs = (0, rank + 1) + tuple(range(1, rank + 1))
  rhs = (rank + 1, rank) + tuple(range(rank))
  return jax.lax.conv_general_dilated(
      x, kernel, _spread(module.strides, rank), _pairs(module.padding, rank),
      lhs_dilation=_spread(module.input_dilation, rank),
      rhs_dilation=_spread(module.kernel_dilation, rank),
      dimension_numbers=jax.lax.ConvDimensionNumbers(lhs, rhs, lhs), precision=module.precision)


def slim_hook(layers: Mapping[str, Mapping[str, Any]], index: Mapping[str, np.ndarray],
              skip: dict[str, str] | None = None):
  """A hook that computes each layer of ``layers`` (:func:`slim_arrays`) on its kept channels.

  ``index`` holds each layer's ``index`` (NumPy: static, so the outputs are put in place by
  slices or a one-hot product, never a gather). Layers :func:`why_full_width` refuses run as
  they are; their reasons are written into ``skip`` at trace time.
  """
  def hook(call, run):
    arrays = layers.get(call.path)
    if arrays is None or call.kind != "linear":
      return run(call.x)
    reason = why_full_width(call.module, call.x, arrays["kernel"])
    if reason is not None:
      if skip is not None:
        skip[call.path] = reason
      return run(call.x)
    y = _linear(call.module, call.x, arrays["kernel"])
    y = y + arrays["bias"].astype(y.dtype)
    order = index[call.path]
    const = arrays["const"].astype(y.dtype)
    if "place" in arrays:  # constants of the computed channels are 0
      full = jnp.concatenate([jnp.zeros(y.shape[-1], y.dtype), const])[order]
      return jnp.dot(y, arrays["place"].astype(y.dtype),
                     precision=jax.lax.Precision.HIGHEST) + full
    y = jnp.concatenate([y, jnp.broadcast_to(const, (*y.shape[:-1], const.shape[-1]))], -1)
    return jnp.concatenate([y[..., a:b] for a, b in segments(order)], -1)

  return hook


def slim(loaded: Any, *, multiple: int = MULTIPLE, max_kept: float = MAX_KEPT,
         seed: int = 0) -> Slimmed:
  """The artifact ``loaded`` with its removed output channels skipped (module docstring).

  Args:
    loaded: a :class:`~jaxcompress.export.runtime.LoadedModel` (from ``load``).
    multiple: computed channels are rounded up to a multiple of this (:func:`slim_arrays`).
    max_kept: a layer is slimmed only when it computes at most this fraction of its outputs.
    seed: seed of the random check batch (two examples of the artifact's input shape; token
      inputs draw ids 0 and 1).

  Returns:
    A :class:`Slimmed`; its ``loaded`` is the slimmed model (``logits``, ``apply_fn`` and
    ``arrays``, which hold the kept kernels under ``slim``), ready for ``save_serving``.

  Raises:
    ConfigError: if ``loaded`` is not a ``LoadedModel``, or the slimmed model's outputs on the
      check batch differ from the full model's by more than float rounding (a layer whose call
      this module misreads).
  """
  from jaxcompress.export.runtime import LoadedModel, check_loaded, make_apply_fn

  check_loaded(loaded, "slim")
  skip: dict[str, str] = {}
  layers = slim_arrays(loaded.arrays["variables"]["params"], multiple=multiple,
                       max_kept=max_kept)
  index = {p: a.pop("index") for p, a in layers.items()}
  apply_fn = make_apply_fn(loaded.model, loaded.finalized.acts,
                           inner=lambda arrays: slim_hook(arrays["slim"], index, skip))
  out = LoadedModel(loaded.model, {**loaded.arrays, "slim": layers}, apply_fn, loaded.spec,
                    loaded.finalized)
  rng = np.random.default_rng(seed)
  x = io.build(loaded.spec["input"], lambda shape, dtype: (
      rng.standard_normal((2, *shape)).astype(dtype) if np.issubdtype(dtype, np.floating)
      else rng.integers(0, 2, (2, *shape)).astype(dtype)))
  full = np.asarray(loaded.logits(x), np.float64)
  small = np.asarray(out.logits(x), np.float64)
  diff = float(np.max(np.abs(full - small))) if full.size else 0.0
  if not diff <= 1e-3 * max(1.0, float(np.max(np.abs(full)))):
    raise ConfigError(f"slim: the channel-skipping model's outputs differ from the full model's "
                      f"by {diff:.3g} on a random batch; some layer's call is not a plain "
                      "Conv/Dense call (report it with the model)")
  channels = {p: (int(a["kernel"].shape[-1]), int(index[p].size)) for p, a in layers.items()
              if p not in skip}
  return Slimmed(out, channels, dict(skip), diff)
