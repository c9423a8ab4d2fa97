"""Mixed precision: the dtype a training forward and backward run in (``train.compute_dtype``).

Parameters, optimizer state and model state stay float32; a train step casts the floating
parameters and inputs to the compute dtype where they enter the model (the gradients come back
float32 through the cast), and casts what leaves it (logits, features, updated statistics) back
to float32, so every loss term is computed in float32. Fake quantization quantizes the float32
weights and takes its scales in float32, and only then casts (see
:func:`jaxcompress.quantization.quantize`), so the integer codes an export writes do not depend
on the compute dtype. Evaluation always runs in float32: the fake-quant model then matches its
exported artifact exactly.

Stored side arrays (``quant.scale_dtype``): an export may keep the per-output-channel weight
scales and the folded BatchNorm gains and biases in float16 instead of float32 (2 bytes per
channel and array instead of 4). The values are then rounded to float16 once (:func:`to_half`),
and the fake-quant model's evaluation runs with the same rounded values, so it still matches the
artifact exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.errors import unknown

COMPUTE_DTYPES = ("float32", "bfloat16")
SCALE_DTYPES = ("float32", "float16")
HALF_MAX = float(jnp.finfo(jnp.float16).max)  # 65504


def compute_dtype(name: Any, field: str = "train.compute_dtype") -> jnp.dtype:
  """The dtype ``name`` gives: one of :data:`COMPUTE_DTYPES`, by name or as a dtype
  (``jnp.bfloat16``); a one-line error otherwise."""
  try:
    key = name if isinstance(name, str) or name is None else jnp.dtype(name).name
  except (TypeError, ValueError):
    key = None
  if key not in COMPUTE_DTYPES:
    raise unknown(field, name, COMPUTE_DTYPES)
  return jnp.dtype(key)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating-point leaves as ``dtype``; integer leaves (token ids, step
  counts) unchanged; nothing done when ``dtype`` is None."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def to_half(x: Any) -> jax.Array:
  """``x`` rounded to the nearest float16 value (saturating at +-65504), returned as float32.

  One implementation (XLA's conversion, round to nearest even) for the export and the fake-quant
  model's evaluation, inside ``jit`` or not, so both hold the very same values.
  """
  y = jnp.clip(jnp.asarray(x, jnp.float32), -HALF_MAX, HALF_MAX)
  return y.astype(jnp.float16).astype(jnp.float32)
