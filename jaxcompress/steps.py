"""Pure, jitted train and eval steps, and the evaluation loop.

A loss function has the signature ``loss_fn(params, model_state, batch, rng, *aux) ->
(loss, (new_model_state, metrics))`` where ``model_state`` holds the non-trainable collections
(``batch_stats``, calibration ranges, ...) and ``aux`` are extra step inputs that are not
trained (a distillation teacher's variables). :func:`make_train_step` turns any such function and
any optax optimizer into one jitted step, sharded over a data-parallel mesh. Compression methods
plug in by building a different ``loss_fn`` (masked or fake-quantized forward, distillation terms)
or by wrapping the optimizer; the step itself stays the same.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress import parallel, precision
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.metrics import classification_report, confusion_matrix
from jaxcompress.models.functional import functional
from jaxcompress.progress import bar as progress_bar


class TrainState(flax.struct.PyTreeNode):
  """Everything a train step changes. A plain pytree: checkpoints and shards like any other.

  Attributes:
    step: number of optimizer steps taken.
    params: trainable parameters.
    model_state: non-trainable model collections, e.g. ``{'batch_stats': ...}``.
    opt_state: optimizer state (pruning masks live here when the optimizer is wrapped).
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any

  @classmethod
  def create(cls, params, model_state, optimizer: optax.GradientTransformation) -> "TrainState":
    """The state at step 0. Raises one line for an integer or boolean parameter."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      dtype = jnp.result_type(leaf)
      if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        raise ConfigError(f"params{jax.tree_util.keystr(path)} has dtype "
                          f"{jnp.result_type(leaf)}; trained parameters must be floating-point "
                          "(gradients need it): keep integer state out of the parameters, e.g. "
                          "in nnx.BatchStat or a Linen collection other than 'params'")
    return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
               opt_state=optimizer.init(params))


def check_labels(logits: jax.Array, labels: jax.Array) -> None:
  """Raises :class:`ConfigError` (one line) unless ``labels`` are integer class ids, one per
  output position of ``logits`` ``[..., C]`` (static shapes and dtypes: checked while tracing)."""
  want = tuple(logits.shape[:-1])
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):  # one line, not optax's
    raise ConfigError(f"batch.label must be integer class ids (shape {want}),"
                      f" got {jnp.result_type(labels)} of shape {tuple(jnp.shape(labels))}; "
                      "one-hot labels: pass their argmax")
  if tuple(jnp.shape(labels)) != want:
    raise ConfigError(f"batch.label must have one class id per output, shape {want} for the "
                      f"model's outputs {tuple(logits.shape)}, got shape "
                      f"{tuple(jnp.shape(labels))}")


def check_batch(batch: Any, where: str) -> None:
  """Raises :class:`ConfigError` (one line, starting with ``where``) unless ``batch`` has the
  fields of a :class:`jaxcompress.data.Batch`: ``image``, ``label`` and ``weight``, and its
  ``image`` is arrays with a batch axis (not a Python list of numbers)."""
  if not all(hasattr(batch, f) for f in ("image", "label", "weight")):
    raise ConfigError(f"{where} must be jaxcompress.data.Batch (image, label, weight), got a "
                      f"{type(batch).__name__}")
  if any(jnp.ndim(a) == 0 for a in jax.tree.leaves(batch.image)):  # a list of numbers
    raise ConfigError(f"{where}'s image must be an array with a batch axis (or a dict or tuple "
                      f"of them), got a {type(batch.image).__name__} holding scalars; pass "
                      "np.asarray(...) of a list")


def check_weight(weight: Any, labels: jax.Array) -> None:
  """Raises :class:`ConfigError` (one line) unless ``weight`` is one number per example (``[B]``)
  or per label (the labels' shape), and, where it is a NumPy array (on the host: read without
  waiting on a device), >= 0."""
  want = tuple(jnp.shape(labels))
  got = None if weight is None else tuple(jnp.shape(weight))
  if got not in (want[:1], want):
    raise ConfigError(f"batch.weight must have shape {want[:1]} (one per example) or {want} (one "
                      f"per label), got {'None' if got is None else f'shape {got}'}; "
                      "ones weigh every example alike")
  if isinstance(weight, np.ndarray) and np.any(weight < 0):
    raise ConfigError(f"batch.weight must be >= 0, got {weight.min()} (a negative weight turns "
                      "its example's gradient around); 0 leaves an example out")


def per_label(weight: Any, labels: Any) -> Any:
  """A per-example weight ``[B]`` spread over every label of its example (the labels' shape);
  a per-label weight as it is. NumPy in, NumPy out."""
  xp = np if isinstance(weight, np.ndarray) and isinstance(labels, np.ndarray) else jnp
  weight = xp.asarray(weight)
  extra = (1,) * (np.ndim(labels) - weight.ndim)
  return xp.broadcast_to(weight.reshape(weight.shape + extra), np.shape(labels))


def in_classes(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Where ``labels`` are class ids of ``logits`` (``[..., C]``): in ``[0, C)``."""
  return (labels >= 0) & (labels < logits.shape[-1])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels at every position: logits ``[..., C]``, labels
  ``[...]`` (``[B]`` for a classifier, ``[B, T]`` for a language model) -> losses ``[...]``;
  ``nan`` where a label is outside ``[0, C)``."""
  check_labels(logits, labels)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  # An id outside the classes indexes nothing: its loss is nan, never a plausible number.
  return jnp.where(in_classes(logits, labels), losses, jnp.nan)


def label_errors(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """How many ``labels`` of non-zero weight are outside ``[0, C)`` (float32): their loss is nan,
  and :func:`jaxcompress.train.fit` stops on them with one line, ``skip_nonfinite`` or not."""
  bad = ~in_classes(logits, labels)
  return jnp.sum(bad & (per_label(weight, labels) != 0)).astype(jnp.float32)


def bad_labels_error(where: str, labels: Any, weight: Any, *, example: bool = True
                     ) -> ConfigError:
  """The one line (starting with ``where``) for host ``labels`` that hold class ids outside the
  model's classes among those of non-zero ``weight``: of those ids the lowest if negative, else
  the highest, unless ``example`` is False (the bad ids may be in another process's rows)."""
  labels = np.asarray(labels)
  used = labels[per_label(np.asarray(weight), labels) != 0]
  bad = f", e.g. {used.min() if used.min() < 0 else used.max()}" if used.size and example else ""
  return ConfigError(f"{where}batch.label holds class ids outside the model's classes{bad}; "
                     "labels must be in [0, num_classes): fix them, or give an example without "
                     "a label weight 0")


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
  """Weighted mean of per-example (``[B]``) or per-position (``[B, T, ...]``) ``values``.

  ``weight`` is per example ``[B]`` or has ``values``' shape (per token); a per-example weight
  covers every position of its example, so with sequences this is the mean over positions and
  examples, examples of weight 0 left out, even where their value is ``nan`` (a padded
  example's label); 0 when every weight is 0.
  """
  weight = per_label(weight, values)
  total = jnp.sum(weight)
  weighted = jnp.where(weight != 0, values * weight, 0.0)
  return jnp.sum(weighted) / jnp.where(total > 0, total, 1.0)


def supervised_loss(model: Any, compute_dtype: Any = "float32") -> Callable:
  """The plain task loss of any Linen or NNX model: cross-entropy of its logits against the labels.

  The model runs in training mode through :func:`jaxcompress.models.functional.functional`
  (its own train flag, batch statistics updated, the step's key for dropout), its floating
  parameters and inputs cast to ``compute_dtype`` (:mod:`jaxcompress.precision`); the loss and
  the updated statistics are float32.
  """
  fm = functional(model)
  dtype = precision.compute_dtype(compute_dtype)
  cast = None if dtype == jnp.float32 else dtype

  def loss_fn(params, model_state, batch: Batch, rng):
    logits, updated = fm.apply({"params": precision.cast_floating(params, cast), **model_state},
                               precision.cast_floating(batch.image, cast), train=True, rngs=rng)
    if cast is not None:
      updated = precision.cast_floating(updated, jnp.float32)
    new_state = {**model_state, **updated}
    check_weight(batch.weight, batch.label)
    loss = weighted_mean(cross_entropy(logits, batch.label), batch.weight)
    acc = weighted_mean((jnp.argmax(logits, -1) == batch.label).astype(jnp.float32),
                        batch.weight)
    return loss, (new_state, {"task_loss": loss, "accuracy": acc,
                              "label_errors": label_errors(logits, batch.label, batch.weight)})

  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    mesh=None, seed: int = 0, num_aux: int = 0,
                    skip_nonfinite: bool = False) -> Callable:
  """Builds ``step(state, batch, *aux) -> (state, metrics)``, jitted once.

  The step's random key is ``fold_in(key(seed), state.step)``, so a resumed run draws the same
  keys as an uninterrupted one. With a ``mesh`` the batch is split over its devices and the state
  (and the ``num_aux`` extra inputs) replicated; the result is the same as on one device. The
  extra inputs are passed to ``loss_fn`` and never differentiated.

  The input state is not donated: a state built from the caller's own arrays (``params`` they
  still hold, an earlier state kept for comparison) stays readable after the step. Donation would
  delete those arrays (``RuntimeError: Array has been deleted``); dropping it is the simplest
  rule that is always correct, at the cost of holding the old and the new state at once during a
  step (twice the parameter and optimizer-state memory, small for the models here).

  Besides ``loss_fn``'s own metrics the step reports ``grad_norm`` (the global L2 norm of the
  gradients) and ``finite`` (1.0 when the loss, ``grad_norm`` and every updated parameter are
  finite, else 0.0: a learning rate that blows up turns finite gradients into Inf/NaN
  parameters), which :func:`jaxcompress.train.fit` checks to stop on a diverged run. With
  ``skip_nonfinite`` (``train.skip_nonfinite``) a step that is not finite changes nothing but
  ``state.step`` (as ``optax.apply_if_finite`` does: parameters, optimizer and model state are
  kept, so the learning-rate and pruning schedules, which count in the optimizer state, end that
  many steps later; a pruning ramp that ends at the last step then stops short of its final
  sparsity) and reports ``skipped`` (1.0 or 0.0), which ``fit`` counts instead of stopping. A
  ``label_errors`` metric (:func:`label_errors`, reported by :func:`supervised_loss` and the
  composed loss) makes ``fit`` stop on a step whose labels are outside the classes even then:
  skipping would silently drop every batch that holds one, in every epoch.
  """
  base_key = jax.random.key(seed)

  def step(state: TrainState, batch: Batch, *aux):
    if len(aux) != num_aux:  # checked while tracing: one line, not a failure deep in the loss
      raise ConfigError(f"train step: takes {num_aux} input(s) after the batch, got {len(aux)} "
                        "(with distillation: step(state, batch, teacher_vars))")
    rng = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, rng,
                                                    *aux)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)], bool))
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state)
    out = {"loss": loss, **metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = new_state.replace(**{f: jax.tree.map(keep, getattr(new_state, f),
                                                       getattr(state, f))
                                       for f in ("params", "model_state", "opt_state")})
      out["skipped"] = 1.0 - out["finite"]
    return new_state, out

  if mesh is None:
    return jax.jit(step)
  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, dat) + (rep,) * num_aux, out_shardings=(rep, rep))


