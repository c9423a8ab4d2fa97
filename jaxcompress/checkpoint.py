"""Resumable runs: orbax checkpoints of the train state, an append-only metrics log, and the
workdir bookkeeping (atomic JSON files, refusing a workdir that holds another config's run, one
writer per workdir through a lock file)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import socket
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcompress import parallel
from jaxcompress.errors import ConfigError, first_line
from jaxcompress.jsonio import dumps


def write_file(path: str, write: Callable[[str], Any]) -> None:
  """Writes ``path`` atomically: ``write(tmp)`` writes a temporary name (``PATH.PID.tmp``, this
  process's own), which is then renamed to ``path``, so a kill at any moment leaves the old file
  or the new one, never part of one.

  Raises:
    OSError: the write failed (a full disk, a read-only folder), naming ``path``; the temporary
      file is removed and ``path`` left as it was (as when Ctrl-C or SIGTERM stops the write).
  """
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException as e:  # a failed write, or Ctrl-C or SIGTERM during it
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError):  # a failed write() or close() names no file
      raise OSError(e.errno, e.strerror, path) from e
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` atomically (:func:`write_file`)."""

  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)

  write_file(path, write)


def write_json(path: str, obj: Any, *, strict: bool = True) -> None:
  """Writes JSON atomically (:func:`write_text`): strict, a number that is not finite written as
  ``null`` (:func:`dumps`), or with ``strict=False`` as Python's ``NaN``/``Infinity``, which
  :func:`read_json` reads back as they were (a job's own state that a rerun resumes from)."""
  write_text(path, dumps(obj, indent=2) if strict else json.dumps(obj, indent=2))


def read_json(path: str) -> dict:
  """The JSON object in ``path``, or ``{}`` when there is no such file.

  Raises:
    ConfigError: the file is not a JSON object (e.g. edited by hand): one line naming it.
  """
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      obj = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
      raise ConfigError(f"{path} is not valid JSON ({first_line(e)}); fix or delete it") from None
  if not isinstance(obj, dict):
    raise ConfigError(f"{path} holds a JSON {type(obj).__name__}, not an object; fix or delete "
                      "it")
  return obj



class Stages(dict):
  """A job's finished stages, ``{name: result}``, kept in ``WORKDIR/stages.json``.

  A stage is recorded once its outputs are complete, so a rerun skips exactly the stages that
  finished. With several processes, every process keeps process 0's result (the one that wrote
  the stage's files) and only process 0 writes the file.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "stages.json")
    super().__init__(read_json(self.path))  # empty when the workdir does not exist yet

  def record(self, name: str, result: Any) -> Any:
    """Records ``result`` as stage ``name``'s and returns process 0's."""
    self[name] = parallel.broadcast_json(result)
    # Process 0 writes; its failure (a full disk) stops every process, where the others would
    # wait for it at their next collective. A rerun reads a nan loss back as nan.
    parallel.on_main_process(lambda: write_json(self.path, dict(self), strict=False))
    return self[name]

  def __call__(self, name: str, fn) -> Any:
    """Stage ``name``'s recorded result, running ``fn()`` for it first if it has none."""
    return self[name] if name in self else self.record(name, fn())


LOCK_NAME = "lock"
_held: set[str] = set()  # real paths of the lock files this process holds


def _pid_alive(pid: int) -> bool:
  """Whether process ``pid`` runs on this host (one of another user's counts as alive; a zombie,
  killed but not yet reaped by its parent, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # Linux: the state follows the command name, which is in parentheses
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):  # no /proc (macOS), or the process is gone meanwhile
    return True


def _read_lock(path: str) -> dict | None:
  """The lock's ``{pid, host, time}``, or ``None`` when it is gone or unreadable."""
  try:
    with open(path) as f:
      lock = json.load(f)
    return lock if isinstance(lock, dict) and isinstance(lock.get("pid"), int) else None
  except (OSError, ValueError):
    return None


