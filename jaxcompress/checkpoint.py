"""Resumable runs: orbax checkpoints of the train state and an append-only metrics log."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
