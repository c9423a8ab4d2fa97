"""Data parallelism over all local devices with ``jax.sharding`` (a 1-D ``data`` mesh).

Batches are split along their first axis over the mesh; parameters, optimizer state and model
state are replicated. Because the step is jitted over global arrays, every reduction (the loss
mean, BatchNorm batch statistics) is over the whole global batch, so N devices compute what one
device would.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcompress.errors import invalid

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: first axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and state: a full copy on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "data.batch_size") -> None:
  """Raises a one-line ConfigError unless ``batch_size`` splits evenly over the mesh."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise invalid(field, batch_size, f"a positive multiple of the {n} devices",
                  f"try {max(n, batch_size // n * n)}")


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Places a host batch (pytree of NumPy arrays, global view) on the mesh, split on axis 0."""
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls ``jax.distributed.initialize()`` (multi-host) when ``enabled``; a no-op otherwise."""
  if enabled:
    jax.distributed.initialize()