def _create_lock(path: str, lock: dict) -> bool:
  """Creates ``path`` holding ``lock`` atomically; False when it already exists."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(lock, f)
    os.link(tmp, path)  # atomic, and never shows a half-written lock
    return True
  except FileExistsError:
    return False
  except OSError as e:  # a full disk, a read-only folder: the error names the lock
    raise OSError(e.errno, e.strerror, path) from e
  finally:
    if os.path.exists(tmp):  # a failed write leaves none behind either
      os.unlink(tmp)


def _release_locks() -> None:
  """Removes, at exit, the locks this process holds (a forked child leaves its parent's alone)."""
  for path in list(_held):
    lock = _read_lock(path)
    if lock is not None and lock["pid"] == os.getpid() and lock.get("host") == socket.gethostname():
      try:
        os.unlink(path)
      except FileNotFoundError:
        pass
    _held.discard(path)


atexit.register(_release_locks)


def _describe(lock: dict) -> str:
  """``process PID (started HH:MM:SS on host H)`` for the refusal line."""
  started = time.localtime(lock["time"] if isinstance(lock.get("time"), (int, float)) else 0)
  fmt = "%H:%M:%S" if started[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
  return (f"process {lock['pid']} (started {time.strftime(fmt, started)} on host "
          f"{lock.get('host', '?')})")


def claim_workdir(workdir: str) -> bool:
  """Makes this process the only writer of ``workdir`` until it exits.

  Writes ``WORKDIR/lock`` (pid, hostname, start time) atomically; it is removed when the process
  exits normally, and one left by a crashed process on this host is taken over with a warning.
  Claiming a workdir this process already holds does nothing.

  Args:
    workdir: the run's folder (it must exist).

  Returns:
    True when this call took the lock, False when this process already held it.

  Raises:
    ConfigError: when a live process on this host, or any process on another host, holds it.
  """
  path = os.path.join(workdir, LOCK_NAME)
  key = os.path.realpath(path)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
  for _ in range(10):
    if _create_lock(path, me):
      _held.add(key)
      return True
    lock = _read_lock(path)
    if lock is None:
      if os.path.exists(path):
        raise ConfigError(f"workdir {workdir} has an unreadable lock file {path}; delete it if no "
                          "job is running there")
      continue  # released meanwhile: try again
    if lock.get("host") != me["host"]:
      raise ConfigError(f"workdir {workdir} is in use by {_describe(lock)}; wait for it or use "
                        f"another workdir (if that job is gone, delete {path})")
    if lock["pid"] == me["pid"]:
      new = key not in _held
      _held.add(key)
      return new
    if _pid_alive(lock["pid"]):
      raise ConfigError(f"workdir {workdir} is in use by {_describe(lock)}; wait for it or use "
                        "another workdir")
    # A crashed run's lock: move it aside, and put it back if a rival replaced it meanwhile.
    stale = f"{path}.{me['pid']}.stale"
    try:
      os.rename(path, stale)
    except FileNotFoundError:
      continue
    if _read_lock(stale) != lock:
      try:
        os.link(stale, path)
      except FileExistsError:
        pass
    else:
      warnings.warn(f"workdir {workdir}: taking over the lock left by {_describe(lock)}, which "
                    "is no longer running", stacklevel=2)
    os.unlink(stale)
  raise ConfigError(f"workdir {workdir}: could not take its lock {path} (other jobs keep "
                    "claiming it); try again")


RESUMABLE = ("parallel",)  # the number of processes: a run may resume on another one


def check_workdir(config: dict, workdir: str, *, ignore: Sequence[str] = RESUMABLE) -> None:
  """Creates and claims ``workdir`` and records ``config``; refuses another config's or job's.

  In a run of several processes (``jax.distributed``) process 0 alone claims and records the
  workdir for all of them, and its refusal is raised on every process.

  Args:
    config: the run's settings as a JSON-able dict of sections (an object with a ``to_json()``
      method, such as an ``ml_collections.ConfigDict``, is converted with it).
    workdir: the run's folder.
    ignore: fields left out of the record, settings a resumed run may change: sections or
      dotted fields (``train.epochs``, to extend a run). By default the ``parallel`` section
      (:mod:`jaxcompress.parallel`'s processes: a run's batches do not depend on them).

  Raises:
    ConfigError: naming the first config field that differs from the run already in ``workdir``
      (e.g. ``student.name``) with both values, or the process that holds its lock (see
      :func:`claim_workdir`).
  """
  parallel.on_main_process(lambda: _check_workdir(config, workdir, tuple(ignore)))


def _check_workdir(config, workdir: str, ignore: tuple[str, ...]) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  saved = read_json(path)  # a broken record is refused before the lock is taken
  claimed = claim_workdir(workdir)
  to_json = getattr(config, "to_json", None)
  current = _without(json.loads(to_json() if to_json is not None else json.dumps(config)), ignore)
  saved = saved and _without(saved, ignore)  # ignored even where an older run recorded them
  if saved and saved != current:
    if claimed:  # this call took the lock only to refuse: leave the workdir as it was
      release_workdir(workdir)
    diff = config_diff(saved, current)
    field, there, here = diff[0]
    more = f" and {len(diff) - 1} more field{'s' * (len(diff) > 2)}" if len(diff) > 1 else ""
    raise ConfigError(f"--workdir={workdir} holds a run with a different config: {field} is "
                      f"{there} there, {here} here{more}; use a new --workdir or delete that one")
  if not saved:
    write_json(path, current)


def _without(config: dict, fields: tuple[str, ...]) -> dict:
  """``config`` without the (dotted) ``fields``."""
  for field in fields:
    *sections, key = field.split(".")
    node = config
    for section in sections:
      node = node.get(section, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
      node.pop(key, None)
  return config


_MISSING = object()


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, str, str]]:
  """The fields where two JSON configs differ, in ``saved``'s order (then ``current``'s).

  Returns:
    ``[(dotted field, saved value, current value)]`` with the values as JSON text (``absent``
    where a side lacks the field); sections (dicts) are compared field by field.
  """
  text = lambda v: "absent" if v is _MISSING else json.dumps(v)
  out = []
  for key in [*saved, *(k for k in current if k not in saved)]:
    a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, f"{prefix}{key}.")
    elif a is _MISSING or b is _MISSING or a != b:
      out.append((f"{prefix}{key}", text(a), text(b)))
  return out


