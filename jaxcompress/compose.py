"""One object that knows how to train a compressed model: any Flax model, any subset of methods.

:func:`build` takes the student (a Flax Linen or NNX module), its variables, a sample input, the
base optimizer and three small typed specs (:mod:`jaxcompress.specs`: ``PruneSpec``,
``QuantSpec``, ``DistillSpec``, also importable from here) and returns a :class:`Compression`:
the student's forward (hard-masked weights, fake-quantized weights and inputs), the optimizer (the
pruning wrapper around the base optimizer), the loss terms (task, Hinton KD, feature hints) and
the per-step metrics (task loss, KD loss, sparsity, teacher agreement).
:meth:`Compression.make_train_step` returns ONE jitted step for
any subset of the three methods: prune only, quantize only, distill only, all, or none.

Which weights are compressed is decided once, from the model's forward
(:func:`jaxcompress.selection.trace_layers`): every floating-point weight of rank >= 2 of a
linear-like layer, the first and last layer in forward order kept dense and at
``QuantSpec.first_last_bits``; explicit rules override.

Train-state layout (a :class:`~jaxcompress.steps.TrainState`):
  ``params = {'model': student params, 'qsteps': LSQ step sizes, 'adapters': hint adapters}``
  ``model_state = {'batch_stats': ..., 'quant': QuantState (ranges; steps live in params),
  'kmeans': {layer path: codebook}}`` (the codebooks of ``QuantSpec.method = 'kmeans'``)
  ``opt_state``: the pruning wrapper's state (masks, step count) around the base optimizer.
The teacher's variables are an input of the step (never trained, never checkpointed).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Mapping

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcompress import distillation as kd
from jaxcompress import precision, pruning, quantization
from jaxcompress.errors import (ConfigError, check_counts, check_finite, check_variables,
                                first_line, invalid, message_line, shortened)
from jaxcompress.models.batchnorm import fold_arrays
from jaxcompress.models.functional import (Functional, capture_hook, chain_hooks, fold_hook,
                                           functional)
from jaxcompress.rules import flat_paths, tree_get, tree_set
from jaxcompress.selection import ModelLayers, require_layers, trace_layers
from jaxcompress.selection import table as selection_table
from jaxcompress.specs import DistillSpec, PruneSpec, QuantSpec
from jaxcompress.steps import (TrainState, check_batch, check_weight, cross_entropy,
                               in_classes, label_errors, make_train_step, per_label,
                               weighted_mean)

# model_state entries that are not model collections: the quantizer's state, k-means codebooks and
# (evaluation only) the folded BatchNorms and the gains folded into weight scales.
STATE_ENTRIES = ("quant", "kmeans", "fold", "gains")


def decay_mask(params: dict) -> dict:
  """Weight decay only on the student's own parameters (``params['model']``)."""
  return {k: jax.tree.map(lambda _: k == "model", v) for k, v in params.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class Compression:
  """The compressed student's forward, loss and optimizer.

  Invariants: ``quantizer`` is None when neither weights nor inputs are quantized; ``teacher`` is
  None unless the distill spec uses one; the pruning wrapper is the outermost optimizer
  transform, so pruned weights are exactly 0 after every step; ``layers`` is the student's traced
  forward, ``fold_norms`` the BatchNorms it folds (``{path: epsilon}``) and ``gain_norms`` those
  whose gain may move into the kernel before them (``{layer path: BatchNorm path}``);
  ``half_scales``: the export stores scales and folds in float16 (``QuantSpec.scale_dtype``).
  """
  student: Functional
  teacher: Functional | None
  layers: ModelLayers
  quantizer: quantization.Quantizer | None
  optimizer: optax.GradientTransformation
  prune: PruneSpec
  distill: DistillSpec
  prune_rules: list
  fold_norms: dict
  gain_norms: dict = dataclasses.field(default_factory=dict)
  kmeans_paths: tuple = ()
  kmeans_bits: int = 0
  compute_dtype: str = "float32"
  half_scales: bool = False
  example: Any = None  # build's sample_input as jax.ShapeDtypeStruct leaves (build sets it)

  @property
  def prune_enabled(self) -> bool:
    return self.prune.enabled

  def final_masks(self, params) -> Any:
    """The masks the pruning schedule ends at, computed now from ``params`` (one-shot).

    The same structure (N:M along each kernel's reduction axes, per-layer sparsities), rules and
    score as the train step's pruning (``random`` drawn from the same ``prune.seed``, so a run
    ends at these very masks); e.g. to evaluate the compressed model before fine-tuning. The
    gradient-based scores (``saliency``, ``movement``) have no gradients here: magnitude ranks.
    """
    score = pruning.SCORES.get(self.prune.method)
    if score is None or score.needs_grads:  # method 'none', or no gradients to score with
      score = pruning.SCORES["magnitude"]
    return pruning.compute_masks(params, self.prune.sparsity, score=score,
                                 structure=_masker(self.prune, self.layers),
                                 rules=self.prune_rules,
                                 key=jax.random.PRNGKey(self.prune.seed) if score.needs_key
                                 else None)

  # -- forward -------------------------------------------------------------------------------
  def student_apply(self, params, model_state, x, *, train: bool, rng=None, capture=False):
    """``(logits, new model state, captured features)`` of the student.

    In training the forward runs in ``compute_dtype`` (:mod:`jaxcompress.precision`): weights are
    shared (k-means) and fake-quantized in float32, then cast with the input; logits, features and
    the new model state come back float32.
    """
    cast = None if not train or self.compute_dtype == "float32" else jnp.dtype(self.compute_dtype)
    collections = {k: v for k, v in model_state.items() if k not in STATE_ENTRIES}
    model_params, books = params["model"], model_state.get("kmeans")
    if books is not None:
      model_params, books = _share_weights(model_params, books, update=train)
    x = precision.cast_floating(x, cast)
    variables = {"params": model_params, **collections}
    feats: dict = {}
    paths = [p for p, _ in self.distill.feature_pairs] if capture else []
    hook = capture_hook(feats, paths) if capture else None
    if not train and "fold" in model_state:
      hook = chain_hooks(hook, fold_hook(model_state["fold"]))
    if self.quantizer is None:
      variables["params"] = precision.cast_floating(model_params, cast)
      logits, updated = self.student.apply(variables, x, train=train, rngs=rng, hook=hook,
                                           hook_paths=paths)
    else:
      qstate = model_state["quant"].replace(steps=params.get("qsteps", {}))
      gains = None if train else model_state.get("gains")
      logits, updated, new_q = self.quantizer.apply(variables, qstate, x, train=train, rngs=rng,
                                                    hook=hook, hook_paths=paths,
                                                    compute_dtype=cast, weight_gains=gains)
    if cast is not None:
      logits, updated, feats = precision.cast_floating((logits, updated, feats), jnp.float32)
    new_state = {**model_state, **updated}
    if self.quantizer is not None:
      new_state["quant"] = new_q.replace(steps={})
    if books is not None:
      new_state["kmeans"] = books
    return logits, new_state, feats

  def logits_fn(self, variables, x):
    """Eval-mode logits; ``variables = {'params': state.params, 'model_state': ...}``.

    Always one compiled XLA program (``jax.jit``; inlined when called inside a jitted step): run
    op by op, XLA would round some fused operations differently, and the logits would no longer
    equal the exported model's, which is jitted too.
    """
    return _eval_logits(self, variables, x)

  def eval_variables(self, state: TrainState) -> dict:
    """:meth:`logits_fn`'s variables; folded BatchNorms run as ``x * gain + bias``.

    The ``fold`` entry holds the very gains and biases the export stores, so the fake-quant model
    and its exported artifact compute the same float32 operations and agree exactly. Where the
    gain goes into the weight scales of the layer before the BatchNorm (:meth:`gain_layers`), the
    ``gains`` entry carries it there and the BatchNorm runs as ``x * 1 + bias``. With
    ``half_scales`` the folds hold the float16-rounded values the export stores, and every layer
    of :meth:`half_layers` gets a float16 gain (1 where no BatchNorm gain moves into it), which
    has its dequantization scale rounded to float16 as the export stores it.
    """
    model_state = dict(state.model_state)
    fold = fold_arrays(state.params["model"], model_state.get("batch_stats", {}), self.fold_norms,
                       half=self.half_scales)
    gains = {}
    for layer, norm in self.gain_layers(model_state).items():
      gains[layer], bias = fold[norm]
      fold[norm] = (jnp.ones_like(gains[layer]), bias)
    if self.half_scales:
      ones = {path: jnp.ones(channels) for path, channels in self.half_layers(model_state).items()}
      gains = {path: jnp.asarray(g, jnp.float16) for path, g in {**ones, **gains}.items()}
    if fold:
      model_state["fold"] = fold
    if gains:
      model_state["gains"] = gains
    return {"params": state.params, "model_state": model_state}

  def half_layers(self, model_state) -> dict[str, int]:
    """``{layer path: output channels}``: the integer weights whose scales the export stores in
    float16 under ``half_scales`` (scales along axes that include the kernel's last,
    :func:`jaxcompress.quantization.half_scaled`)."""
    return self._scaled(model_state, quantization.half_scaled) if self.half_scales else {}

  def gain_layers(self, model_state) -> dict[str, str]:
    """``{layer path: BatchNorm path}``: the folded BatchNorms whose gain the weight scales take.

    A BatchNorm's per-channel gain ``g`` goes into the layer before it when that layer's kernel
    is integer-quantized with one scale per output channel and the move is exact
    (``gain_norms``: no bias, the output reaches the rest of the model only through the
    BatchNorm): the exported kernel is then ``q * (scale * g)``, the folded BatchNorm a bias
    alone, and the artifact stores one float32 per channel less. Other BatchNorms keep their
    gain.
    """
    return {path: self.gain_norms[path]
            for path in self._scaled(model_state, quantization.channels_last)
            if path in self.gain_norms}

  def _scaled(self, model_state, scaled: Callable[[Any, int], bool]) -> dict[str, int]:
    """``{layer path: output channels (last axis)}`` of the integer-quantized kernels whose
    scale axes pass ``scaled(weight_axis, ndim)``, in forward order."""
    if self.quantizer is None or "quant" not in model_state:
      return {}
    quantized = {q.path: q for q in model_state["quant"].layers}
    return {l.path: int(l.shape[-1]) for l in self.layers.layers
            if (q := quantized.get(l.path)) is not None and q.config.weight_bits is not None
            and scaled(q.weight_axis, len(l.shape))}

  # -- loss ----------------------------------------------------------------------------------
  def teacher_apply(self, teacher_vars, x):
    """``(teacher logits, captured teacher features)``, eval mode, no gradient."""
    feats: dict = {}
    paths = [p for _, p in self.distill.feature_pairs] if self.distill.feature_weight else []
    try:
      logits, _ = self.teacher.apply(teacher_vars, x, train=False,
                                     hook=capture_hook(feats, paths) if paths else None,
                                     hook_paths=paths)
    except flax.errors.InvalidRngError as e:  # dropout on with train=False: its own switch
      raise ConfigError(f"teacher: its forward draws random numbers in eval mode "
                        f"({message_line(e)}); the teacher runs without a key: give its __call__ "
                        "a train or deterministic flag, or build it in eval mode") from None
    except (flax.errors.FlaxError, ConfigError) as e:  # another model's variables
      first = message_line(e)
      if isinstance(e, ConfigError) and not first.startswith("variables: "):
        raise
      raise ConfigError(f"teacher_vars: the teacher does not take these variables "
                        f"({first.removeprefix('variables: ')}); pass the teacher's own") from None
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(feats)

  def loss_fn(self, params, model_state, batch, rng, teacher_vars=None):
    """Per-step loss: ``(1 - alpha) * CE + alpha * KD + feature_weight * hints``."""
    check_batch(batch, "train step: the batch")
    d = self.distill
    try:
      logits, new_state, s_feats = self.student_apply(
          params, model_state, batch.image, train=True, rng=rng,
          capture=bool(d.feature_weight and self.teacher is not None))
    except flax.errors.FlaxError as e:  # inputs of another shape than the model was built for
      shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), batch.image)
      raise ConfigError(f"train step: the model fails on batch.image of shape {shapes} "
                        f"({message_line(e)})") from None
    task = cross_entropy(logits, batch.label)
    w = batch.weight
    check_weight(w, batch.label)
    w_task = w  # alpha = 1: the labels only measure; an example without one (-1) is not counted
    if self.teacher is not None and d.alpha == 1:
      w_task = jnp.where(in_classes(logits, batch.label), per_label(w, batch.label), 0.0)
    metrics = {"task_loss": weighted_mean(task, w_task),
               "accuracy": weighted_mean((jnp.argmax(logits, -1) == batch.label) * 1.0, w_task)}
    if self.teacher is None or d.alpha < 1:  # labels the loss uses: fit stops on bad ones
      metrics["label_errors"] = label_errors(logits, batch.label, w)
    per_example = task
    if self.teacher is not None:
      if teacher_vars is None:
        raise ConfigError("train step: distillation needs the teacher's variables, the step's "
                          "third argument: train_step(state, batch, teacher_vars)")
      check_variables(teacher_vars, "teacher_vars")
      t_logits, t_feats = self.teacher_apply(teacher_vars, batch.image)
      if t_logits.shape != logits.shape:
        raise ConfigError(f"teacher: its outputs have shape {tuple(t_logits.shape)}, the "
                          f"student's {tuple(logits.shape)}; distillation needs a teacher of the "
                          "same classes")
      kd_term = kd.kd_loss(logits, t_logits, d.temperature)
      # alpha = 1 is distillation alone: examples without a label (-1) then train too.
      per_example = kd_term if d.alpha == 1 else (1 - d.alpha) * task + d.alpha * kd_term
      metrics["kd_loss"] = weighted_mean(kd_term, w)
      metrics["teacher_agreement"] = weighted_mean(kd.agreement(logits, t_logits), w)
      if d.feature_weight:
        hint = self._hint_loss(params.get("adapters", {}), s_feats, t_feats, task.shape)
        per_example = per_example + d.feature_weight * hint
        metrics["feature_loss"] = weighted_mean(hint, w)
    if self.prune_enabled:
      metrics["sparsity"] = self.sparsity(params)
    return weighted_mean(per_example, w), (new_state, metrics)

  def _hint_loss(self, adapters, s_feats, t_feats, positions: tuple[int, ...]):
    """The summed hint losses, of the task losses' shape ``positions`` (``[B]``, or ``[B, T]``
    for a sequence): per position where a feature has one (``[B, T, ..., D]``), else one per
    example counted at each of its positions (a ``[B]`` added to ``[B, T]`` as it is would line
    it up with the positions instead)."""
    total = jnp.zeros(positions, jnp.float32)
    for s_path, t_path in self.distill.feature_pairs:
      s, t = _feature(s_feats, s_path, 0), _feature(t_feats, t_path, 1)
      s = kd.adapt(adapters, (s_path, t_path), s, t.shape[-1])
      if len(positions) > 1 and s.shape[:len(positions)] == positions == t.shape[:len(positions)]:
        flat = lambda f: f.reshape((-1,) + f.shape[len(positions):])  # noqa: E731
        hint = kd.feature_loss(flat(s), flat(t)).reshape(positions)
      else:
        hint = per_label(kd.feature_loss(s, t), total)
      total = total + hint
    return total

  def sparsity(self, params) -> jax.Array:
    """Fraction of zeros over the pruned leaves of ``params`` (``{'model': ...}``)."""
    return pruning.sparsity(params, self.prune_rules)

  def make_train_step(self, *, mesh=None, seed: int = 0, skip_nonfinite: bool = False
                      ) -> Callable:
    """``step(state, batch[, teacher_vars]) -> (state, metrics)``, jitted once (see
    :func:`jaxcompress.steps.make_train_step` for ``skip_nonfinite``)."""
    return make_train_step(self.loss_fn, self.optimizer, mesh=mesh, seed=seed,
                           num_aux=int(self.teacher is not None), skip_nonfinite=skip_nonfinite)

  def describe(self, state: TrainState) -> str:
    """A Markdown table of the student's layers in forward order and what was done to each.

    Weights of rank >= 2 that no layer holds are listed as not compressed.
    """
    sel = pruning.select(state.params, self.prune_rules, warn_unused=False)
    pruned = {p[len("model/"):] for p, s in zip(sel.paths, sel.selected) if s}
    quant = {}
    if self.quantizer is not None:
      quant = {l.path: l.config for l in state.model_state["quant"].layers}
    books = set(state.model_state.get("kmeans", {}))
    decisions = {}
    for layer in self.layers.layers:
      parts = ["pruned" if self.prune_enabled and layer.weight in pruned else "dense"]
      cfg = quant.get(layer.path)
      if layer.weight in books:
        parts.append(f"{self.kmeans_bits}-bit k-means")
      elif cfg is not None and cfg.weight_bits:
        parts.append(f"{cfg.weight_bits}-bit weights")
      if cfg is not None and cfg.act_bits:
        parts.append(f"{cfg.act_bits}-bit inputs")
      if layer.norm in self.fold_norms:
        parts.append(f"folds {layer.norm}")
      decisions[layer.path] = ", ".join(parts)
    return selection_table(self.layers, decisions)

  # -- export --------------------------------------------------------------------------------
  def variables(self, state: TrainState) -> dict:
    """The student's trained variables (``params`` and its own collections), on the host."""
    model_state = jax.device_get(state.model_state)
    return {"params": jax.device_get(state.params["model"]),
            **{k: v for k, v in model_state.items() if k not in STATE_ENTRIES}}

  def export(self, out_dir: str, state: TrainState, *, input_shape: tuple[int, ...] | None = None,
             input_dtype: str | None = None, model_name: str = "") -> dict:
    """Writes the compressed student as an artifact (:func:`jaxcompress.export.export_model`).

    Integer weights and input quantization from the quantizer's specs, k-means codebooks, pruned
    weights exactly 0, and the BatchNorms that directly follow a linear layer folded. Load it with
    ``jaxcompress.export.load(out_dir, student_module)``. BatchNorm gains go into the weight
    scales where :meth:`gain_layers` allows it. Its outputs equal
    ``logits_fn(eval_variables(state), x)`` bit for bit on CPU.

    Args:
      out_dir: the artifact folder (created; its files replaced).
      state: the trained state.
      input_shape: one input example's shape (no batch axis), for a model of one array input;
        None: the shapes and dtypes of ``build``'s sample input (any dict or tuple of arrays).
      input_dtype: that input's dtype; None: the sample input's.
      model_name: a name recorded in the spec.

    Returns:
      The artifact's size report.
    """
    from jaxcompress import export  # heavy; only exporting needs it
    from jaxcompress.export import inputs as io
    sample = io.of_example(self.example)
    one = io.single(sample)
    if one is None:  # a dict or tuple of inputs: build's sample says all
      if input_shape is not None or input_dtype is not None:
        raise invalid("export input_shape", input_shape, f"None for a model whose input is "
                      f"{io.describe(sample)} (its shapes and dtypes are exported)")
      signature = dict(inputs=io.build(sample, jax.ShapeDtypeStruct))
    else:
      shape = one[0] if input_shape is None else input_shape
      if isinstance(shape, (tuple, list)) and len(shape) != len(one[0]):
        raise invalid("export input_shape", input_shape, f"one example's shape, without the "
                      f"batch axis (build's sample: {one[0]})")
      signature = dict(input_shape=shape, input_dtype=input_dtype or one[1])
    variables = self.variables(state)
    if one is not None and input_shape is not None:
      self._check_input_shape(io.of_shape(shape, signature["input_dtype"], "export input_shape"),
                              one[0], variables)
    export.check_finite_variables(variables)  # before the input ranges a NaN would reach
    self._warn_undeclared_dtypes(variables["params"])
    self._warn_unexported_state()
    model_state = jax.device_get(state.model_state)
    codebooks = {path: quantization.stepwise(quantization.assign, jnp.ndim(book) - 1)(
        tree_get(variables["params"], path), book)
                 for path, book in model_state.get("kmeans", {}).items()}
    specs = None
    if self.quantizer is not None:
      qstate = model_state["quant"].replace(steps=jax.device_get(state.params.get("qsteps", {})))
      specs = self.quantizer.specs(variables, qstate)
    gains_into = {norm: self.layers.layer(path).weight
                  for path, norm in self.gain_layers(model_state).items()}
    return export.export_model(out_dir, variables=variables, **signature, specs=specs,
                               codebooks=codebooks or None, fold=self.fold_norms,
                               gains_into=gains_into, model_name=model_name,
                               reduce_axes=self.layers.reduce_axes(),
                               window_axes=self.layers.window_axes(),
                               scale_dtype="float16" if self.half_scales else "float32")

  def _check_input_shape(self, given: dict, built: tuple[int, ...], variables: Mapping) -> None:
    """The student traced on ``given`` (an input signature) has the shapes of ``variables``: an
    input shape other than ``build``'s sample's is refused unless the model takes it with the
    same weights (a fully convolutional model exported for another resolution)."""
    shape = tuple(given["shape"])
    if shape == built:
      return
    x = jax.ShapeDtypeStruct((1, *shape), np.dtype(given["dtype"]))
    try:
      want = flat_paths(jax.eval_shape(lambda x: self.student.init(jax.random.key(0), x), x))
    except Exception as e:  # the forward does not take that shape at all
      raise ConfigError(f"export input_shape: {self.student.name}'s forward fails on {shape} "
                        f"({first_line(e)}); build's sample has {built}") from None
    have = flat_paths(variables)
    for path, v in want.items():
      if path in have and tuple(v.shape) != np.shape(have[path]):
        raise ConfigError(f"export input_shape {shape} differs from build's sample's {built}, "
                          f"and on it {path} would have shape {tuple(v.shape)}, not the trained "
                          f"{np.shape(have[path])}; give input_shape={built} (or None)")

  def _warn_undeclared_dtypes(self, params) -> None:
    """Warns when ``params`` are not of the dtypes the student declares: ``export.load`` rebuilds
    the weights in the declared ones, which round the dequantized values differently."""
    declared = flat_paths(jax.eval_shape(
        lambda x: self.student.init(jax.random.key(0), x), self.example)["params"])
    for path, value in flat_paths(params).items():
      want = declared.get(path)
      if want is not None and np.dtype(want.dtype) != np.dtype(value.dtype):
        warnings.warn(f"export: params {path!r} are {np.dtype(value.dtype).name} where "
                      f"{self.student.name} declares {np.dtype(want.dtype).name}; export.load "
                      "rebuilds them as declared, so its outputs may differ from the fake-quant "
                      "model's in the last bits: declare that dtype in the module (param_dtype) "
                      "instead of casting the variables", stacklevel=3)
        return

  def _warn_unexported_state(self) -> None:
    """Warns when the NNX student holds state other than parameters, batch statistics and RNG
    streams (a custom ``nnx.Variable``): the artifact lacks it, so ``export.load`` takes it from
    the module it is given."""
    if self.student.kind != "nnx":
      return
    other = [repr("/".join(map(str, path))) for path, v in nnx.to_flat_state(self.student.rest)
             if not isinstance(v, nnx.RngState)]
    if other:
      warnings.warn(f"export: the NNX module's state {shortened(other, 3)} is neither an "
                    "nnx.Param nor an nnx.BatchStat and is not exported; export.load takes it "
                    "from the module it is given (keep state that must travel in nnx.BatchStat)",
                    stacklevel=3)

  # -- state ---------------------------------------------------------------------------------
  def init_state(self, student_vars: dict, sample_x, *, teacher_vars=None, calibration=(),
                 calibration_method: str = "minmax", key=None) -> TrainState:
    """The initial train state: student weights, calibrated quantizer, adapters, optimizer.

    The caller's arrays are copied, so a train step never deletes arrays the caller still holds.
    """
    check_variables(student_vars, "student_vars")
    if isinstance(calibration, (np.ndarray, jax.Array)):
      raise invalid("calibration", f"one array of shape {tuple(calibration.shape)}",
                    "a sequence of input batches", "pass [x]")
    for name, tree in (("student_vars", student_vars), ("sample_x", sample_x),
                       ("teacher_vars", teacher_vars)):
      check_finite(name, tree, "a model trained from it would be NaN: check the weights or the "
                   "inputs")
    student_vars = jax.tree.map(jnp.array, dict(student_vars))
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
    if self.kmeans_bits:  # a weight stacked by nn.scan: one codebook per step
      stacked = self.layers.stacked()
      cluster = lambda w, m: quantization.kmeans(w, bits=self.kmeans_bits, mask=m)  # noqa: E731
      model_state["kmeans"] = {}
      for path in self.kmeans_paths:
        w = tree_get(params["model"], path)  # finite: init_state checked student_vars
        model_state["kmeans"][path] = quantization.stepwise(cluster, stacked.get(path, 0))(
            w, w != 0).codebook
    if self.teacher is not None and self.distill.feature_weight:
      if teacher_vars is None:
        raise ConfigError("init_state: feature hints (distill.feature_weight > 0) size their "
                          "adapters on the teacher's features: pass teacher_vars=")
      check_variables(teacher_vars, "teacher_vars")
      _, _, s_feats = self.student_apply(params, model_state, sample_x, train=False,
                                         capture=True)
      _, t_feats = self.teacher_apply(teacher_vars, sample_x)
      s_feats = {p: _feature(s_feats, p, 0, self.layers) for p, _ in self.distill.feature_pairs}
      t_feats = {p: _feature(t_feats, p, 1, None if p in t_feats else trace_layers(
          self.teacher, teacher_vars, sample_x, field="teacher.name"))
                 for _, p in self.distill.feature_pairs}
      params["adapters"] = kd.init_adapters(self.distill.feature_pairs, s_feats, t_feats,
                                            key if key is not None else jax.random.key(0))
    return TrainState.create(params, model_state, self.optimizer)


