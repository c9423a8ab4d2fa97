"""Structured channel surgery for the CIFAR ResNets: physically remove pruned inner channels.

Only the *inner* channels of a basic block are removed: the output channels of ``conv1`` (with
their ``bn1`` entries) and the matching input channels of ``conv2``. Channels that feed a residual
sum (``conv2`` outputs, the stem, the shortcut) are left alone, so the block's output width and
the shortcut stay as they are; the result is ``get_model(name, inner_widths=...)``.

Removing channel ``c`` of ``conv1`` is exact when the channel reaches ``conv2`` as exactly 0. A
zero kernel alone does not give that: BatchNorm turns the zero into the constant
``beta - mean * g`` and ReLU keeps it if it is positive. :func:`inner_channel_masks` therefore
masks ``bn1``'s scale and bias too (the channel's output is then exactly 0, in training as well),
and :func:`shrink_channels` checks the constant before it removes anything.

References:
  Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.export.finalize import bake_masks
from jaxcompress.models.batchnorm import bn_multiplier, fold_bias
from jaxcompress.models import CifarResNet, get_model
from jaxcompress.pruning import channel_masks

BLOCK = re.compile(r"layer(\d+)_(\d+)")
INNER_RULES = ((r"layer\d+_\d+/conv1/kernel", True), (".*", False))


def block_names(params: Mapping[str, Any]) -> list[str]:
  """Basic-block module names (``layer1_0`` ...) in model order."""
  names = [k for k in params if BLOCK.fullmatch(k) and "conv1" in params[k]]
  return sorted(names, key=lambda k: tuple(int(i) for i in BLOCK.fullmatch(k).groups()))


def inner_channel_masks(params: Mapping[str, Any], fraction: float, *, norm: str = "l1") -> Any:
  """Channel masks for every block's ``conv1`` (and its ``bn1``), lowest L1/L2 norms pruned.

  In each block ``round(fraction * width)`` output channels of ``conv1`` (at most ``width - 1``:
  one is always kept) with the smallest kernel norm are zeroed (the pruning package's
  :func:`~jaxcompress.pruning.channel_masks`), and so are their ``bn1`` scale and bias, so the
  channel's output is exactly 0 and :func:`shrink_channels` can remove it. Every other leaf is
  all ones.

  Args:
    params: ``variables['params']`` of a CIFAR ResNet.
    fraction: fraction of each block's inner channels pruned, in [0, 1).
    norm: ``"l1"`` or ``"l2"``.

  Returns:
    A mask tree like ``params`` (0/1, param dtypes).

  Raises:
    ConfigError: for a fraction outside [0, 1) or an unknown norm.
  """
  masks = flax.core.unfreeze(channel_masks(params, fraction, norm=norm, rules=list(INNER_RULES)))
  for block in block_names(params):
    keep = kept_channels(masks[block]["conv1"]["kernel"], f"{block}/conv1/kernel")
    for leaf in ("scale", "bias"):
      old = masks[block]["bn1"][leaf]
      masks[block]["bn1"][leaf] = jax.numpy.asarray(np.isin(np.arange(old.shape[0]), keep),
                                                    old.dtype)
  return masks


def kept_channels(mask: Any, where: str) -> np.ndarray:
  """Indices of the output channels (last axis) a channel mask keeps.

  Raises:
    ConfigError: if some channel is partly masked (not a channel mask).
  """
  rows = np.asarray(mask).reshape(-1, np.shape(mask)[-1]) != 0
  partial = np.flatnonzero(rows.any(0) & ~rows.all(0))
  if partial.size:
    raise ConfigError(f"masks[{where!r}]: channel {int(partial[0])} is only partly masked; channel "
                      "surgery needs whole output channels masked (use inner_channel_masks or "
                      "jaxcompress.pruning.channel_masks)")
  return np.flatnonzero(rows.all(0))


def _check_resnet(model_name: str) -> CifarResNet:
  model = get_model(model_name)
  if not isinstance(model, CifarResNet):
    raise ConfigError(f"model.name must be a CIFAR ResNet (resnet20 ... resnet110) for channel "
                      f"surgery, got {model_name!r}")
  return model


def shrink_channels(model_name: str, variables: Mapping[str, Any], masks: Any, *,
                    strict: bool = True) -> tuple[CifarResNet, dict]:
  """Removes the masked inner channels of a CIFAR ResNet; returns the smaller model.

  All ``masks`` are applied to the parameters first. Then, in each block, the output channels
  whose ``conv1`` kernel mask is all 0 are removed from ``conv1`` and ``bn1`` (params and
  running statistics) and, as input channels, from ``conv2``.

  Args:
    model_name: ``resnet20`` ... ``resnet110``.
    variables: ``{'params', 'batch_stats'}`` of the full-width model.
    masks: a mask tree like ``variables['params']`` (e.g. from :func:`inner_channel_masks`).
    strict: raise if a removed channel would not have been exactly 0 after BN and ReLU
      (``relu(beta - mean * g) > 0``), i.e. if removing it would change the predictions;
      with ``False`` such channels are removed anyway.

  Returns:
    ``(model, variables)``: ``get_model(model_name, num_classes, inner_widths=...)`` and its
    variables; its predictions equal those of the masked full model.

  Raises:
    ConfigError: for a non-ResNet, variables of another depth, masks that are not whole channels,
      or (``strict``) a channel whose BatchNorm output is not zero.
  """
  depth = _check_resnet(model_name).depth
  blocks = block_names(variables["params"])
  if len(blocks) != (depth - 2) // 2:  # three stages of (depth - 2) / 6 blocks
    raise ConfigError(f"variables: {len(blocks)} basic blocks, {model_name} has "
                      f"{(depth - 2) // 2}; give the model name the variables were built for")
  params = flax.core.unfreeze(bake_masks(variables["params"], masks))
  stats = jax.tree.map(np.asarray, flax.core.unfreeze(variables["batch_stats"]))
  mask_params = flax.core.unfreeze(masks)
  widths = []
  for block in block_names(params):
    keep = kept_channels(mask_params[block]["conv1"]["kernel"], f"{block}/conv1/kernel")
    bn, st = params[block]["bn1"], stats[block]["bn1"]
    removed = np.setdiff1d(np.arange(bn["scale"].shape[0]), keep)
    const = np.maximum(bn["bias"] - st["mean"] * bn_multiplier(bn["scale"], st["var"]), 0)
    if strict and removed.size and np.any(const[removed] > 0):
      c = int(removed[np.argmax(const[removed])])
      raise ConfigError(f"masks: channel {c} of {block}/conv1 is masked but {block}/bn1 still "
                        "outputs relu(bias - mean * scale / sqrt(var + eps)) = "
                        f"{const[c]:.4g} > 0, "
                        "so removing it would change the predictions; mask bn1's scale and bias "
                        "too (inner_channel_masks does) or pass strict=False")
    if keep.size == 0:
      keep = np.arange(1)  # a width-0 conv is not a model; one zero channel is exact
    params[block]["conv1"]["kernel"] = params[block]["conv1"]["kernel"][..., keep]
    params[block]["conv2"]["kernel"] = params[block]["conv2"]["kernel"][..., keep, :]
    for leaf in ("scale", "bias"):
      bn[leaf] = bn[leaf][keep]
    for leaf in ("mean", "var"):
      st[leaf] = st[leaf][keep]
    widths.append(int(keep.size))
  num_classes = int(np.shape(params["linear"]["kernel"])[-1])
  model = get_model(model_name, num_classes, inner_widths=tuple(widths))
  return model, {"params": params, "batch_stats": stats}


def fold_resnet(variables: Mapping[str, Any]) -> dict:
  """Variables of the ``folded=True`` CIFAR ResNet: each BatchNorm multiplied into its conv.

  ``convK -> bnK`` in the same block (this model's naming); the conv gets the bias
  ``beta - mean * g`` and its kernel is multiplied by ``g = rsqrt(var + eps) * gamma``.
  """
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables["params"]), sep="/")
  stats = flax.traverse_util.flatten_dict(jax.device_get(variables["batch_stats"]), sep="/")
  out = {}
  for key, kernel in flat.items():
    if not key.endswith("/kernel"):
      continue
    path = key[:-len("/kernel")]
    parent, _, name = path.rpartition("/")
    bn = f"{parent}/{name.replace('conv', 'bn')}" if parent else name.replace("conv", "bn")
    if name.startswith("conv") and f"{bn}/mean" in stats:
      g = bn_multiplier(flat[f"{bn}/scale"], stats[f"{bn}/var"])
      out[key] = (np.asarray(kernel, np.float32) * g).astype(np.float32)
      out[f"{path}/bias"] = fold_bias(None, g, flat[f"{bn}/bias"], stats[f"{bn}/mean"])
    else:
      out[key] = np.asarray(kernel, np.float32)
      if f"{path}/bias" in flat:
        out[f"{path}/bias"] = np.asarray(flat[f"{path}/bias"], np.float32)
  return {"params": flax.traverse_util.unflatten_dict(out, sep="/")}
