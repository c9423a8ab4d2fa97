"""One object that knows how to train a compressed model, built from a config.

:func:`build` reads the ``prune``, ``quant`` and ``distill`` sections and returns a
:class:`Compression`: the student's forward (hard-masked weights, fake-quantized weights and
inputs), the optimizer (the pruning wrapper around the base optimizer), the loss terms (task,
Hinton KD, feature hints) and the per-step metrics (task loss, KD loss, sparsity, teacher
agreement). :meth:`Compression.make_train_step` returns ONE jitted step for any subset of the
three methods — prune only, quantize only, distill only, all, or none (plain fine-tuning).

Train-state layout (a :class:`~jaxcompress.steps.TrainState`):
  ``params = {'model': student params, 'qsteps': LSQ step sizes, 'adapters': hint adapters}``
  ``model_state = {'batch_stats': ..., 'quant': QuantState (ranges; steps live in params),
  'kmeans': {layer path: codebook}}`` (the codebooks of ``quant.method = 'kmeans'``)
  ``opt_state``: the pruning wrapper's state (masks, step count) around the base optimizer.
The teacher's variables are an input of the step (never trained, never checkpointed).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcompress import distillation as kd
from jaxcompress import pruning, quantization
from jaxcompress.errors import check_range, invalid, unknown
from jaxcompress.models.batchnorm import FOLD, fold_collection
from jaxcompress.optim import make_optimizer
from jaxcompress.steps import TrainState, cross_entropy, make_train_step, weighted_mean

PRUNE_METHODS = ("none", "magnitude", "random", "saliency", "movement")
PRUNE_STRUCTURES = ("unstructured", "nm", "channel")
PRUNE_SCHEDULES = ("gradual", "one_shot", "constant")
QUANT_METHODS = ("minmax", "lsq", "kmeans")


def _model_rules(rules) -> list[tuple[str, bool]]:
  """Pruning rules over the student's params, rewritten for the ``model/`` subtree.

  Leaves outside it (LSQ steps, adapters) match no rule and so are never pruned.
  """
  base = pruning.DEFAULT_RULES if not rules else [tuple(r) for r in rules]
  return [(f"model/(?:{regex})", value) for regex, value in base]


def validate(config) -> None:
  """Checks the ``prune``, ``quant`` and ``distill`` sections; one-line ConfigError otherwise."""
  p, q = config.prune, config.quant
  if p.method not in PRUNE_METHODS:
    raise unknown("prune.method", p.method, PRUNE_METHODS)
  if p.structure not in PRUNE_STRUCTURES:
    raise unknown("prune.structure", p.structure, PRUNE_STRUCTURES)
  if p.schedule not in PRUNE_SCHEDULES:
    raise unknown("prune.schedule", p.schedule, PRUNE_SCHEDULES)
  if p.scope not in ("layer", "global"):
    raise unknown("prune.scope", p.scope, ("layer", "global"))
  check_range("prune.sparsity", p.sparsity, 0.0, 1.0)
  check_range("prune.begin", p.begin, 0.0, 1.0, hi_closed=True)
  check_range("prune.end", p.end, p.begin, 1.0, hi_closed=True)
  if p.structure == "nm" and not 0 < p.n < p.m:
    raise invalid("prune.n", p.n, f"in [1, prune.m={p.m})")
  if q.method not in QUANT_METHODS:
    raise unknown("quant.method", q.method, QUANT_METHODS)
  for field in ("weight_bits", "act_bits", "first_last_bits"):
    bits = q[field]
    if bits and not 2 <= bits <= 8:
      raise invalid(f"quant.{field}", bits, "0 (float) or an integer in [2, 8]")
  kd.validate_distill_config(config.distill)


def prune_steps(p, total_steps: int) -> tuple[int, int, int]:
  """``(update_every, begin_step, end_step)`` of a ``prune`` section for a run of ``total_steps``.

  Masks are refreshed only on multiples of ``update_every``; it shrinks for short ramps (at least
  about four refreshes from begin to end) and ``end_step`` is rounded down to a refresh step
  inside the run, so the final sparsity is always reached.
  """
  begin = int(p.begin * total_steps)
  end = min(max(int(p.end * total_steps), begin + 1), max(total_steps - 1, begin + 1))
  every = max(1, min(p.update_every, (end - begin) // 4))
  begin, end = begin // every * every, end // every * every
  return every, begin, max(end, begin + every)


def structure(p) -> pruning.Masker:
  """The masker of a ``prune`` section: N:M, whole channels, or unstructured at its scope."""
  if p.structure == "nm":
    return pruning.n_of_m(p.n, p.m)
  if p.structure == "channel":
    return pruning.channels(p.norm)
  return pruning.unstructured(p.scope)


@dataclasses.dataclass(frozen=True)
class Compression:
  """The compressed student's forward, loss and optimizer.

  Invariants: ``quantizer`` is None when neither weights nor inputs are quantized; ``teacher`` is
  None when ``distill.alpha == 0`` and ``distill.feature_weight == 0``; the pruning wrapper is the
  outermost optimizer transform, so pruned weights are exactly 0 after every step.
  """
  student: nn.Module
  teacher: nn.Module | None
  quantizer: quantization.Quantizer | None
  optimizer: optax.GradientTransformation
  prune_enabled: bool
  prune_rules: list
  temperature: float
  alpha: float
  feature_weight: float
  feature_pairs: tuple
  kmeans_bits: int = 0
  quantizer_edges: bool = True

  # -- forward -------------------------------------------------------------------------------
  def student_apply(self, params, model_state, x, *, train: bool, capture=None):
    """Student logits (and new model state, and captured features if ``capture``)."""
    collections = {k: v for k, v in model_state.items() if k not in ("quant", "kmeans")}
    model_params, books = params["model"], model_state.get("kmeans")
    if books is not None:
      model_params, books = _share_weights(model_params, books, update=train)
    variables = {"params": model_params, **collections}
    kwargs = {} if capture is None else {"capture_intermediates": capture}
    if self.quantizer is None:
      out = self.student.apply(variables, x, train=train, mutable=list(collections) if train
                               else [], **kwargs)
      logits, updated = out
      new_state = {**model_state, **updated}
    else:
      qstate = model_state["quant"].replace(steps=params.get("qsteps", {}))
      logits, updated, new_q = self.quantizer.apply(
          variables, qstate, x, train=train, mutable=list(collections) if train else [], **kwargs)
      new_state = {**model_state, **updated, "quant": new_q.replace(steps={})}
    if books is not None:
      new_state["kmeans"] = books
    feats = new_state.pop("intermediates", {})
    return logits, new_state, feats

  def logits_fn(self, variables, x):
    """Eval-mode logits; ``variables = {'params': state.params, 'model_state': ...}``."""
    return self.student_apply(variables["params"], variables["model_state"], x, train=False)[0]

  @staticmethod
  def eval_variables(state: TrainState) -> dict:
    """:meth:`logits_fn`'s variables; BatchNorms run in the folded form the export stores.

    With the ``fold`` collection (:mod:`jaxcompress.models.batchnorm`) the fake-quant model and its
    exported artifact compute the same float32 operations, so their predictions agree exactly.
    """
    model_state = dict(state.model_state)
    if "batch_stats" in model_state:
      model_state[FOLD] = fold_collection(state.params["model"], model_state["batch_stats"])
    return {"params": state.params, "model_state": model_state}

  # -- loss ----------------------------------------------------------------------------------
  def _capture(self, which: int):
    if not self.feature_weight:
      return None
    wanted = {pair[which] for pair in self.feature_pairs}
    return lambda mdl, method: method == "__call__" and "/".join(mdl.path) in wanted

  def loss_fn(self, params, model_state, batch, rng, teacher_vars=None):
    """Per-step loss: ``(1 - alpha) * CE + alpha * KD + feature_weight * hints``."""
    del rng
    logits, new_state, s_feats = self.student_apply(params, model_state, batch.image, train=True,
                                                    capture=self._capture(0))
    task = cross_entropy(logits, batch.label)
    w = batch.weight
    metrics = {"task_loss": weighted_mean(task, w),
               "accuracy": weighted_mean((jnp.argmax(logits, -1) == batch.label) * 1.0, w)}
    per_example = task
    if self.teacher is not None:
      t_out = self.teacher.apply(teacher_vars, batch.image, train=False,
                                 capture_intermediates=self._capture(1) or False,
                                 mutable=["intermediates"] if self.feature_weight else False)
      t_logits, t_feats = (t_out[0], t_out[1].get("intermediates", {})) if self.feature_weight \
          else (t_out, {})
      t_logits = jax.lax.stop_gradient(t_logits)
      kd_term = kd.kd_loss(logits, t_logits, self.temperature)
      per_example = (1 - self.alpha) * task + self.alpha * kd_term
      metrics["kd_loss"] = weighted_mean(kd_term, w)
      metrics["teacher_agreement"] = weighted_mean(kd.agreement(logits, t_logits), w)
      if self.feature_weight:
        hint = self._hint_loss(params.get("adapters", {}), s_feats, t_feats)
        per_example = per_example + self.feature_weight * hint
        metrics["feature_loss"] = weighted_mean(hint, w)
    if self.prune_enabled:
      metrics["sparsity"] = self.sparsity(params)
    return weighted_mean(per_example, w), (new_state, metrics)

  def _hint_loss(self, adapters, s_feats, t_feats):
    total = 0.0
    for s_path, t_path in self.feature_pairs:
      s = _feature(s_feats, s_path)
      t = jax.lax.stop_gradient(_feature(t_feats, t_path))
      total = total + kd.feature_loss(kd.adapt(adapters, s_path, s, t.shape[-1]), t)
    return total

  def sparsity(self, params) -> jax.Array:
    """Fraction of zeros over the pruned leaves of ``params``."""
    sel = pruning.select(params, self.prune_rules, warn_unused=False)
    leaves = sel.pick(sel.leaves)
    zeros = sum(jnp.sum(x == 0) for x in leaves)
    return zeros / max(1, sum(x.size for x in leaves))

  def make_train_step(self, *, mesh=None, seed: int = 0) -> Callable:
    """``step(state, batch[, teacher_vars]) -> (state, metrics)``, jitted once."""
    return make_train_step(self.loss_fn, self.optimizer, mesh=mesh, seed=seed,
                           num_aux=int(self.teacher is not None))

  # -- state ---------------------------------------------------------------------------------
  def init_state(self, student_vars: dict, sample_x, *, teacher_vars=None, calibration=(),
                 calibration_method: str = "minmax", key=None) -> TrainState:
    """The initial train state: student weights, calibrated quantizer, adapters, optimizer."""
    student_vars = dict(student_vars)
    params = {"model": student_vars.pop("params")}
    model_state = dict(student_vars)
    if self.quantizer is not None:
      variables = {"params": params["model"], **model_state}
      qstate = self.quantizer.init(variables, sample_x)
      if calibration:
        qstate = quantization.calibrate(self.quantizer, variables, qstate, calibration,
                                        method=calibration_method)
      if qstate.steps:
        params["qsteps"] = qstate.steps
      model_state["quant"] = qstate.replace(steps={})
    if self.kmeans_bits:
      skip = set()
      if self.quantizer is not None and self.quantizer_edges:
        skip = {qstate.layers[0].path, qstate.layers[-1].path}
      model_state["kmeans"] = {
          path: quantization.kmeans(kernel, bits=self.kmeans_bits, mask=kernel != 0).codebook
          for path, kernel in _kernels(params["model"]).items() if path not in skip}
    if self.teacher is not None and self.feature_weight:
      _, _, s_feats = self.student_apply(params, model_state, sample_x, train=False,
                                         capture=self._capture(0))
      _, t_out = self.teacher.apply(teacher_vars, sample_x, train=False,
                                    capture_intermediates=self._capture(1),
                                    mutable=["intermediates"])
      s_feats = {p: _feature(s_feats, p) for p, _ in self.feature_pairs}
      t_feats = {p: _feature(t_out["intermediates"], p) for _, p in self.feature_pairs}
      params["adapters"] = kd.init_adapters(self.feature_pairs, s_feats, t_feats,
                                            key if key is not None else jax.random.key(0))
    return TrainState.create(params, model_state, self.optimizer)


def _kernels(params) -> dict[str, jax.Array]:
  """``{module path: kernel}`` of every Conv/Dense-like layer (a ``kernel`` leaf, ndim >= 2)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return {k[:-len("/kernel")]: v for k, v in flat.items()
          if k.endswith("/kernel") and v.ndim >= 2}