def _example(sample_input: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      np.shape(a), a.dtype if hasattr(a, "dtype") else np.result_type(a)), sample_input)


def _gain_norms(fm: Functional, variables: dict, layers: ModelLayers, fold_norms: dict,
                x: Any) -> dict[str, str]:
  """``{layer path: BatchNorm path}`` of the folded BatchNorms whose gain may move into the kernel.

  A bias-free layer qualifies when its outputs reach the rest of the model only through its
  BatchNorm. Checked on ``x`` rather than read from the code: with the kernel doubled and the
  folded gain halved (both exact in floating point) the eval-mode output must stay bit for bit
  the same; a layer whose output is also used elsewhere, or that is called again without its
  BatchNorm, changes it.
  """
  params = variables["params"]
  candidates = {l.path: l for l in layers.layers if l.norm in fold_norms
                and tree_get(params, f"{l.path}/bias") is None}
  if not candidates:
    return {}
  fold = fold_arrays(params, variables.get("batch_stats", {}), fold_norms)

  def run(paths):
    p, f = params, dict(fold)
    for path in paths:
      layer = candidates[path]
      p = tree_set(p, layer.weight, tree_get(p, layer.weight) * 2)
      gain, bias = f[layer.norm]
      f[layer.norm] = (gain / 2, bias)
    out = fm.apply({**variables, "params": p}, x, hook=fold_hook(f))[0]
    return [np.asarray(a) for a in jax.tree.leaves(out)]

  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(a, b))
  base = run(())
  paths = list(candidates)
  if not same(run(paths), base):
    paths = [p for p in paths if same(run([p]), base)]
  return {p: candidates[p].norm for p in paths}


