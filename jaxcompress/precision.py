"""Mixed precision: the dtype a training forward and backward run in (``train.compute_dtype``).

Parameters, optimizer state and model state stay float32; a train step casts the floating
parameters and inputs to the compute dtype where they enter the model (the gradients come back
float32 through the cast), and casts what leaves it (logits, features, updated statistics) back
to float32, so every loss term is computed in float32. Fake quantization quantizes the float32
weights and takes its scales in float32, and only then casts (see
:func:`jaxcompress.quantization.quantize`), so the integer codes an export writes do not depend
on the compute dtype. Evaluation always runs in float32: the fake-quant model then matches its
exported artifact exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.errors import unknown

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str, field: str = "train.compute_dtype") -> jnp.dtype:
  """The dtype named ``name`` (one of :data:`COMPUTE_DTYPES`); a one-line error otherwise."""
  if name not in COMPUTE_DTYPES:
    raise unknown(field, name, COMPUTE_DTYPES)
  return jnp.dtype(name)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating-point leaves as ``dtype``; integer leaves (token ids, step
  counts) unchanged; nothing done when ``dtype`` is None."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)

