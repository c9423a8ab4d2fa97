"""Finalize a trained model: bake masks, quantize to integers, fold BatchNorm, layer by layer.

The order keeps the exported model faithful to the fake-quantized one it came from: masks are
applied first (the fake-quant model ran on masked weights), then each quantized kernel becomes the
very integers fake quantization used, ``q = quantize_int(W, s, zp)`` with the scale and zero point
of the quantization spec, and only then is BatchNorm folded, into a per-channel gain ``g`` applied
to the layer's output and the bias (see :mod:`.fold`). Layers without a spec or codebook stay float32, with
BatchNorm folded into the kernel itself.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax
import jax
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.export.codec import LayerTensor
from jaxcompress.export.fold import bn_multiplier, bn_path, find_bn, fold_bias, fold_bn, subtree
from jaxcompress.quantization import quantize_int


def layer_paths(params: Mapping[str, Any]) -> list[str]:
  """Module paths holding a ``kernel`` (Conv/Dense layers), in parameter-tree order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return [k[: -len("/kernel")] for k in flat if k.endswith("/kernel")]


def bake_masks(params: Any, masks: Any | None) -> Any:
  """``params`` with exactly 0 where ``masks`` is 0 (NumPy float32 leaves)."""
  if masks is None:
    return jax.tree.map(lambda p: np.asarray(p, np.float32), params)
  try:
    return jax.tree.map(lambda p, m: np.where(np.asarray(m) != 0, np.asarray(p, np.float32),
                                              np.float32(0)), params, masks)
  except ValueError as e:
    raise ConfigError(f"masks must have the structure of variables['params'] (0/1 leaves, e.g. "
                      f"from jaxcompress.pruning), got a different tree: {e}") from None


def _act(spec: Any) -> dict | None:
  if spec is None or getattr(spec, "act_bits", None) is None:
    return None
  # str(float32) is the shortest text that reads back as the same float32.
  return {"bits": int(spec.act_bits), "scale": float(str(np.float32(spec.act_scale))),
          "zero_point": int(np.asarray(spec.act_zero_point)), "qmin": int(spec.act_qmin),
          "qmax": int(spec.act_qmax)}


def _int_layer(path: str, kernel: np.ndarray, spec: Any) -> dict:
  """Codes ``q``, zero points and scale of a spec-quantized kernel."""
  if spec.weight_axis is not None and spec.weight_axis % kernel.ndim != kernel.ndim - 1:
    raise ConfigError(f"quantization spec of {path!r}: weight_axis must be None or the last "
                      f"kernel axis ({kernel.ndim - 1}), got {spec.weight_axis}; export folds "
                      "per output channel")
  channels = kernel.shape[-1]
  q = np.asarray(quantize_int(kernel, spec.weight_scale, spec.weight_zero_point,
                              qmin=spec.weight_qmin, qmax=spec.weight_qmax), np.int32)
  zp = np.broadcast_to(np.asarray(spec.weight_zero_point, np.int32).reshape(-1), (channels,))
  width = int(spec.weight_qmax) - int(spec.weight_qmin) + 1
  bits = max(2, math.ceil(math.log2(width)))
  return dict(kind="int", codes=q, bits=bits, qmin=int(spec.weight_qmin),
              zero_point=np.array(zp, np.int32),
              scale=np.asarray(spec.weight_scale, np.float32).reshape(-1))


def _kmeans_layer(path: str, codebook: Any, mask: np.ndarray | None) -> dict:
  book = np.asarray(codebook.codebook, np.float32)
  bits = int(round(math.log2(book.size)))
  if book.ndim != 1 or book.size != 1 << bits:
    raise ConfigError(f"codebooks[{path!r}] must hold 2^bits centroids, got shape {book.shape}")
  idx = np.asarray(codebook.indices, np.int32)
  if mask is not None:
    idx = np.where(mask != 0, idx, 1 << bits)
  return dict(kind="kmeans", codes=idx, bits=bits, codebook=book)


def finalize(variables: Mapping[str, Any], *, masks: Any = None,
             specs: Mapping[str, Any] | None = None,
             codebooks: Mapping[str, Any] | None = None) -> dict[str, LayerTensor]:
  """Turns trained variables into finalized layers.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of the unfolded model (the ones the
      fake-quant model runs with).
    masks: pruning masks, a tree like ``variables['params']`` of 0/1 leaves, or ``None``.
    specs: ``{module path: LayerSpec}`` from ``Quantizer.specs(masked_variables, qstate)`` (the
      quantization package). A layer with ``weight_bits`` becomes an integer layer; ``act_*``
      fields make its input fake-quantized in the exported model. Compute the specs from the
      masked weights: min-max weight scales depend on the kernel the fake-quant model saw.
    codebooks: ``{path: Codebook}`` from ``cluster_params`` (k-means); keys may be leaf paths
      (``layer1_0/conv1/kernel``) or module paths.

  Returns:
    ``{module path: LayerTensor}`` in parameter-tree order.

  Raises:
    ConfigError: for a spec or codebook naming no layer, a layer with both, a parameter that is
      neither a layer nor a BatchNorm after a conv, or missing BatchNorm statistics.
  """
  params = bake_masks(variables["params"], masks)
  stats = variables.get("batch_stats")
  mask_tree = None if masks is None else flax.traverse_util.flatten_dict(
      flax.core.unfreeze(masks), sep="/")
  specs = dict(specs or {})
  books = {k[: -len("/kernel")] if k.endswith("/kernel") else k: v
           for k, v in (codebooks or {}).items()}
  paths = layer_paths(params)
  for name, given in (("specs", specs), ("codebooks", books)):
    extra = sorted(set(given) - set(paths))
    if extra:
      raise ConfigError(f"export {name}: {extra[0]!r} is not a Conv/Dense layer of the model; "
                        f"layers are {paths}")
  used = set()
  out = {}
  for path in paths:
    module = subtree(params, path)
    kernel, bias = module["kernel"], module.get("bias")
    used.update({f"{path}/kernel"} | ({f"{path}/bias"} if bias is not None else set()))
    bn = find_bn(params, stats, path)
    g = None
    if bn is not None:
      used.update(f"{bn_path(path)}/{k}" for k in bn[0])
      g = bn_multiplier(bn[0]["scale"], bn[1]["var"])
    spec = specs.get(path)
    has_weights = spec is not None and getattr(spec, "weight_bits", None) is not None
    if has_weights and path in books:
      raise ConfigError(f"export: layer {path!r} has both a quantization spec with weight_bits "
                        "and a k-means codebook; give it one of the two")
    if path in books:
      fields = _kmeans_layer(path, books[path], None if mask_tree is None else
                             np.asarray(mask_tree.get(f"{path}/kernel")))
    elif has_weights:
      fields = _int_layer(path, kernel, spec)
    else:  # float: BatchNorm goes into the kernel itself
      kernel, bias = fold_bn(kernel, bias, *bn) if bn is not None else (kernel, bias)
      fields = dict(kind="float", codes=np.asarray(kernel, np.float32), bits=32)
    if bn is not None and fields["kind"] != "float":  # gain on the output, kernel untouched
      fields["gain"] = g
      bias = fold_bias(bias, g, bn[0]["bias"], bn[1]["mean"])
    out[path] = LayerTensor(path=path, bias=None if bias is None else np.asarray(bias, np.float32),
                            act=_act(spec), **fields)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  left = sorted(set(flat) - used)
  if left:
    raise ConfigError(f"export: parameter {left[0]!r} belongs to no Conv/Dense layer nor to a "
                      "BatchNorm that follows a conv (named convK -> bnK); this model cannot be "
                      "exported")
  return out