def predict(logits: jax.Array) -> jax.Array:
  """The predicted class at every position of ``logits`` ``[..., C]``: the argmax, or -1 where a
  logit is NaN or Inf (no prediction: argmax would name the first NaN's class, which may be the
  label)."""
  return jnp.where(jnp.all(jnp.isfinite(logits), -1), jnp.argmax(logits, -1), -1)


def make_eval_step(logits_fn: Callable, *, mesh=None) -> Callable:
  """Builds ``eval_step(variables, batch) -> (per-example loss, predictions, classes)``, jitted
  once; ``classes`` is the width of the logits, which :func:`evaluate` checks, and a prediction
  is -1 where the logits are not finite (:func:`predict`).

  ``logits_fn(variables, images)`` is any inference function: a Flax ``apply`` in eval mode, a
  quantized model, or an exported one.
  """

  def eval_step(variables, batch: Batch):
    logits = logits_fn(variables, batch.image)
    return (cross_entropy(logits, batch.label), predict(logits), jnp.int32(logits.shape[-1]))

  if mesh is None:
    return jax.jit(eval_step)
  rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(rep, dat), out_shardings=(dat, dat, rep))


def evaluate(eval_step: Callable, variables, batches: Iterable[Batch], *, num_classes: int,
             mesh=None, total: int | None = None, desc: str = "eval",
             predictions: bool = False) -> dict:
  """Runs ``eval_step`` (:func:`make_eval_step`) over every batch; returns loss, accuracy and
  per-class precision/recall.

  With several processes each one passes its rows of every global batch (see
  :func:`jaxcompress.parallel.local_rows`); the per-example results of the whole batch are
  gathered on every process, so each counts every example exactly once and returns the same.

  Returns:
    ``{'accuracy': percent, 'loss': mean cross-entropy, 'examples': n, 'nonfinite': n,
    'precision': [...], 'recall': [...]}`` over the examples with non-zero weight, each counted
    once (here a weight marks padding; it does not scale an example as the train step's loss
    does), plus ``'predictions'`` (a list of class ids, in example order) when ``predictions``
    is set. An example whose logits hold NaN or Inf has no prediction (-1 in ``predictions``):
    it counts as wrong and in ``nonfinite`` (and the loss is then nan).

  Raises:
    ConfigError: a label has no class in the model's logits, which are narrower than
      ``num_classes`` (its loss would be nan), a label is outside ``[0, num_classes)``, or no
      example has a weight > 0.
  """
  labels, preds, losses = [], [], []
  for batch in progress_bar(batches, total=total, desc=desc, unit="batch", leave=False,
                           disable=not parallel.is_main_process()):
    check_weight(batch.weight, batch.label)
    if mesh is not None:
      batch = parallel.shard_batch(mesh, batch)
    loss, pred, classes, label, weight = parallel.to_host(
        (*eval_step(variables, batch), batch.label, batch.weight))
    keep = per_label(np.asarray(weight), np.asarray(label)) > 0  # [B] weights: every label
    label = np.asarray(label)[keep]
    if classes < num_classes and label.size and label.max() >= classes:
      raise ConfigError(f"{desc}: the model's logits have {classes} classes, fewer than "
                        f"num_classes={num_classes}, and label {label.max()} has no class in "
                        f"them (its loss would be nan); give a model with {num_classes} outputs")
    labels.append(label)
    preds.append(np.asarray(pred)[keep])
    losses.append(np.asarray(loss)[keep])
  if not sum(len(p) for p in preds):
    raise ConfigError(f"{desc}: no example of weight > 0 to evaluate")
  preds, labels = np.concatenate(preds), np.concatenate(labels)
  none = preds < 0  # non-finite logits: counted per class (labels checked), as wrong
  missed = confusion_matrix(labels[none], np.zeros(none.sum(), np.int64), num_classes)[:, 0]
  report = classification_report(
      confusion_matrix(labels[~none], preds[~none], num_classes), missed)
  out = {"accuracy": report["accuracy"], "loss": float(np.mean(np.concatenate(losses))),
         **{k: v for k, v in report.items() if k != "accuracy"}}
  if predictions:
    out["predictions"] = preds.tolist()
  return out
