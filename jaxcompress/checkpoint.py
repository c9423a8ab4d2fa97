"""Resumable runs: orbax checkpoints of the train state, an append-only metrics log, and the
workdir bookkeeping (atomic JSON files, refusing a workdir that holds another config's run)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcompress.errors import ConfigError


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): a crash never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  """The JSON object in ``path``, or ``{}`` when there is no such file."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def check_workdir(config: dict, workdir: str) -> None:
  """Creates ``workdir`` and records ``config`` there; refuses one that holds another config.

  Args:
    config: the run's settings as a JSON-able dict of sections (an object with a ``to_json()``
      method, such as an ``ml_collections.ConfigDict``, is converted with it).
    workdir: the run's folder.

  Raises:
    ConfigError: naming the config sections that differ from the run already in ``workdir``.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  to_json = getattr(config, "to_json", None)
  current = json.loads(to_json() if to_json is not None else json.dumps(config))
  saved = read_json(path)
  if saved and saved != current:
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ConfigError(f"--workdir={workdir} holds a run with a different config (sections "
                      f"{', '.join(diff)} differ); use a new --workdir or delete that one")
  if not saved:
    write_json(path, current)


class Checkpointer:
  """Saves and restores a train-state pytree (plus a small JSON of host-side progress).

  Only complete checkpoints are ever restored (orbax commits a step atomically), so a run killed
  mid-save resumes from the previous one.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))

  def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` shaped like ``like`` from ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"] or {})

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class MetricsLog:
  """Appends one JSON object per line to ``path`` (``metrics.jsonl``); reads them back."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, step: int) -> None:
    """Drops records logged after ``step`` (they belong to work a resume will redo)."""
    kept = [r for r in self.read() if r.get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
