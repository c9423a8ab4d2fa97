"""Data parallelism over every device of every process with ``jax.sharding`` (a 1-D ``data`` mesh).

Batches are split along their first axis over the mesh; parameters, optimizer state and model
state are replicated. Because the step is jitted over global arrays, every reduction (the loss
mean, BatchNorm batch statistics) is over the whole global batch, so N devices compute what one
device would.

Several processes (hosts of a GPU cluster or TPU pod, or processes on one machine) run the same
program after :func:`initialize_distributed`. Each one builds only its rows of every global batch
(:func:`local_rows`), :func:`shard_batch` joins them into one global array, and :func:`to_host`
gives every process the whole of a sharded result (per-example predictions, say). Files are
written by one process (:func:`is_main_process`), others wait for it with :func:`sync`.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import json
import os
import socket
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcompress.errors import ConfigError, invalid

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


def eval_batch_size(batch_size: int, examples: int, mesh: Mesh | None = None) -> int:
  """``batch_size``, at most ``examples`` rounded up to a multiple of the mesh's devices: a
  larger evaluation batch would only allocate padding (10**12 is no array of 10**12 images)."""
  devices = 1 if mesh is None else mesh.devices.size
  return min(batch_size, -(-examples // devices) * devices)


def local_rows(mesh: Mesh, batch_size: int, field: str = "data.batch_size") -> tuple[int, int]:
  """The rows ``[lo, hi)`` of a global batch of ``batch_size`` that this process's devices hold.

  With one process that is the whole batch; with P processes of equally many devices, a
  contiguous ``batch_size / P`` of it. ``batch_size`` must split evenly over the mesh: else one
  line naming ``field`` (:func:`check_batch_size`).
  """
  check_batch_size(batch_size, mesh, field)
  index_map = data_sharding(mesh).addressable_devices_indices_map((batch_size,))
  bounds = sorted((s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                  for s in index_map.values())
  for (_, stop), (start, _) in zip(bounds, bounds[1:]):
    if stop != start:
      raise ValueError(f"this process's devices hold rows {bounds} of the batch, not one "
                       "contiguous block; build the mesh with each process's devices together")
  return bounds[0][0], bounds[-1][1]


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Places this process's rows of a batch (a pytree of NumPy arrays) on the mesh, split on axis 0.

  With one process ``batch`` is the whole global batch. With several, each process passes its
  :func:`local_rows` and the result is the global batch they make together.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (x.shape[0] * mesh.devices.size // local, *x.shape[1:])), batch)


def to_host(tree: Any) -> Any:
  """The whole value of every array of ``tree`` as NumPy, on every process.

  An array sharded over the devices of several processes is gathered here (a collective: every
  process must call this with the same arrays); NumPy arrays and arrays this process holds whole
  are fetched as they are.
  """
  def get(x):
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(get, tree)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device of the mesh (the same value on every process)."""
  if jax.process_count() > 1:  # a process can only place values it holds: its host copy
    tree = jax.device_get(tree)
  return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes the files of a multi-process run."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches ``sync(name)`` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _broadcast_bytes(data: bytes) -> bytes:
  """Process 0's ``data`` on every process (a collective: all must call it)."""
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(len(data)))))
  if not size:
    return b""
  buffer = np.zeros(size, np.uint8)
  if is_main_process():
    buffer[:] = np.frombuffer(data, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-able ``obj`` on every process (``obj`` itself with one process).

  For results every process computes together but only process 0 completes (say the sizes of
  files only it writes): all processes then carry, and report, the same values.
  """
  if jax.process_count() == 1:
    return obj
  return json.loads(_broadcast_bytes(json.dumps(obj).encode() if is_main_process() else b""))


def on_main_process(fn: Callable[[], Any]) -> Any:
  """Runs ``fn`` on process 0 only; an exception it raises is raised on every process.

  For work that must happen once (claiming a workdir, writing a file) and that may refuse: every
  process then stops with the same error instead of waiting for process 0 forever. A
  :class:`ConfigError` or a built-in ``OSError`` (a workdir that cannot be made) reaches the
  other processes as the same kind with the same message, so each prints the same one line;
  anything else as a ``RuntimeError`` naming it.

  Returns:
    ``fn()``'s value on process 0, ``None`` on the others.
  """
  if jax.process_count() == 1:
    return fn()
  result, error, failure = None, None, {}
  if is_main_process():
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 (re-raised below, on every process)
      error, failure = e, {"type": type(e).__name__, "message": str(e)}
      if isinstance(e, OSError):
        failure.update(errno=e.errno, strerror=e.strerror,
                       filename=None if e.filename is None else os.fsdecode(e.filename))
  failure = broadcast_json(failure)
  if error is not None:
    raise error
  if failure:
    raise _same_failure(failure)
  return result


def _same_failure(failure: dict) -> Exception:
  """The exception another process raises for process 0's ``failure`` (:func:`on_main_process`)."""
  if failure["type"] == "ConfigError":
    return ConfigError(failure["message"])
  kind = getattr(builtins, failure["type"], None)
  if isinstance(kind, type) and issubclass(kind, OSError) and "errno" in failure:
    if failure["errno"] is None:
      return kind(failure["message"])
    return kind(failure["errno"], failure["strerror"], failure["filename"])
  return RuntimeError(f"process 0 failed: {failure['type']}: {failure['message']}")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How this process joins a multi-process run (``jax.distributed.initialize``).

  Empty fields (``""``, ``-1``) are detected by JAX from the environment, as on Cloud TPU pods
  and under SLURM or Open MPI; elsewhere set all three. Validated when built; errors name the
  field as ``parallel.<field>``, the config section jobs build it from.

  Attributes:
    distributed: join a multi-process run; False: this process alone uses its local devices.
    coordinator_address: ``HOST:PORT`` of the coordinator, which process 0 starts on its host.
    num_processes: how many processes run the job (-1: detect).
    process_id: this process's index in ``[0, num_processes)`` (-1: detect).
    initialization_timeout: seconds to wait for the coordinator and for every process to join.
  """
  distributed: bool = False
  coordinator_address: str = ""
  num_processes: int = -1
  process_id: int = -1
  initialization_timeout: int = 300

  def __post_init__(self):
    if not isinstance(self.distributed, (bool, np.bool_)):
      raise invalid("parallel.distributed", self.distributed, "True or False")
    if not isinstance(self.coordinator_address, str):
      raise invalid("parallel.coordinator_address", self.coordinator_address,
                    "a string HOST:PORT, or '' to detect it")
    for name in ("num_processes", "process_id", "initialization_timeout"):
      value = getattr(self, name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise invalid(f"parallel.{name}", value, "an integer")
    if self.num_processes == 0 or self.num_processes < -1:
      raise invalid("parallel.num_processes", self.num_processes, ">= 1, or -1 to detect it")
    if self.num_processes == -1 and self.process_id < -1:
      raise invalid("parallel.process_id", self.process_id, ">= 0, or -1 to detect it")
    if self.num_processes > 0 and not -1 <= self.process_id < self.num_processes:
      raise invalid("parallel.process_id", self.process_id,
                    f"in [0, {self.num_processes}) (parallel.num_processes is "
                    f"{self.num_processes}), or -1 to detect it")
    if not self.distributed:  # each process would run alone, all writing the same workdir
      for name, value, alone in (("num_processes", self.num_processes, 1),
                                 ("process_id", self.process_id, 0)):
        if value > alone:
          raise invalid(f"parallel.{name}", value, f"-1 or {alone} while parallel.distributed is "
                        "False", "set parallel.distributed=True to join a multi-process run")
    if self.initialization_timeout <= 0:
      raise invalid("parallel.initialization_timeout", self.initialization_timeout, "> 0 seconds")
    if self.coordinator_address:
      _host_port(self.coordinator_address)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "DistributedSpec":
    """The spec from the fields of ``values`` it names (a job's ``parallel`` config section)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if (not host or any(c.isspace() or c == "/" for c in host) or not port.isascii()
      or not port.isdigit() or not 0 < int(port) < 65536):
    raise invalid("parallel.coordinator_address", address, "HOST:PORT, e.g. 10.0.0.1:1234")
  return host.strip("[]"), int(port)


# Words of jax.distributed.initialize's errors -> the field to fix.
_INIT_FIELDS = (("coordinator", "coordinator_address"), ("process_id", "process_id"),
                ("process id", "process_id"), ("num_processes", "num_processes"),
                ("number of processes", "num_processes"))


def initialize_distributed(spec: DistributedSpec) -> None:
  """Joins the multi-process run ``spec`` describes (nothing unless ``spec.distributed``).

  Call it first, before anything else uses JAX (a second call, say from a job that runs the main
  job twice, does nothing). Where the coordinator's address, the number of processes and this
  process's id are given, the address is checked first, within ``spec.initialization_timeout``:
  process 0 must be able to serve it on its own host, the others must reach it. Cross-process
  collectives of CPU devices go through gloo. JAX's preemption service stays off: it would take
  SIGTERM from the handler a job installs (``experiments/cli.py``: stop, release the workdir,
  rerun to resume) and go on running.

  Raises:
    ConfigError: one line naming the field: the coordinator cannot be reached (or served) in time,
      JAX cannot detect or accept the settings, or the processes have different numbers of devices.
  """
  if not spec.distributed or jax.distributed.is_initialized():
    return
  if spec.coordinator_address and spec.process_id >= 0 and spec.num_processes > 0:
    _check_coordinator(spec.coordinator_address, spec.process_id, spec.initialization_timeout)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(
        spec.coordinator_address or None,
        None if spec.num_processes < 0 else spec.num_processes,
        None if spec.process_id < 0 else spec.process_id,
        initialization_timeout=spec.initialization_timeout)
  except (RuntimeError, ValueError, TypeError) as e:
    text = " ".join(str(e).split())
    field = next((f for key, f in _INIT_FIELDS if key in text.lower()), "distributed")
    raise ConfigError(f"parallel.{field}: jax.distributed.initialize failed ({text}); set "
                      "parallel.coordinator_address, parallel.num_processes and "
                      "parallel.process_id where JAX cannot detect them") from None
  check_devices_per_process(jax.devices())


def check_devices_per_process(devices) -> None:
  """Every process holds as many of ``devices`` (all of the run's) as the others.

  Each process builds its equal share of every global batch (:func:`local_rows`); every process
  sees the same device list, so every one of them stops here.
  """
  counts = collections.Counter(d.process_index for d in devices)
  if len(set(counts.values())) > 1:
    each = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
    raise ConfigError(f"parallel.distributed: the processes have different numbers of devices "
                      f"({each}); give each the same (CUDA_VISIBLE_DEVICES, XLA_FLAGS)")


def _check_coordinator(address: str, process_id: int, timeout: float) -> None:
  """Process 0: the coordinator's port is free on this host. Others: it answers within
  ``timeout`` seconds (process 0 may start later)."""
  host, port = _host_port(address)
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise ConfigError(f"parallel.coordinator_address: cannot resolve host {host!r} of "
                      f"{address} ({e.strerror})") from None
  family, _, _, _, sockaddr = infos[0]
  if process_id == 0:
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(sockaddr)
      except OSError as e:
        raise ConfigError(f"parallel.coordinator_address: process 0 starts the coordinator at "
                          f"{address} but cannot listen there ({e.strerror}); give an address "
                          "of process 0's host with a free port (is another process 0 running "
                          "there?)") from None
    return
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection(sockaddr[:2], timeout=max(0.1, min(
          5.0, deadline - time.monotonic()))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(f"parallel.coordinator_address: no coordinator answers at {address} "
                          f"after {timeout} s ({e.strerror or e}); start process 0 "
                          "(parallel.process_id=0) on that host, or fix the address") from None
      time.sleep(0.25)