def _masker(prune: PruneSpec, layers: ModelLayers) -> pruning.Masker:
  """The spec's masker over the train state's paths, with the traced layers' axes."""
  return prune.masker(layers.reduce_axes("model/"), layers.output_axes("model/"),
                      layers.stacked("model/"), layers.window_axes("model/"))


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(comp: Compression, variables, x):
  return comp.student_apply(variables["params"], variables["model_state"], x, train=False)[0]


def _share_weights(params, books: dict, *, update: bool):
  """Replaces each clustered weight by its k-means-shared version (straight-through)."""
  new_books = {}
  for path, book in books.items():
    share = lambda w, b: quantization.kmeans_fake_quant(w, b, update=update)  # noqa: E731
    shared, new_books[path] = quantization.stepwise(share, jnp.ndim(book) - 1)(
        tree_get(params, path), book)
    params = tree_set(params, path, shared)
  return params, new_books


def _feature(feats: dict, path: str, which: int, layers: ModelLayers | None = None):
  """The captured output of module ``path``; one line naming the pair when it was not called
  (with the model's layer paths as examples where ``layers`` is given)."""
  if path not in feats:
    model = ("student", "teacher")[which]
    names = [l.path for l in layers.layers] if layers is not None else []
    hint = f", e.g. one of its layers: {shortened(names, 6)}"
    raise invalid("distill.feature_pairs", path, f"a module path of the {model} that its forward "
                  f"calls{hint if names else ''}")
  return feats[path]


