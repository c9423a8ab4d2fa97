"""Supervised training: a resumable, data-parallel loop around any jitted train step.

:func:`fit` runs epochs of a train step with a progress bar (step, loss, images/s), appends metrics
to ``workdir/metrics.jsonl``, saves orbax checkpoints every N steps and resumes from the latest one
when started again with the same ``workdir``. Jobs (``experiments/train_job.py`` for plain
supervised training, ``experiments/pipeline.py`` for compression) call :func:`fit` with their own
step.

Resuming is exact: a run killed at any moment (even mid-epoch or mid-save) restarts from its latest
complete checkpoint and replays the same batches (their order and augmentation depend only on seed,
epoch and step), the same random keys (folded from the step) and the same schedules (their counts
live in the optimizer state), so it ends with the parameters of an uninterrupted run, bit for bit
on CPU; the log records written after that checkpoint are dropped and written again.

A diverged run (a non-finite loss, gradient norm or updated parameter) stops with
:class:`NonFiniteError`, one line naming the step, before anything of it is logged or
checkpointed: the workdir keeps the last good checkpoint and resumes from it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxcompress import data as data_lib
from jaxcompress import parallel
from jaxcompress.checkpoint import Checkpointer, MetricsLog
from jaxcompress.data import DataSpec
from jaxcompress.errors import (ConfigError, check_counts, check_finite, check_positive,
                                invalid)
from jaxcompress.progress import bar as progress_bar
from jaxcompress.steps import TrainState, bad_labels_error, check_weight, evaluate


class NonFiniteError(ConfigError):
  """Training diverged: a step's loss, gradient norm or updated parameters are not finite
  (``nan`` or ``inf``).

  A :class:`ConfigError` (the usual cause is too high a learning rate), so entry points print its
  one line and exit non-zero.
  """


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """How long :func:`fit` trains and how often it logs, checkpoints and evaluates.

  Validated when built; errors name the field as ``SECTION.<field>``, ``section`` (not a field:
  ``train`` by default) being the config section the spec is built from.

  Attributes:
    epochs: epochs to train (>= 0; may be fractional).
    log_every_steps: ``metrics.jsonl`` and progress-bar interval (>= 1).
    checkpoint_every_steps: orbax checkpoint interval, and always at the end (>= 1).
    eval_every_epochs: run ``eval_fn`` every this many epochs (>= 1), but not at the last step
      (the caller evaluates the state :func:`fit` returns).
  """
  epochs: float = 1.0
  log_every_steps: int = 50
  checkpoint_every_steps: int = 500
  eval_every_epochs: int = 1
  section: dataclasses.InitVar[str] = "train"

  def __post_init__(self, section: str):
    check_positive(f"{section}.epochs", self.epochs, zero=True)
    check_counts({f"{section}.{field}": getattr(self, field)
                  for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_epochs")})

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], section: str = "train") -> "LoopSpec":
    """The spec from the fields of ``values`` it names (a job's ``train`` config section holds
    optimizer settings too; they are not read here); messages name them under ``section``."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values},
               section=section)


def _as_spec(cls, value):
  """``value`` as a ``cls`` spec: converted with ``cls.from_mapping`` where it is a mapping (a
  dict or an ``ml_collections.ConfigDict``: anything with ``keys``), else as given."""
  if value is not None and not isinstance(value, cls) and hasattr(value, "keys"):
    return cls.from_mapping(value)
  return value


def load_data(data: DataSpec) -> dict[str, data_lib.SourceSplit]:
  """Opens the train and eval splits of ``data`` for random access (nothing is decoded yet).

  With ``data.val_examples > 0`` the last that many training examples are held out as ``val``
  (TFDS record order is already shuffled), and ``data.train_examples > 0`` caps the training set
  (for quick runs). Examples are decoded when a batch first reads them (see
  :class:`jaxcompress.data.SourceSplit`), so each process of a multi-process run decodes only
  the examples of its rows.

  Args:
    data: the data spec (a mapping with its fields, e.g. a ``data`` config section, is converted
      with :meth:`DataSpec.from_mapping`).

  Returns:
    ``{'train': split, 'eval': split}`` and, when held out, ``'val': split``.

  Raises:
    ConfigError: missing data, too few training examples for the held-out set or one batch, or
      an eval split that shares examples with the training examples or the held-out set
      (:func:`jaxcompress.data.check_splits`).
  """
  data = _as_spec(DataSpec, data)
  out = {}
  train = data_lib.open_split(data.name, data.train_split, data_dir=data.data_dir,
                              field="data.train_split")
  if data.val_examples:
    if not 0 < data.val_examples < len(train):
      raise invalid("data.val_examples", data.val_examples,
                    f"in [0, {len(train)}) for {data.name}/{data.train_split}")
    cut = len(train) - data.val_examples
    out["val"] = train.take(cut, len(train))
    train = train.take(0, cut)
  if data.train_examples:
    train = train.take(0, min(data.train_examples, len(train)))
  data_lib.check_batch_fits(len(train), data.batch_size)
  data_lib.check_splits(data, len(train))
  out["train"] = train
  out["eval"] = data_lib.open_split(data.name, data.eval_split, data_dir=data.data_dir,
                                    field="data.eval_split")
  return out


