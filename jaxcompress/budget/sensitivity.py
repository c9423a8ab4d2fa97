"""Per-layer sensitivity: the held-out loss when one layer alone is pruned and quantized.

For every layer and every option a preset allows it (:class:`~jaxcompress.budget.presets.Option`),
the model is evaluated with that layer alone pruned (the lowest magnitudes, in the preset's
structure) and fake-quantized (its weight, per channel, min-max; its input, on a range calibrated on
training images), every other layer untouched (float). The damage of an option is the increase of
the held-out loss over the float model's: ``damage="kl"``, the mean KL divergence from the float
model's predictions (how far the layer moves the function, which matters even on examples the
model has fitted; it is what KD fine-tuning minimises), or ``"ce"``, the mean cross-entropy with
the labels. ``adapt_norms=True`` evaluates with the normalisation statistics of each held-out
batch (train mode) instead of the stored ones: the shift a pruned layer causes in the statistics
after it, which fine-tuning undoes in its first steps, then no longer counts as damage (Li et al.
2020 found one-shot accuracy with adapted statistics to rank pruned networks much as their
fine-tuned accuracy does, and with the stored ones not at all).

ONE jitted evaluation (:class:`Evaluator`, which also measures whole plans) serves the whole
scan: the keep-masks of every layer and the per-layer weight and input bit widths are its array
inputs (0 bits: float), so no grid point recompiles (:attr:`Sensitivity.compiles` counts the
traces). With ``joint=False`` pruning and quantization
are measured apart (sparsities at float weights, bit widths at dense weights, input bits at float
weights) and an option's damage is their sum: ``|S| + |W| + |A|`` evaluations per layer instead
of ``(|S| + 1) x |W| + |A|`` (``S``: the sparsities but 0, whose quantization alone is one
(sparsity, bits) pair too). Input bits are measured only for layers whose options differ in them (a
damage common to every option of a layer changes no choice).

Evaluate on held-out TRAINING examples, never on the split accuracy is reported on: the plan is
chosen from these numbers.

References:
  Li, Wang, Chen, Su, Li, Luo, Liu. EagleEye: Fast Sub-net Evaluation for Efficient Neural
  Network Pruning. ECCV 2020 (adaptive batch-norm statistics for one-shot evaluation).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import parallel, quantization
from jaxcompress.budget.cost import keep_mask
from jaxcompress.budget.presets import Option
from jaxcompress.errors import ConfigError, check_variables, invalid, shortened, unknown
from jaxcompress.models.functional import functional
from jaxcompress.progress import bar as progress_bar
from jaxcompress.quantization.layer import quantize_input, quantize_kernel
from jaxcompress.rules import tree_get, tree_set
from jaxcompress.selection import trace_layers
from jaxcompress.steps import (bad_labels_error, check_batch, check_labels, check_weight,
                               cross_entropy, label_errors, per_label, predict)

# The ``damage`` values of :func:`scan` and :class:`Evaluator` (module docstring): the KL
# divergence from the float model's predictions, or the cross-entropy with the labels.
DAMAGES = ("kl", "ce")


class Sensitivity(NamedTuple):
  """The scan's result.

  Invariants: ``paths``, ``options`` and ``damage`` are aligned (one entry per layer, forward
  order); ``damage[i][k]`` is the loss increase of ``options[i][k]``; ``measured`` maps every
  evaluated ``(path, sparsity, weight bits, input bits)`` to ``(loss, accuracy)`` (path ``None``:
  the float model).
  """
  paths: tuple[str, ...]
  options: tuple[tuple[Option, ...], ...]
  damage: tuple[np.ndarray, ...]
  base_loss: float
  base_accuracy: float
  measured: dict
  compiles: int
  joint: bool = False
  loss: str = "ce"

  def predict(self, path: str, sparsity: float, weight_bits: int, act_bits: int = 0) -> float:
    """Damage of any sparsity (linear between the measured ones; clamped at the largest).

    Raises:
      ConfigError: if ``path`` is not a scanned layer or ``weight_bits`` a width the scan did not
        measure for it.
    """
    if path not in self.paths:
      raise invalid("path", path, f"a scanned layer ({shortened(list(self.paths), 3)})")
    keys = [k for k in self.measured if k[0] == path]  # (path, sparsity, bits, input bits)
    scanned = sorted({k[2] for k in keys if k[2]})
    if weight_bits and weight_bits not in scanned:
      raise invalid(f"weight_bits (layer {path!r})", weight_bits,
                    f"a width the scan measured, one of {scanned}", "scan that width too")

    def loss(s, wb, ab):
      return self.measured[(path, s, wb, ab)][0] if (s, wb, ab) != (0.0, 0, 0) else (
          self.base_loss)
    wb = weight_bits if self.joint else 0
    grid = sorted({k[1] for k in keys if k[2] == wb and k[3] == 0} | {0.0})
    curve = [loss(s, wb, 0) - self.base_loss for s in grid]
    d = float(np.interp(sparsity, grid, curve))
    if not self.joint and weight_bits:
      d += loss(0.0, weight_bits, 0) - self.base_loss
    if act_bits and (path, 0.0, 0, act_bits) in self.measured:
      d += loss(0.0, 0, act_bits) - self.base_loss
    return d


def scan(model: Any, variables: Mapping[str, Any], batches: Sequence[Any],
         options: Mapping[str, Sequence[Option]], *, calibration: Iterable[Any],
         structure: str = "unstructured", per_channel: bool = True,
         joint: bool = False, damage: str = "ce", adapt_norms: bool = False,
         measured: Mapping | None = None,
         progress: Callable[[dict], None] | None = None) -> Sensitivity:
  """Measures every option of every layer on ``batches`` (see the module docstring).

  Args:
    model: a Flax Linen or NNX module.
    variables: its (float, trained) variables.
    batches: held-out training examples as :class:`jaxcompress.data.Batch` es (image, label,
      weight), all of one shape (pad the last one with weight 0).
    options: ``{layer path: options}``; layers not listed are not scanned.
    calibration: input batches that calibrate the input ranges (min-max).
    structure: ``unstructured``, ``nm`` (2:4) or ``channel``.
    per_channel: one weight scale per output channel.
    joint: measure every (sparsity, weight bits) pair instead of summing their parts.
    damage: ``kl`` (from the float model's predictions) or ``ce`` (with the labels).
    adapt_norms: evaluate with each batch's own normalisation statistics (train mode; a model
      with dropout runs it with a fixed key). Batches should then hold many examples each, and
      no padding (padded examples enter the statistics).
    measured: ``Sensitivity.measured`` of an earlier, interrupted scan of the same model and
      batches (with ``(None, 0, 0, 0)`` the float model's): those points are not evaluated again.
    progress: called with the measurements so far after each evaluation (e.g. to save them).

  Returns:
    The :class:`Sensitivity`.

  Raises:
    ConfigError: if ``batches`` is empty, a path names no layer of the model or ``damage`` is
      unknown.
  """
  evaluate = Evaluator(model, variables, batches, calibration=calibration,
                       per_channel=per_channel, damage=damage, adapt_norms=adapt_norms)
  index = {l.path: i for i, l in enumerate(evaluate.layers)}
  missing = sorted(set(options) - set(index))
  if missing:
    raise ConfigError(f"sensitivity: {missing[0]!r} names no layer of the model "
                      f"(layers: {list(index)[:6]})")
  weights = {l.path: np.asarray(tree_get(variables["params"], l.weight))
             for l in evaluate.layers}
  by_path = {l.path: l for l in evaluate.layers}
  masks: dict = {}

  def measure(path, s, wb, ab):
    if (path, s) not in masks:
      masks[(path, s)] = keep_mask(weights[path], s, structure, by_path[path])
    return evaluate({path: masks[(path, s)]}, {path: wb}, {path: ab})

  measured = dict(measured or {})
  if (None, 0.0, 0, 0) not in measured:
    measured[(None, 0.0, 0, 0)] = evaluate({}, {}, {})
  base_loss, base_acc = measured[(None, 0.0, 0, 0)]

  def parts(path, o, same_act):  # the measurements whose damages add up to the option's
    keys = [(o.sparsity, o.weight_bits, 0)] if joint else [(o.sparsity, 0, 0),
                                                           (0.0, o.weight_bits, 0)]
    keys += [] if same_act else [(0.0, 0, o.act_bits)]
    return [(path, float(s), int(w), int(a)) for s, w, a in keys if (s, w, a) != (0.0, 0, 0)]

  paths = sorted(options, key=index.get)
  same = {p: len({o.act_bits for o in options[p]}) == 1 for p in paths}  # a constant: not measured
  needed = {k: None for p in paths for o in options[p] for k in parts(p, o, same[p])}
  todo = [k for k in needed if k not in measured]
  for key in progress_bar(todo, desc="sensitivity scan", unit="eval", leave=False,
                          disable=not parallel.is_main_process()):
    measured[key] = measure(*key)
    if progress is not None:
      progress(measured)
  damages = [np.asarray([sum(measured[k][0] - base_loss for k in parts(p, o, same[p]))
                         for o in options[p]], np.float64) for p in paths]
  opts = [tuple(options[p]) for p in paths]
  return Sensitivity(tuple(paths), tuple(opts), tuple(damages), base_loss, base_acc, measured,
                     evaluate.compiles, joint, damage)


def check_held_out_batches(batches: Sequence[Any]) -> None:
  """Raises one line unless the held-out ``batches`` hold an example of weight > 0 and no
  negative weight."""
  if not batches:
    raise ConfigError("sensitivity: the held-out batches are empty; hold out training "
                      "examples")
  for b in batches:
    check_batch(b, "sensitivity: the held-out batches")
  weights = [np.asarray(b.weight) for b in batches]
  lowest = min((float(w.min()) for w in weights if w.size), default=0.0)
  if lowest < 0:  # a negative weight would count an example's damage against the others
    raise ConfigError(f"sensitivity: the held-out batches hold a weight of {lowest:g}; weights "
                      "are >= 0 (0 marks padding)")
  if not all(w.size for w in weights) or not sum(float(np.sum(w)) for w in weights) > 0:
    raise ConfigError("sensitivity: the held-out batches hold no example of weight > 0 (an "
                      "empty batch, or padding only); hold out training examples")


class Evaluator:
  """The held-out loss and accuracy of the model with any of its layers pruned and quantized.

  One jitted function serves every call: each layer's keep-mask and weight and input bit widths
  are its array inputs (0 bits: float), so no call recompiles (:attr:`compiles` counts the
  traces). ``damage`` and ``adapt_norms`` as in :func:`scan`.
  """

  def __init__(self, model: Any, variables: Mapping[str, Any], batches: Sequence[Any], *,
               calibration: Iterable[Any], per_channel: bool = True, damage: str = "ce",
               adapt_norms: bool = False):
    if damage not in DAMAGES:
      raise unknown("sensitivity: damage", damage, DAMAGES)
    check_variables(variables)
    self.batches = list(batches)
    check_held_out_batches(self.batches)
    sample = self.batches[0].image
    self.variables = dict(variables)
    self.layers = layers = trace_layers(model, self.variables, sample).layers
    index = {l.path: i for i, l in enumerate(layers)}
    fm = functional(model)
    qz = quantization.quantize(fm, [(".*", dict(weight_bits=8, act_bits=8,
                                                  per_channel=per_channel))])
    qstate = qz.init(self.variables, sample)
    qstate = quantization.calibrate(qz, self.variables, qstate, calibration)
    qlayers = {l.path: l for l in qstate.layers}
    ranges = qstate.ranges
    self._traces = []

    def run(variables, keeps, wbits, abits, batch, target):
      self._traces.append(1)
      params = variables["params"]
      for i, layer in enumerate(layers):
        w = tree_get(params, layer.weight) * keeps[i]
        q = quantize_kernel(qlayers[layer.path], w, None, jnp.maximum(wbits[i], 2))
        params = tree_set(params, layer.weight, jnp.where(wbits[i] > 0, q, w))

      def hook(call, forward):
        i = index.get(call.path)
        if i is None or call.kind != "linear" or call.path not in ranges:
          return forward(call.x)
        xq = quantize_input(qlayers[call.path], call.x, ranges[call.path], None,
                            jnp.maximum(abits[i], 2))
        return forward(jnp.where(abits[i] > 0, xq, call.x))

      logits, _ = fm.apply({**variables, "params": params}, batch.image, hook=hook,
                           train=adapt_norms, rngs=jax.random.key(0) if adapt_norms else None)
      check_labels(logits, batch.label)
      check_weight(batch.weight, batch.label)
      w = per_label(batch.weight, batch.label)
      correct = (predict(logits) == batch.label) * w  # NaN/Inf logits: wrong
      if damage == "kl":
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        loss = jnp.sum(jnp.exp(target) * (target - logp), -1)
      else:
        loss = cross_entropy(logits, batch.label)
      return (jnp.sum(jnp.where(w != 0, loss * w, 0.0)), jnp.sum(correct),
              label_errors(logits, batch.label, batch.weight))

    self._run = jax.jit(run)
    float_logp = jax.jit(lambda v, x: jax.nn.log_softmax(fm.apply(v, x)[0].astype(jnp.float32)))
    self._targets = [float_logp(self.variables, b.image) if damage == "kl" else jnp.zeros(())
                     for b in self.batches]
    self._ones = tuple(jnp.ones(np.shape(tree_get(self.variables["params"], l.weight)),
                                jnp.float32) for l in layers)

  @property
  def compiles(self) -> int:
    return len(self._traces)

  def __call__(self, keeps: Mapping[str, Any], weight_bits: Mapping[str, int],
               act_bits: Mapping[str, int]) -> tuple[float, float]:
    """``(mean loss, accuracy)`` with these layers' keep-masks and bit widths (by path; layers
    not named stay dense and float)."""
    paths = [l.path for l in self.layers]
    keep = tuple(jnp.asarray(keeps[p], jnp.float32) if p in keeps else one
                 for p, one in zip(paths, self._ones))
    wbits = np.asarray([weight_bits.get(p, 0) for p in paths], np.int32)
    abits = np.asarray([act_bits.get(p, 0) for p in paths], np.int32)
    loss = correct = 0.0
    for batch, target in zip(self.batches, self._targets):
      l, c, bad = self._run(self.variables, keep, wbits, abits, batch, target)  # checks labels
      if float(bad):  # their cross-entropy is nan, and no prediction can match them
        raise bad_labels_error("sensitivity: ", batch.label, batch.weight)
      loss, correct = loss + float(l), correct + float(c)
    total = sum(float(np.sum(per_label(b.weight, b.label))) for b in self.batches)
    return loss / total, correct / total
