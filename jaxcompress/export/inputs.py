"""The artifact's input signature: what one example of the model's input looks like.

A model takes one array (an image, a row of token ids) or one pytree of arrays (a dict of an image
and its metadata, a tuple of two sequences). The spec stores each array's shape without the
batch axis and its dtype, in JSON: ``{"shape": [32, 32, 3], "dtype": "float32"}`` for one array,
``{"dict": {name: signature}}`` and ``{"tuple": [signature, ...]}`` for containers (nested as the
input is). :func:`load` builds zeros of this signature to trace the user's module, and
``save_serving`` exports its function for it with a symbolic batch size.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import ConfigError, invalid


def of_example(example: Any) -> dict:
  """The signature of a pytree of arrays with a leading batch axis (e.g. ``build``'s sample).

  Raises:
    ConfigError: for a leaf without a batch axis or a container other than dict, tuple, list.
  """
  return _encode(example, "inputs", lambda a: tuple(np.shape(a))[1:], batch=True)


def of_shapes(inputs: Any, field: str = "inputs") -> dict:
  """The signature of a pytree of ``jax.ShapeDtypeStruct`` (or arrays) of one example each, no
  batch axis."""
  return _encode(inputs, field, lambda a: tuple(np.shape(a)), batch=False)


def of_shape(shape: Any, dtype: Any, field: str = "input_shape") -> dict:
  """The signature of one array input of ``shape`` (no batch axis) and ``dtype``.

  Raises:
    ConfigError: for a shape that is not a sequence of positive integers, or an unknown dtype.
  """
  try:
    dims = [int(d) for d in shape]
    ok = all(d > 0 and d == e for d, e in zip(dims, shape))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"{field} must be one example's shape, a sequence of positive integers "
                      f"(e.g. (32, 32, 3)), got {shape!r}")
  return {"shape": dims, "dtype": _dtype_name(dtype, "input_dtype")}


def single(signature: Mapping[str, Any]) -> tuple[tuple[int, ...], np.dtype] | None:
  """``(shape, dtype)`` of a one-array signature; None for a pytree of inputs."""
  if "shape" in signature:
    return tuple(signature["shape"]), np.dtype(signature["dtype"])
  return None


def image_shape(signature: Mapping[str, Any], expected: tuple[int, ...] | None = None, *,
                dataset: str = "", field: str = "exported") -> tuple[int, ...]:
  """The shape of the one image a signature takes, checked against ``expected`` (a dataset's
  image shape; None: any shape and dtype).

  Raises:
    ConfigError: ``{field} input must be one float image of shape ... for {dataset}``, naming
      the signature, for a pytree of inputs or (with ``expected``) an image of another shape or
      of integers (the dataset's images are fed normalised, as float32).
  """
  one = single(signature)
  if one is None or (expected is not None and (
      one[0] != tuple(expected) or not jnp.issubdtype(one[1], jnp.floating))):
    valid = ("one image" if expected is None else
             f"one float image of shape {tuple(expected)} for {dataset}")
    fix = None if expected is None else "its images are fed normalised, as float32"
    raise invalid(f"{field} input", describe(signature), valid, fix)
  return one[0]


def check(signature: Any) -> str | None:
  """What is wrong with a signature read from a spec, or None when it is well-formed."""
  if not isinstance(signature, dict):
    return f"input {signature!r} is not an object"
  if set(signature) == {"shape", "dtype"}:
    shape = signature["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
      return f"input shape {shape!r} is not a list of positive integers"
    try:
      np.dtype(signature["dtype"])
    except TypeError:
      return f"input dtype {signature['dtype']!r} is not a dtype"
    return None
  if set(signature) == {"dict"} and isinstance(signature["dict"], dict) and signature["dict"]:
    parts = signature["dict"].values()
  elif set(signature) == {"tuple"} and isinstance(signature["tuple"], list) and signature["tuple"]:
    parts = signature["tuple"]
  else:
    return f"input {signature!r} is not a shape and dtype, a dict or a tuple of them"
  return next((bad for bad in map(check, parts) if bad), None)


def build(signature: Mapping[str, Any], leaf: Callable[[tuple[int, ...], np.dtype], Any]) -> Any:
  """The input pytree with ``leaf(shape, dtype)`` at every array of ``signature``."""
  if "shape" in signature:
    return leaf(tuple(signature["shape"]), np.dtype(signature["dtype"]))
  if "dict" in signature:
    return {k: build(v, leaf) for k, v in signature["dict"].items()}
  return tuple(build(v, leaf) for v in signature["tuple"])


def zeros(signature: Mapping[str, Any], batch: int) -> Any:
  """A batch of zeros of every input."""
  return build(signature, lambda shape, dtype: np.zeros((batch, *shape), dtype))


def describe(signature: Mapping[str, Any]) -> str:
  """The signature for a message, e.g. ``{'image': (8, 8, 3) float32, 'meta': (4,) int32}``."""
  if "shape" in signature:
    return f"{tuple(signature['shape'])} {signature['dtype']}"
  if "dict" in signature:
    return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in signature["dict"].items()) + "}"
  return "(" + ", ".join(describe(v) for v in signature["tuple"]) + ")"


def structs(signature: Mapping[str, Any], batch: Any, dtype: Any = None) -> Any:
  """``jax.ShapeDtypeStruct`` of every input with batch size ``batch`` (symbolic or an int);
  ``dtype`` in place of the stored one where given."""
  return build(signature, lambda shape, d: jax.ShapeDtypeStruct((batch, *shape), dtype or d))


def with_batch(signature: Mapping[str, Any], dtype: Any = None) -> dict:
  """The signature with a leading ``"batch"`` axis on every shape (and ``dtype`` in place of the
  stored one where given), as ``signature.json`` describes a serving function's input."""
  if "shape" in signature:
    return {"shape": ["batch", *signature["shape"]],
            "dtype": np.dtype(dtype or signature["dtype"]).name}
  if "dict" in signature:
    return {"dict": {k: with_batch(v, dtype) for k, v in signature["dict"].items()}}
  return {"tuple": [with_batch(v, dtype) for v in signature["tuple"]]}


def _encode(tree: Any, field: str, shape_of: Callable[[Any], tuple], *, batch: bool) -> dict:
  if isinstance(tree, Mapping):
    if not tree or not all(isinstance(k, str) for k in tree):
      raise ConfigError(f"{field}: a dict input must have string keys and at least one entry, "
                        f"got keys {list(tree)!r}")
    return {"dict": {k: _encode(v, f"{field}[{k!r}]", shape_of, batch=batch)
                     for k, v in tree.items()}}
  if isinstance(tree, (tuple, list)):
    if not tree:
      raise ConfigError(f"{field}: an empty {type(tree).__name__} is not an input")
    return {"tuple": [_encode(v, f"{field}[{i}]", shape_of, batch=batch)
                      for i, v in enumerate(tree)]}
  if not hasattr(tree, "shape") or not hasattr(tree, "dtype"):
    raise ConfigError(f"{field} must be an array (or a dict or tuple of arrays), got "
                      f"{type(tree).__name__} {tree!r:.60}")
  if batch and not np.ndim(tree):
    raise ConfigError(f"{field} must have a leading batch axis, got a scalar")
  # the dtype the model runs on: a float64 NumPy sample is float32 in JAX unless x64 is on
  dtype = jax.dtypes.canonicalize_dtype(tree.dtype)
  return {"shape": list(shape_of(tree)), "dtype": _dtype_name(dtype, field)}


def _dtype_name(dtype: Any, field: str) -> str:
  try:
    return np.dtype(dtype).name
  except TypeError:
    raise ConfigError(f"{field} must be a NumPy dtype name (float32, int32, uint8, ...), got "
                      f"{dtype!r}") from None