def _share_weights(params, books: dict, *, update: bool):
  """Replaces each clustered kernel by its k-means-shared version (straight-through)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  new_books = {}
  for path, book in books.items():
    flat[f"{path}/kernel"], new_books[path] = quantization.kmeans_fake_quant(
        flat[f"{path}/kernel"], book, update=update)
  return flax.traverse_util.unflatten_dict(flat, sep="/"), new_books


def _feature(intermediates, path: str):
  node = intermediates
  for part in path.split("/"):
    if part not in node:
      raise invalid("distill.feature_pairs", path, "a module path of the model, e.g. "
                    "'layer3_2'")
    node = node[part]
  return node["__call__"][0]


def build(config, student: nn.Module, teacher: nn.Module | None, *, steps_per_epoch: int,
          total_steps: int) -> Compression:
  """Builds the :class:`Compression` of a ``cifar_distill``-style config.

  Args:
    config: with sections ``prune``, ``quant``, ``distill``, ``train``.
    student: the model being compressed.
    teacher: the distillation teacher, or None.
    steps_per_epoch: training steps per epoch (learning-rate schedule).
    total_steps: training steps in the run (pruning schedule fractions refer to it).

  Raises:
    ConfigError: for any invalid field, before anything runs.
  """
  validate(config)
  p, q, d = config.prune, config.quant, config.distill
  base = make_optimizer(config.train, steps_per_epoch,
                        decay_mask=lambda params: {k: jax.tree.map(lambda _: k == "model", v)
                                                   for k, v in params.items()})
  prune_enabled = p.method != "none" and p.sparsity > 0
  rules = _model_rules(p.rules)
  optimizer = base
  if prune_enabled:
    every, begin, end = prune_steps(p, total_steps)
    if p.schedule == "gradual":
      schedule = pruning.polynomial_schedule(p.sparsity, begin, end)
    elif p.schedule == "one_shot":
      schedule = pruning.one_shot_schedule(p.sparsity, begin)
    else:
      schedule = pruning.constant_schedule(p.sparsity)
    optimizer = pruning.prune(base, schedule, score=p.method, structure=structure(p),
                              rules=rules, update_every=every, seed=config.seed)
  quantizer = None
  kmeans_bits = q.weight_bits if q.method == "kmeans" else 0
  if q.weight_bits or q.act_bits:
    # k-means layers are weight-shared in compose (below); the quantizer only does their inputs,
    # and the first/last layers stay uniform.
    common = dict(per_channel=bool(q.per_channel),
                  method="minmax" if q.method == "kmeans" else q.method)
    edge = q.first_last_bits or None
    inner_bits = None if kmeans_bits else q.weight_bits or None
    rules_q = [(quantization.FIRST, dict(weight_bits=edge, act_bits=edge, **common)),
               (quantization.LAST, dict(weight_bits=edge, act_bits=edge, **common)),
               (".*", dict(weight_bits=inner_bits, act_bits=q.act_bits or None, **common))]
    quantizer = quantization.quantize(student, rules_q)
  use_teacher = teacher is not None and (d.alpha > 0 or d.feature_weight > 0)
  return Compression(student=student, teacher=teacher if use_teacher else None,
                     quantizer=quantizer, optimizer=optimizer, prune_enabled=prune_enabled,
                     prune_rules=rules, temperature=float(d.temperature), alpha=float(d.alpha),
                     feature_weight=float(d.feature_weight),
                     feature_pairs=tuple(tuple(x) for x in d.feature_pairs),
                     kmeans_bits=int(kmeans_bits), quantizer_edges=bool(q.first_last_bits))