def evaluate_split(eval_step: Callable, variables,
                   split: data_lib.Split | tuple[np.ndarray, np.ndarray], data: DataSpec, *,
                   mesh=None, desc: str = "eval", predictions: bool = False) -> dict:
  """Evaluates on every example of ``split`` (loss, accuracy, per-class precision/recall).

  Each process reads only its rows of every eval batch; the results are gathered, so every
  process returns the metrics of the whole split, each example counted once.

  Args:
    eval_step: from :func:`jaxcompress.steps.make_eval_step`.
    variables: what ``eval_step`` takes as its first input.
    split: a :class:`jaxcompress.data.Split` or ``(uint8 images, int labels)``.
    data: the data spec: eval batch size, normalisation and number of classes (a mapping with
      its fields is converted).
    mesh: data-parallel mesh; batches are sharded over it.
    desc: progress-bar label.
    predictions: also return every example's predicted class.
  """
  data = _as_spec(DataSpec, data)
  split = data_lib.as_split(split)
  if not len(split):
    raise ConfigError(f"{desc}: the split has no examples, nothing to evaluate")
  bs = parallel.eval_batch_size(data.eval_batch_size, len(split), mesh)
  rows = None if mesh is None else parallel.local_rows(mesh, bs, "data.eval_batch_size")
  batches = data_lib.eval_batches(split, bs, mean=data.mean, std=data.std, rows=rows)
  return evaluate(eval_step, variables, batches, mesh=mesh, desc=desc, predictions=predictions,
                  num_classes=data.num_classes, total=-(-len(split) // bs))


def fit(state: TrainState, train_step: Callable, train: tuple[np.ndarray, np.ndarray] | Any,
        data: DataSpec | None, loop: LoopSpec, workdir: str, *, seed: int = 0, mesh=None,
        eval_fn: Callable[[TrainState], dict] | None = None, desc: str = "train",
        step_args: tuple = ()) -> tuple[TrainState, dict]:
  """Trains ``state`` for ``loop.epochs`` epochs, resuming from ``workdir`` if possible.

  Args:
    state: the initial train state (ignored in favour of the latest checkpoint when one exists).
    train_step: ``step(state, batch) -> (state, metrics)`` from
      :func:`~jaxcompress.steps.make_train_step`, or any step whose metrics are a dict of
      scalars (all logged; ``loss`` also shown).
    train: the training examples (a :class:`jaxcompress.data.Split` or ``(uint8 images, int
      labels)``; each process reads only its rows of every batch), or a batch source: an object
      with ``batch_size``, ``steps_per_epoch`` and ``batches(seed=, epoch=, start=)`` yielding the
      batches of an epoch from its ``start``-th step on, the same ones whenever asked (e.g.
      :class:`jaxcompress.text.TrainWindows`).
    data: batch size, normalisation and augmentation of image arrays (:class:`DataSpec`; a
      mapping with its fields is converted); unused (may be None) with a batch source.
    loop: epochs, logging, checkpoint and eval intervals (:class:`LoopSpec`; likewise).
    workdir: folder for ``checkpoints/`` and ``metrics.jsonl``.
    seed: data order and augmentation seed.
    mesh: data-parallel mesh; batches are sharded over it.
    eval_fn: optional ``state -> metrics`` run every ``loop.eval_every_epochs`` epochs, not
      at the last step (evaluate the returned state: the jobs log it with
      :meth:`MetricsLog.write_final`); the metrics that are numbers (Python, NumPy or JAX
      scalars) are logged as ``eval_<name>``.
    desc: progress-bar label.
    step_args: extra inputs passed to every ``train_step`` call (e.g. teacher variables).

  Returns:
    ``(state, info)`` with ``info = {'seconds': training wall time summed over resumes,
    'epochs': epochs trained, 'steps': steps taken, 'skipped': non-finite steps skipped}``.

  Raises:
    NonFiniteError: a step's loss, gradient norm or updated parameters (``train_step``'s
      ``finite`` metric, see :func:`jaxcompress.steps.make_train_step`) are not finite. Training
      stops at once; the diverged state is neither logged nor saved, so ``workdir`` keeps its
      last good checkpoint and resumes from it. A step built with ``skip_nonfinite`` reports
      ``skipped`` instead: such steps are counted (``skipped`` in each log record and in
      ``info``), their metrics left out of the log's means.
  """
  data, loop = _as_spec(DataSpec, data), _as_spec(LoopSpec, loop)
  per_epoch, batch_size, epoch_batches = _batch_source(train, data, seed, mesh)
  os.makedirs(workdir, exist_ok=True)
  total = int(round(loop.epochs * per_epoch))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  # Every process saves checkpoints; process 0 logs, and a failure of its (a full disk) stops
  # every process (on_main_process), where the others would wait for it at the next step.
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
  seconds, skipped, evaluated = 0.0, 0, 0
  if mesh is not None:  # restored as it is placed: replicated over every process's devices
    state = parallel.replicate(mesh, state)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    # Saved by a run that diverged unnoticed (fit saves none such): resuming would compute NaN.
    check_finite(f"{ckpt.directory}: the checkpoint of step {int(state.step)}: params",
                 state.params, "a run resumed from it computes NaN: delete that step's folder to "
                 "resume from an earlier checkpoint, or start a new --workdir")
    seconds, skipped = float(meta.get("seconds", 0.0)), int(meta.get("skipped", 0))
    # The step of the last evaluation: a run ended (no eval at its last step, the caller's) and
    # extended to more epochs evaluates the epoch it ended on, as an uninterrupted run does.
    evaluated = meta.get("evaluated", int(state.step))
    if int(state.step) > total:
      raise ConfigError(f"train.epochs={loop.epochs:g} is {total} steps, and {workdir} has trained "
                        f"{int(state.step)}: a rerun may raise train.epochs, not lower it; use a "
                        "new --workdir for a shorter run")
  # Records after the checkpoint (or all, without one) belong to work this run redoes, and so
  # does an evaluation of its step that it did not record (one logged by a run resumed from it).
  parallel.on_main_process(lambda: log.truncate_after(
      int(state.step), redo_eval=evaluated != int(state.step)))
  step = int(state.step)
  bar = progress_bar(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True,
                     disable=not parallel.is_main_process())
  pending, t_log, n_log = [], time.perf_counter(), 0
  # (step, metrics, (labels, weight)) whose ``finite`` flag is not yet read
  unchecked = collections.deque()

  def check(keep: int = 0) -> None:
    """Reads the ``finite`` flag of all but the ``keep`` newest unchecked steps; raises on one
    (on one whose labels are outside the classes even when non-finite steps are skipped)."""
    while len(unchecked) > keep:
      n, m, labelled = unchecked.popleft()
      if "finite" in m and ("skipped" not in m or "label_errors" in m) \
          and not float(jax.device_get(m["finite"])):
        if float(jax.device_get(m.get("label_errors", 0.0))):
          # with several processes the bad ids may be in another one's rows
          raise bad_labels_error(f"training stopped at step {n}: ", *labelled,
                                 example=jax.process_count() == 1)
        if "skipped" not in m:
          raise _non_finite(n, m, ckpt.latest_step())

  def eval_due(step: int) -> bool:
    return (eval_fn is not None and 0 < step < total and step % per_epoch == 0
            and (step // per_epoch) % loop.eval_every_epochs == 0)

  def run_eval() -> None:
    nonlocal evaluated
    check()
    record = {"step": step, "epoch": step / per_epoch,
              **{f"eval_{k}": v for k, v in _numbers(eval_fn(state)).items()}}
    parallel.on_main_process(lambda: log.write(record))
    evaluated = step

  t_start = time.perf_counter()
  try:  # a stop (SIGTERM, Ctrl-C, a non-finite loss) still finishes a save in flight
    if evaluated != step and eval_due(step):
      run_eval()
    while step < total:
      epoch, start = divmod(step, per_epoch)
      for batch in epoch_batches(epoch, start):
        if step >= total:
          break
        # This process's rows of the labels, on the host: named if they are outside the classes.
        labelled = (getattr(batch, "label", None), getattr(batch, "weight", None))
        if isinstance(labelled[1], np.ndarray) and labelled[0] is not None:
          check_weight(labelled[1], labelled[0])  # on the host: >= 0
        if mesh is not None:
          batch = parallel.shard_batch(mesh, batch)
        state, metrics = train_step(state, batch, *step_args)
        step += 1
        unchecked.append((step, metrics, labelled))
        # The previous step's flag: reading it waits for that step only, while this one runs.
        check(keep=1)
        pending.append(metrics)
        n_log += batch_size
        save_now = step % loop.checkpoint_every_steps == 0 or step == total
        # A checkpoint always follows a log record, so a resumed run averages the same steps.
        log_now = step % loop.log_every_steps == 0 or save_now
        if log_now:
          check()
          kept = [m for m in pending if not float(jax.device_get(m.get("skipped", 0.0)))]
          host = {k: float(np.mean([jax.device_get(m[k]) for m in kept or pending]))
                  for k in pending[0] if k != "label_errors"}  # 0: fit stops on others
          if "skipped" in host:
            host["skipped"] = len(pending) - len(kept)
            skipped += host["skipped"]
          now = time.perf_counter()
          host.update(step=step, epoch=step / per_epoch, images_per_s=n_log / (now - t_log))
          parallel.on_main_process(lambda: log.write(host))
          shown = {"loss": f"{host['loss']:.4f}"} if "loss" in host else {}
          bar.set_postfix(**shown, img_s=f"{host['images_per_s']:.0f}")
          pending, t_log, n_log = [], now, 0
        bar.update(1)
        # Evaluate before the checkpoint of the same step: a resume from it never skips an eval.
        if eval_due(step):
          run_eval()
        if save_now:
          jax.block_until_ready(state)
          ckpt.save(step, state, {"seconds": seconds + time.perf_counter() - t_start,
                                  "skipped": skipped, "evaluated": evaluated})
    check()
    jax.block_until_ready(state)
    seconds += time.perf_counter() - t_start
  finally:
    bar.close()
    ckpt.close()
  return state, {"seconds": seconds, "epochs": step / per_epoch, "steps": step,
                 "skipped": skipped}


def _batch_source(train, data: DataSpec | None, seed: int, mesh) -> tuple[int, int, Callable]:
  """``(steps per epoch, global batch size, (epoch, start) -> batches)`` of :func:`fit`'s
  ``train``; the batches hold this process's rows of each global batch (all of it with one)."""
  if hasattr(train, "batches"):
    rows = None if mesh is None else parallel.local_rows(mesh, train.batch_size)
    own = lambda b: b if rows is None else jax.tree.map(lambda x: x[rows[0]:rows[1]], b)
    return (train.steps_per_epoch, train.batch_size,
            lambda epoch, start: map(own, train.batches(seed=seed, epoch=epoch, start=start)))
  split = data_lib.as_split(train)
  data_lib.check_batch_fits(len(split), data.batch_size)
  rows = None if mesh is None else parallel.local_rows(mesh, data.batch_size)
  return (data_lib.steps_per_epoch(len(split), data.batch_size), data.batch_size,
          lambda epoch, start: data_lib.train_batches(
              split, data.batch_size, seed=seed, epoch=epoch, mean=data.mean, std=data.std,
              augment_images=data.augment, flip=data.flip, start=start, rows=rows))


def _numbers(metrics: Mapping[str, Any]) -> dict:
  """The numbers of ``metrics`` (Python, NumPy or JAX scalars), as Python numbers; the rest
  (per-class lists, text) is left out."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (int, float)):
      out[k] = v
    elif np.ndim(v) == 0 and np.issubdtype(getattr(v, "dtype", object), np.number):
      out[k] = np.asarray(jax.device_get(v)).item()
  return out


def _non_finite(step: int, metrics: Mapping[str, Any], latest: int | None) -> NonFiniteError:
  """The one-line error for a diverged ``step`` (its ``metrics``; ``latest`` checkpoint)."""
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    what = f"the loss is {loss}" + (" (or a label is outside the model's classes)"
                                    if math.isnan(loss) else "")
  elif not math.isfinite(norm := float(jax.device_get(metrics.get("grad_norm", 0.0)))):
    what = f"the gradient norm is {norm}"
  else:
    what = "its update turned a parameter into nan or inf"
  # A job's workdir records its config, so a lower learning rate is a new workdir there.
  if latest is None:
    where = "the workdir has no checkpoint yet; lower the learning rate and start again"
  else:
    where = (f"the workdir keeps the checkpoint of step {latest}; lower the learning rate to go "
             "on (fit resumes from it; a job records its config: start a new --workdir)")
  return NonFiniteError(f"training stopped at step {step}: {what}; {where}")