def release_workdir(workdir: str) -> None:
  """Gives up this process's lock on ``workdir`` before it exits (nothing if it holds none)."""
  path = os.path.join(workdir, LOCK_NAME)
  key = os.path.realpath(path)
  lock = _read_lock(path)
  if key in _held and lock is not None and lock["pid"] == os.getpid():
    os.unlink(path)
  _held.discard(key)


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # disk, quota, size, ro


def write_error_code(error: BaseException | str) -> int | None:
  """The ``errno`` of a write the file system refused (:data:`WRITE_FAILURES`), raised as an
  ``OSError`` or, by tensorstore, as an error whose text holds ``os_error_code='28'``; or
  ``None``."""
  if isinstance(error, OSError):
    code = error.errno
  else:
    found = re.search(r"os_error_code='?(\d+)", str(error))
    code = int(found[1]) if found else None
  return code if code in WRITE_FAILURES else None


class Checkpointer:
  """Saves and restores a train-state pytree (plus a small JSON of host-side progress).

  Only complete checkpoints are ever restored (orbax commits a step atomically), so a run killed
  mid-save resumes from the previous one; one written for another model or config is refused,
  naming the first entry that differs.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = directory
    self._closed = False
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    # Orbax removes the steps a save outdates after committing it, and those a kill in between
    # left only at the next save, which a resumed run that has finished never makes. A step
    # folder with no train state in it (empty, or cut short by a copy) outdates none.
    steps = sorted(self._manager.all_steps())
    if len(steps) > max_to_keep:
      for step in [s for s in steps if self._holds_state(s)][:-max_to_keep]:
        self._manager.delete(step)

  def _holds_state(self, step: int) -> bool:
    """Whether the folder of ``step`` holds the metadata of a saved train state."""
    try:
      self._manager.item_metadata(step)["state"]
    except Exception:  # orbax and tensorstore raise many types for a damaged folder
      return False
    return True

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    """Saves ``state`` and ``meta`` as ``step``, which must come after every step saved.

    Raises:
      ConfigError: for a step at or before the latest one (orbax would skip it without a word,
        and a resume would go back to that later step).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      later = [s for s in self._manager.all_steps() if s >= step]
      raise ConfigError(f"{self.directory}: step {step} cannot be saved, the folder holds step "
                        f"{latest} already (checkpoints go forward); delete the steps "
                        f"{later} to go on from an earlier one, or save into another folder")
    with self._disk_errors():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))

  @contextlib.contextmanager
  def _disk_errors(self):
    """Raises a write the file system refused (a full disk: :func:`write_error_code`), which
    tensorstore raises as a ``ValueError`` and Python's writes without a file name, as the
    ``OSError`` it is, naming the checkpoint folder."""
    try:
      yield
    except Exception as e:  # orbax and tensorstore raise many types
      code = write_error_code(e)
      if code is None or isinstance(e, OSError) and e.filename is not None:
        raise
      raise OSError(code, os.strerror(code), self.directory) from None

  def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` shaped like ``like`` from ``step`` (default: the latest).

    Raises:
      ConfigError: the checkpoint holds other entries, shapes or dtypes than ``like`` (written by
        another model or config), naming the first entry that differs; or it cannot be read (a
        damaged folder), naming it and the earlier step to resume from.
    """
    step = self.latest_step() if step is None else step
    steps = list(self._manager.all_steps())
    if step not in steps:
      raise ConfigError(f"{self.directory}: no checkpoint of step {step} to restore (steps "
                        f"saved: {sorted(steps) or 'none'})")
    try:
      stored = _entries(self._manager.item_metadata(step)["state"])
    except Exception as e:  # orbax and tensorstore raise many types for a damaged folder
      raise self._damaged(step, e) from None
    wanted = _entries(like)
    for path in [*wanted, *(p for p in stored if p not in wanted)]:
      there, here = stored.get(path, "absent"), wanted.get(path, "absent")
      if there != here:  # checked first: orbax would cast another dtype without a word
        raise ConfigError(f"{self.directory}: the checkpoint of step {step} was written for "
                          f"another model or config: {path} is {there} there, {here} here; "
                          "use a new --workdir or delete that one") from None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._damaged(step, e) from None
    return out["state"], dict(out["meta"] or {})

  def _damaged(self, step: int, error: Exception) -> ConfigError:
    """The one line for a checkpoint folder that cannot be read."""
    folder = os.path.join(self.directory, str(step))
    steps = sorted(self._manager.all_steps())
    earlier = [s for s in steps if s < step and self._holds_state(s)]
    # Resuming takes the latest step folder: every one after the step to resume from must go.
    later = [os.path.join(self.directory, str(s)) for s in steps if earlier and s > earlier[-1]]
    fix = (f"delete {' and '.join(later)} to resume from step {earlier[-1]}" if earlier else
           "delete it or use a new --workdir")
    cause = first_line(error).split(" [tensorstore_spec=")[0]  # the spec is a page of JSON
    cause = cause if len(cause) <= 200 else cause[:197] + "..."
    return ConfigError(f"{folder}: the checkpoint of step {step} cannot be read, it is damaged "
                       f"({cause}); {fix}")

  def close(self) -> None:
    """Waits for a save in flight to commit, then releases orbax's threads (again: no-op)."""
    if not self._closed:
      self._closed = True
      with self._disk_errors():
        self._manager.wait_until_finished()
      self._manager.close()


def _entries(tree: Any) -> dict[str, str]:
  """``{'a/b/c': 'shape dtype'}`` of the arrays of a pytree or of orbax's metadata tree."""
  tree = getattr(tree, "tree", tree)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if not hasattr(leaf, "dtype"):  # a Python scalar (flax's TrainState starts at step=0)
      leaf = np.asarray(leaf)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # stored as its key data
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    out["/".join(names)] = f"{tuple(leaf.shape)} {jax.numpy.dtype(leaf.dtype).name}"
  return out


class MetricsLog:
  """Appends one JSON object per line to ``path`` (``metrics.jsonl``; strict JSON, a value that is
  not finite written as ``null``: :func:`dumps`); reads them back."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict) -> None:
    """Appends ``record``, first dropping a last line a crash or a full disk cut short (which
    :meth:`read` skips; a record appended to it would make both unreadable).

    Raises:
      OSError: the append failed (a full disk), naming the file.
    """
    self._drop_cut_line()
    try:
      with open(self.path, "a") as f:
        f.write(dumps(record) + "\n")
    except OSError as e:  # a full disk: write() and close() name no file
      raise OSError(e.errno, e.strerror, self.path) from e

  def _drop_cut_line(self) -> None:
    if not os.path.exists(self.path) or not os.path.getsize(self.path):
      return
    with open(self.path, "rb+") as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)

  def read(self) -> list[dict]:
    """The records; a last line cut short by a crash (no newline yet) is not one."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]

  def write_final(self, step: int, metrics: dict) -> None:
    """Appends ``{step, final: True, **metrics}`` on process 0, unless a final record of this
    ``step`` is there already (a rerun of a finished run; a run extended to more steps gets its
    own). Every process calls it: a failure to write is raised on each
    (:func:`parallel.on_main_process`)."""
    def write() -> None:
      if not any(r.get("final") and r.get("step") == step for r in self.read()):
        self.write({"step": step, "final": True, **metrics})

    parallel.on_main_process(write)

  def truncate_after(self, step: int, *, redo_eval: bool = False) -> None:
    """Drops records logged after ``step`` (they belong to work a resume will redo) and, with
    ``redo_eval``, ``step``'s own evaluation record (a checkpoint that did not evaluate its step
    is evaluated by each resume from it).

    An evaluation record is one that is neither a training record (those hold
    ``images_per_s``) nor a final one (``final``: written by the caller after training).
    """
    def keep(r: dict) -> bool:
      n, evaluation = r.get("step", 0), "images_per_s" not in r and not r.get("final")
      return n < step or n == step and not (redo_eval and evaluation)

    if os.path.exists(self.path):
      kept = [r for r in self.read() if keep(r)]
      write_text(self.path, "".join(dumps(r) + "\n" for r in kept))