def _check_teacher_classes(student: Functional, variables: dict, teacher: Functional,
                           sample_input: Any) -> None:
  """Refuses a teacher whose outputs on ``sample_input`` are not shaped as the student's (another
  number of classes), both traced abstractly (``jax.eval_shape``: nothing compiles)."""
  try:
    t_out = jax.eval_shape(lambda x: teacher.apply(teacher.init(jax.random.key(0), x), x)[0],
                           sample_input)
  except Exception:  # a forward that needs its variables or a key: the train step names that
    return
  s_out = jax.eval_shape(lambda x: student.apply(variables, x)[0], sample_input)
  if t_out.shape != s_out.shape:
    raise ConfigError(f"teacher: its outputs have {t_out.shape[-1]} classes (shape "
                      f"{tuple(t_out.shape)}), the student's {s_out.shape[-1]} (shape "
                      f"{tuple(s_out.shape)}); distillation needs a teacher of the same classes")


def build(student: Any, variables: Mapping[str, Any], sample_input: Any, *,
          optimizer: optax.GradientTransformation, total_steps: int,
          prune: PruneSpec = PruneSpec(method="none"), quant: QuantSpec = QuantSpec(),
          distill: DistillSpec = DistillSpec(), teacher: Any = None,
          compute_dtype: Any = "float32") -> Compression:
  """Builds the :class:`Compression` of a student.

  Args:
    student: the model being compressed: a Flax Linen or NNX module (or a ``Functional``).
    variables: its variables (``params`` and e.g. ``batch_stats``).
    sample_input: one batch of inputs; the forward is traced on it to find the layers.
    optimizer: the base optimizer of the ``{'model', 'qsteps', 'adapters'}`` parameter tree
      (see :func:`decay_mask` for weight decay on the model's parameters only).
    total_steps: training steps in the run (pruning schedule fractions refer to it).
    prune: the :class:`PruneSpec`.
    quant: the :class:`QuantSpec`.
    distill: the :class:`DistillSpec`.
    teacher: the distillation teacher (Linen or NNX), or None.
    compute_dtype: ``float32`` or ``bfloat16`` (a name or a dtype: ``jnp.bfloat16``), the dtype
      of the student's training forward and backward (:mod:`jaxcompress.precision`;
      ``train.compute_dtype``).

  Raises:
    ConfigError: for a model with no layer to compress when compressing, a forward that fails on
      ``sample_input``, a teacher missing while the distill spec needs one, a teacher of other
      classes than the student's, bad rules, or an unknown compute dtype.
  """
  compute_dtype = precision.compute_dtype(compute_dtype).name
  check_variables(variables, "variables")
  for name, spec, cls in (("prune", prune, PruneSpec), ("quant", quant, QuantSpec),
                          ("distill", distill, DistillSpec)):
    if not isinstance(spec, cls):
      raise invalid(name, spec, f"a compose.{cls.__name__}",
                    f"from a dict: compose.{cls.__name__}.from_dict(d)")
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise invalid("optimizer", optimizer, "an optax.GradientTransformation, e.g. "
                  "optax.adam(1e-3)")
  s = functional(student)
  layers = trace_layers(s, dict(variables), sample_input, field="student.name")
  if prune.enabled or quant.enabled:
    require_layers(layers)
    layers.warn_uncovered("compression")
  if prune.rules:
    rules = [tuple(r) for r in prune.rules]
  else:
    rules = layers.prune_rules()
  rules = [(f"model/(?:{regex})", value) for regex, value in rules]
  weights = list(flat_paths(variables["params"]))
  for i, (regex, _) in enumerate(prune.layer_sparsity if prune.enabled else ()):
    if not any(re.fullmatch(regex, w) for w in weights):
      raise invalid(f"prune.layer_sparsity[{i}]", regex, "a regex that fully matches a "
                    f"parameter path ({shortened(weights, 4)})")
  opt = optimizer
  if prune.enabled:
    check_counts({"total_steps": total_steps})  # the pruning schedule is in steps of the run
    every, begin, end = prune.steps(total_steps)
    if prune.schedule == "gradual" and end >= total_steps:
      raise invalid("prune.schedule", prune.schedule, f"one_shot or constant for a run of "
                    f"{total_steps} step(s)", "a gradual schedule needs 2 steps or more to reach "
                    "its final sparsity inside the run")
    if prune.schedule == "gradual":
      schedule = pruning.polynomial_schedule(prune.sparsity, begin, end)
    elif prune.schedule == "one_shot":
      schedule = pruning.one_shot_schedule(prune.sparsity, begin)
    else:
      schedule = pruning.constant_schedule(prune.sparsity)
    sel = pruning.select({"model": variables["params"]}, rules, warn_unused=False)
    picked = sel.pick(sel.leaves)
    if prune.rules and not picked:  # the user's rules (the defaults may leave a tiny model none)
      raise invalid("prune.rules", tuple(tuple(r) for r in prune.rules), "rules that select at "
                    f"least one weight to prune ({shortened(weights, 4)})")
    if picked:
      pruning.select({"model": variables["params"]}, rules)  # warns of rules matching nothing
    else:
      warnings.warn(f"prune: the default rules keep the first and last layer ({layers.first!r}, "
                    f"{layers.last!r}) dense and the model has no other compressible weight: "
                    "nothing will be pruned; PruneSpec(rules=...) selects weights to prune",
                    stacklevel=2)
    masker = _masker(prune, layers)
    if prune.structure == "nm":  # a weight whose groups do not fit fails here, not in the step
      jax.eval_shape(lambda leaves: masker(sel.pick(sel.paths), leaves, 1.0), picked)
    if prune.structure == "unstructured" and prune.scope == "layer" and picked and not any(
        round(prune.sparsity * leaf.size) for leaf in picked):
      warnings.warn(f"prune.sparsity={prune.sparsity} prunes no weight: each selected weight is "
                    "too small for that fraction to round to one entry", stacklevel=2)
    # The composed step applies the wrapper's updates unchanged (it is the outermost transform),
    # so the contract check and its host callback are left out of the step.
    opt = pruning.prune(optimizer, schedule, score=prune.method,
                        structure=masker, rules=rules, update_every=every, seed=prune.seed,
                        check_updates=False)
  quantizer = None
  kmeans_bits = quant.weight_bits if quant.method == "kmeans" else 0
  # The first and last layers are never weight-shared: uniform at first_last_bits, or float
  # with first_last_bits=0, as QuantSpec promises (and the PTQ study's k<b> rows do).
  edges = set(layers.edge_weights())
  if quant.enabled:
    # k-means layers are weight-shared here; the quantizer only does their inputs, and the
    # first/last layers stay uniform.
    common = dict(per_channel=bool(quant.per_channel),
                  method="minmax" if quant.method == "kmeans" else quant.method)
    edge = quant.first_last_bits or None
    inner_bits = None if kmeans_bits else quant.weight_bits or None
    rules_q = [(regex, dict(weight_bits=w or None, act_bits=a or None, **common))
               for regex, w, a in quant.layer_bits]
    paths = [l.path for l in layers.layers]
    for i, (regex, _, _) in enumerate(quant.layer_bits):
      if not any(re.fullmatch(regex, p) for p in paths):
        raise invalid(f"quant.layer_bits[{i}]", regex, "a regex that fully matches a layer path "
                      f"({shortened(paths, 4)})")
    # The defaults decide only the layers layer_bits leaves open (no rule that matches nothing).
    open_ = [l.path for l in layers.layers
             if not any(re.fullmatch(r, l.path) for r, _, _ in quant.layer_bits)]
    rules_q += [(pos, dict(weight_bits=edge, act_bits=edge, **common))
                for pos, path in ((quantization.FIRST, layers.first),
                                  (quantization.LAST, layers.last)) if path in open_]
    if set(open_) - {layers.first, layers.last}:
      rules_q.append((".*", dict(weight_bits=inner_bits, act_bits=quant.act_bits or None,
                                 **common)))
    quantizer = quantization.quantize(s, rules_q)
  if distill.uses_teacher and teacher is None:
    raise ConfigError("teacher: distillation (distill.alpha > 0 or distill.feature_weight > 0) "
                      "needs a teacher model; give one or set distill.alpha=0 and "
                      "distill.feature_weight=0")
  if distill.uses_teacher:
    _check_teacher_classes(s, dict(variables), functional(teacher), sample_input)
  stats = variables.get("batch_stats", {})
  fold_norms = {path: eps for path, eps in layers.batchnorms.items()
                if isinstance(tree_get(stats, path), Mapping)}
  gain_norms = (_gain_norms(s, dict(variables), layers, fold_norms, sample_input)
                if quantizer is not None and fold_norms else {})
  return Compression(
      student=s, teacher=functional(teacher) if distill.uses_teacher else None, layers=layers,
      quantizer=quantizer, optimizer=opt, prune=prune, distill=distill, prune_rules=rules,
      fold_norms=fold_norms, gain_norms=gain_norms, kmeans_bits=int(kmeans_bits),
      kmeans_paths=tuple(l.weight for l in layers.layers if l.weight not in edges),
      compute_dtype=compute_dtype, half_scales=quant.scale_dtype == "float16",
      example=_example(sample_input))
