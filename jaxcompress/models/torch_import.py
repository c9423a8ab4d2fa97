"""Import a PyTorch-layout ``state_dict`` (saved as ``.npz``) into Flax variables.

PyTorch names map onto Flax paths by replacing ``.`` with ``/`` and joining the block index
(``layer1.0.conv1.weight`` -> ``layer1_0/conv1/kernel``, as Linen names a list's modules; where
the model has ``layer1/0/...`` instead, as an NNX list does, that path is taken). Conv kernels go
from ``[out, in, *window]`` to ``[*window, in, out]`` (1-D, 2-D and 3-D convs), linear weights from
``[out, in]`` to ``[in, out]``; BatchNorm ``weight``/``bias`` become ``scale``/``bias`` params and
``running_mean``/``running_var`` become ``batch_stats``. Arrays take the model's dtypes.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import flax
import jax
import numpy as np
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.models.functional import set_variables, variables_of

_IGNORED = ("num_batches_tracked",)
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_BN_PARAMS = {"weight": "scale", "bias": "bias"}


def _module_paths(torch_name: str) -> tuple[list[tuple[str, ...]], str]:
  """``layer1.0.bn1.running_var`` -> ``([('layer1_0', 'bn1'), ('layer1', '0', 'bn1')], ...)``.

  The module path with each list index joined to the name before it (Linen's ``layer1_0``), then
  with the index as a path entry of its own (an NNX list's ``layer1/0``).
  """
  *modules, leaf = torch_name.split(".")
  joined: list[str] = []
  for part in modules:
    if part.isdigit() and joined:
      joined[-1] = f"{joined[-1]}_{part}"
    else:
      joined.append(part)
  return list(dict.fromkeys([tuple(joined), tuple(modules)])), leaf


def _flax_key(torch_name: str, bn_modules: set[tuple[str, ...]], ref_flat: Mapping,
              source: str) -> tuple[str, ...]:
  """Returns ``(collection, *path)`` of the Flax variable a PyTorch tensor becomes.

  Of the candidate module paths (:func:`_module_paths`), the first the model has; else the first.
  """
  modules, leaf = _module_paths(torch_name)
  keys = []
  for module in modules:
    if leaf in _BN_STATS:
      keys.append(("batch_stats", *module, _BN_STATS[leaf]))
    elif module in bn_modules and leaf in _BN_PARAMS:
      keys.append(("params", *module, _BN_PARAMS[leaf]))
    elif leaf in ("weight", "bias"):
      keys.append(("params", *module, "kernel" if leaf == "weight" else "bias"))
    else:
      raise ConfigError(f"{source}: tensor {torch_name!r} has no Flax counterpart (expected "
                        ".weight, .bias, .running_mean or .running_var)")
  return next((k for k in keys if k in ref_flat), keys[0])


def _to_flax_layout(x: np.ndarray) -> np.ndarray:
  if x.ndim >= 3:  # conv [out, in, *window] -> [*window, in, out]
    return np.transpose(x, (*range(2, x.ndim), 1, 0))
  if x.ndim == 2:  # linear [out, in] -> [in, out]
    return x.T
  return x


def torch_to_flax(state_dict: Mapping[str, np.ndarray], reference: Mapping[str, Any], *,
                  source: str = "weights") -> dict[str, Any]:
  """Converts a PyTorch ``state_dict`` into Flax variables shaped like ``reference``.

  Args:
    state_dict: PyTorch names -> numpy arrays.
    reference: Flax variables of the target model (e.g. from ``model.init``); used for the
      expected shapes and to check that nothing is missing or left over.
    source: name of the file, for messages.

  Returns:
    Variables ``{'params': ..., 'batch_stats': ...}`` (only the collections ``reference`` has)
    holding numpy arrays of ``reference``'s dtypes.

  Raises:
    ConfigError: naming the offending path on any missing, unexpected, wrong-shaped or doubly
      given tensor (two names that map to one Flax path).
  """
  ref_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(reference))
  bn_modules = {k[1:-1] for k in ref_flat if k[0] == "batch_stats"}
  out, names = {}, {}
  for name, value in state_dict.items():
    if name.split(".")[-1] in _IGNORED:
      continue
    value = np.asarray(value)
    key = _flax_key(name, bn_modules, ref_flat, source)
    if key in names:
      raise ConfigError(f"{source}: tensors {names[key]!r} and {name!r} both map to "
                        f"{'/'.join(key)!r}; keep one of them in the state dict")
    names[key] = name
    if key not in ref_flat:
      raise ConfigError(f"{source}: tensor {name!r} maps to {'/'.join(key)!r}, which the model "
                        "does not have; is this file for another architecture or depth?")
    converted = _to_flax_layout(value).astype(ref_flat[key].dtype)
    expected = tuple(ref_flat[key].shape)
    if converted.shape != expected:
      raise ConfigError(f"{source}: {'/'.join(key)} (from {name!r}) has shape {converted.shape} "
                        f"after layout conversion, the model expects {expected}; is this file for "
                        "another architecture, depth or number of classes?")
    out[key] = converted
  missing = sorted("/".join(k) for k in ref_flat if k not in out)
  if missing:
    raise ConfigError(f"{source}: missing {len(missing)} tensors the model needs, first "
                      f"{missing[0]!r}; is this file for another architecture or depth?")
  return flax.traverse_util.unflatten_dict(out)


def load_npz(path: str, *, field: str = "model.weights") -> dict[str, np.ndarray]:
  """Reads an ``.npz`` state dict with a one-line error for a missing or unreadable file."""
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no such file {path!r}; pretrained CIFAR ResNets are in "
                      "../shared/pretrained/ (resnet20_cifar10.npz, resnet56_cifar10.npz)")
  if not zipfile.is_zipfile(path):
    raise ConfigError(f"{field}: {path!r} is not a readable .npz file (not a zip archive of "
                      "arrays: a state dict saved with numpy.savez(path, **state_dict))")
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ConfigError(f"{field}: {path!r} is not a readable .npz file ({e})") from None


def load_pytorch_npz(model, path: str, *, input_shape=(1, 32, 32, 3),
                     field: str = "model.weights") -> dict[str, Any]:
  """Loads a PyTorch ``.npz`` state dict into variables for ``model``.

  Args:
    model: the Flax module the weights are for: a Linen module, or an NNX module, which takes
      them into its own state as well.
    path: the ``.npz`` file.
    input_shape: a shape to trace a Linen ``model.init`` with (only shapes are computed).
    field: config field name for messages.

  Returns:
    Flax variables (``params`` and, where the model has BatchNorm, ``batch_stats``).
  """
  if isinstance(model, nnx.Module):
    variables = torch_to_flax(load_npz(path, field=field), variables_of(model),
                              source=f"{field}={path}")
    set_variables(model, variables)
    return variables
  reference = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(input_shape,
                                                                             np.float32)))
  return torch_to_flax(load_npz(path, field=field), reference, source=f"{field}={path}")
