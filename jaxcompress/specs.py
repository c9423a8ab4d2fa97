"""What to compress, as three small frozen specs checked when they are built.

:class:`PruneSpec` (method, structure, sparsity, schedule, per-layer targets and gap-code caps),
:class:`QuantSpec` (weight and input bits, per-layer bits, quantizer, how scales are stored) and
:class:`DistillSpec` (KD temperature and weight, feature hints). Each validates its fields in
``__post_init__`` with one-line :class:`~jaxcompress.errors.ConfigError` messages named after the
config section (``prune.sparsity``, ``quant.layer_bits``, ...); ``from_dict`` builds one from a
config section. :func:`jaxcompress.compose.build` takes them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import precision, pruning
from jaxcompress.errors import check_positive, check_range, invalid, unknown
from jaxcompress.export.sparse import GAP_WIDTHS
from jaxcompress.pruning import positions
from jaxcompress.pruning.masks import NORMS
from jaxcompress.rules import Rules

PRUNE_METHODS = ("none", "magnitude", "random", "saliency", "movement", "lamp")
PRUNE_STRUCTURES = ("unstructured", "kernel", "nm", "channel")
PRUNE_SCHEDULES = ("gradual", "one_shot", "constant")
QUANT_METHODS = ("minmax", "lsq", "kmeans")


def _regex(field: str, pattern: Any) -> None:
  """Raises :class:`ConfigError` unless ``pattern`` is a string that compiles as a regex."""
  if not isinstance(pattern, str):
    raise invalid(field, pattern, "a regex string")
  try:
    re.compile(pattern)
  except re.error as e:
    raise invalid(field, pattern, f"a valid regex ({e})") from None


def _bits(field: str, bits: Any) -> None:
  """Raises :class:`ConfigError` unless ``bits`` is 0 or ``None`` (float) or an integer in
  [2, 8]."""
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      bits and not 2 <= bits <= 8):
    raise invalid(field, bits, "0 (float) or an integer in [2, 8]")


def _spec_from(cls, values: Mapping[str, Any], section: str):
  """``cls(**values)`` with one-line errors for unknown or mistyped fields."""
  names = {f.name for f in dataclasses.fields(cls)}
  extra = sorted(set(values) - names)
  if extra:
    raise unknown(f"{section} field", extra[0], names)
  return cls(**{k: (tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
                    if isinstance(v, (list, tuple)) else v) for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """What to prune and when. Fractions of training refer to ``total_steps`` of
  :func:`~jaxcompress.compose.build`.

  Attributes:
    method: ``none``, ``magnitude``, ``random``, ``saliency`` (|w g|), ``movement`` (-sum w g),
      ``lamp`` (magnitude with layer-adaptive sparsity under ``scope='global'``).
    structure: ``unstructured``, ``kernel`` (whole kernels: a Conv kernel's window for one
      input and output channel, see :func:`jaxcompress.pruning.kernels`), ``nm`` (N:M along the
      reduction axis), ``channel``.
    sparsity: final fraction of pruned weights in the selected weights (of kernels for
      ``kernel``), in ``[0, 1)``; ``nm`` always prunes ``1 - n/m`` and needs it ``> 0``.
    scope: unstructured and kernel only: ``layer`` (per weight) or ``global`` (across weights).
    schedule: ``gradual`` (Zhu & Gupta cubic), ``one_shot``, ``constant``.
    begin: fraction of training where pruning starts, in ``[0, 1)`` (a ``constant`` schedule,
      which prunes from the first step, ignores it).
    end: fraction of training where the final sparsity is reached (``gradual``).
    update_every: steps between mask refreshes.
    n: N:M: keep ``n`` ...
    m: ... of every ``m`` consecutive weights.
    norm: channel and kernel pruning: ``l1`` or ``l2`` norm of each output channel or kernel.
    rules: ``((regex, True/False), ...)`` over the student's parameter paths; empty: the policy
      of :mod:`jaxcompress.selection`.
    seed: seed of random scores.
    layer_sparsity: ``((regex, sparsity), ...)`` over the student's parameter paths: per-weight
      final sparsities (first full match wins) for ``layer``-scope unstructured, kernel or
      channel pruning; each weight follows the schedule scaled by ``its sparsity / sparsity``, and a
      selected weight no regex matches reaches ``sparsity``. Per-layer plans (e.g. from
      :mod:`jaxcompress.budget`) reach the train step this way.
    layer_gap_codes: ``((regex, w, codes), ...)`` over the same paths, unstructured only: once
      the schedule reaches ``sparsity``, a matching weight also prunes its lowest-scored kept
      entries until its positions take at most ``codes`` ``w``-bit gap codes in the export
      (:mod:`jaxcompress.pruning.positions`). A budget plan caps each weight at the codes of the
      pattern it was sized on, so a mask that follows training still exports within the plan.
  """
  method: str = "magnitude"
  structure: str = "unstructured"
  sparsity: float = 0.0
  scope: str = "layer"
  schedule: str = "gradual"
  begin: float = 0.0
  end: float = 0.5
  update_every: int = 25
  n: int = 2
  m: int = 4
  norm: str = "l1"
  rules: tuple = ()
  seed: int = 0
  layer_sparsity: tuple = ()
  layer_gap_codes: tuple = ()

  def __post_init__(self):
    if self.method not in PRUNE_METHODS:
      raise unknown("prune.method", self.method, PRUNE_METHODS)
    if self.structure not in PRUNE_STRUCTURES:
      raise unknown("prune.structure", self.structure, PRUNE_STRUCTURES)
    if self.schedule not in PRUNE_SCHEDULES:
      raise unknown("prune.schedule", self.schedule, PRUNE_SCHEDULES)
    if self.scope not in ("layer", "global"):
      raise unknown("prune.scope", self.scope, ("layer", "global"))
    check_range("prune.sparsity", self.sparsity, 0.0, 1.0)
    check_range("prune.begin", self.begin, 0.0, 1.0, hi_closed=True)
    if self.schedule != "constant" and self.begin == 1:  # its first pruning step is past the run
      raise invalid("prune.begin", self.begin, f"< 1 with prune.schedule={self.schedule}",
                    "pruning that begins at the end of the run prunes nothing in it")
    # Only a gradual schedule ends: a one-shot or constant one does not read prune.end.
    check_range("prune.end", self.end, self.begin if self.schedule == "gradual" else 0.0, 1.0,
                hi_closed=True)
    # n, m and norm are checked whatever the structure: a config section holds them all, and a
    # bad value beside another structure is a mistake, not a setting to ignore
    for name in ("n", "m"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise invalid(f"prune.{name}", value, "an integer", "N:M keeps n of every m weights")
    if self.m < 2:
      raise invalid("prune.m", self.m, "an integer >= 2", "N:M keeps n of every m weights")
    if not 0 < self.n < self.m:
      raise invalid("prune.n", self.n, f"in [1, prune.m={self.m})")
    if self.structure == "nm" and self.method != "none" and not self.sparsity > 0:
      raise invalid("prune.sparsity", self.sparsity, "> 0 with prune.structure=nm (0 prunes "
                    "nothing)", f"N:M prunes 1 - n/m = {1 - self.n / self.m:g} of the weights; "
                    "give that")
    if (isinstance(self.update_every, bool) or not isinstance(self.update_every, (int, np.integer))
        or self.update_every < 1):
      raise invalid("prune.update_every", self.update_every, "an integer >= 1")
    if self.norm not in NORMS:
      raise unknown("prune.norm", self.norm, NORMS)
    if self.structure == "channel" and self.scope != "layer":
      raise invalid("prune.scope", self.scope, "layer with prune.structure=channel (each weight "
                    "loses its own fraction of channels)")
    if self.method == "movement" and self.norm == "l2" and self.structure in ("channel", "kernel"):
      raise invalid("prune.norm", self.norm, "l1 with prune.method=movement (its scores are "
                    "signed: an L2 norm would rank a strongly negative channel as important)")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise invalid("prune.seed", self.seed, "an integer")
    for i, rule in enumerate(self.rules):
      if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[1], bool):
        raise invalid(f"prune.rules[{i}]", rule, "a (regex, True/False) pair",
                      "rules is a sequence of pairs, e.g. (('head/.*', False), ('.*', True))")
      _regex(f"prune.rules[{i}] regex", rule[0])
    for i, rule in enumerate(self.layer_sparsity):
      if not isinstance(rule, (tuple, list)) or len(rule) != 2:
        raise invalid(f"prune.layer_sparsity[{i}]", rule, "a (regex, sparsity) pair")
      _regex(f"prune.layer_sparsity[{i}] regex", rule[0])
      check_range(f"prune.layer_sparsity[{i}] sparsity", rule[1], 0.0, 1.0)
    if self.layer_sparsity and (self.structure == "nm" or self.scope == "global"
                                or not self.sparsity > 0):
      raise invalid("prune.layer_sparsity", self.layer_sparsity, "empty unless prune.structure "
                    "is unstructured or kernel (scope layer) or channel and prune.sparsity > 0",
                    "set prune.sparsity to the largest per-layer sparsity")
    for i, rule in enumerate(self.layer_gap_codes):
      field = f"prune.layer_gap_codes[{i}]"
      if len(rule) != 3 or not isinstance(rule[0], str):
        raise invalid(field, rule, "a (regex, code bits, codes) triple")
      if rule[1] not in GAP_WIDTHS:
        raise invalid(f"{field} code bits", rule[1], f"one of {list(GAP_WIDTHS)}")
      if not isinstance(rule[2], int) or rule[2] < 0:
        raise invalid(f"{field} codes", rule[2], "an integer >= 0")
    if self.layer_gap_codes and self.structure != "unstructured":
      raise invalid("prune.layer_gap_codes", self.layer_gap_codes,
                    "empty unless prune.structure is unstructured")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "PruneSpec":
    return _spec_from(cls, values, "prune")

  @property
  def enabled(self) -> bool:
    return self.method != "none" and self.sparsity > 0

  def masker(self, axes: Mapping[str, tuple[int, ...]] | None = None,
             out_axes: Mapping[str, int] | None = None,
             stacked: Mapping[str, int] | None = None,
             windows: Mapping[str, tuple[int, ...]] | None = None) -> pruning.Masker:
    """N:M, whole channels, or unstructured or whole kernels at the spec's scope (per-layer
    targets applied).

    With ``layer_sparsity``, the masker reads the train state's paths (``model/<param path>``,
    as :func:`~jaxcompress.compose.build`'s pruning rules do). N:M groups run along
    ``axes[path]``, each weight's reduction axes (``ModelLayers.reduce_axes``), channels along
    ``out_axes[path]`` (``ModelLayers.output_axes``) and kernels over ``windows[path]``
    (``ModelLayers.window_axes``), where given. A weight with ``stacked[path]`` leading axes
    (``ModelLayers.stacked``: ``nn.scan`` over ``params``) is masked step by step
    (:func:`~jaxcompress.pruning.per_step`).
    """
    stacked = {p: k for p, k in (stacked or {}).items() if k}
    if stacked:  # the axes of one step's weight
      axes = axes and {p: tuple(a - stacked.get(p, 0) for a in ax) for p, ax in axes.items()}
      out_axes = out_axes and {p: a - stacked.get(p, 0) for p, a in out_axes.items()}
      windows = windows and {p: tuple(a - stacked.get(p, 0) for a in ax)
                             for p, ax in windows.items()}
    if self.structure == "nm":
      base = pruning.n_of_m(self.n, self.m, axes=axes)
      return pruning.per_step(base, stacked) if stacked else base
    base = (pruning.channels(self.norm, out_axes) if self.structure == "channel"
            else pruning.kernels(self.scope, self.norm, windows) if self.structure == "kernel"
            else pruning.unstructured(self.scope))
    if self.layer_sparsity:
      base = _per_layer(base, [(f"model/(?:{r})", float(t)) for r, t in self.layer_sparsity],
                        self.sparsity)
    if stacked:
      base = pruning.per_step(base, stacked)
    if self.layer_gap_codes:
      base = _capped(base, [(f"model/(?:{r})", (w, c)) for r, w, c in self.layer_gap_codes],
                     self.sparsity)
    return base

  def steps(self, total_steps: int) -> tuple[int, int, int]:
    """``(update_every, begin_step, end_step)`` for a run of ``total_steps``.

    Masks are refreshed only on multiples of ``update_every``; it shrinks for short ramps (at
    least about four refreshes from begin to end) and ``end_step`` is rounded down to a refresh
    step inside the run, so the final sparsity is always reached.
    """
    begin = int(self.begin * total_steps)
    end = min(max(int(self.end * total_steps), begin + 1), max(total_steps - 1, begin + 1))
    every = max(1, min(self.update_every, (end - begin) // 4))
    begin, end = begin // every * every, end // every * every
    return every, begin, max(end, begin + every)


def _per_layer(base: pruning.Masker, targets: list, final: float) -> pruning.Masker:
  """A per-leaf masker: leaf ``p`` gets ``sparsity * target(p) / final`` (its target at the end).

  At or past ``final`` a leaf gets exactly its target (no float32 rounding of the ratio).
  """
  rules = Rules(targets, field="prune.layer_sparsity")

  def masker(paths, scores, sparsity):
    out = []
    for path, score in zip(paths, scores):
      target = rules.lookup(path)
      target = final if target is None else target
      if isinstance(sparsity, (int, float)):
        leaf = target if sparsity >= final else sparsity * target / final
      else:
        leaf = jnp.where(sparsity >= final, target, sparsity * (target / final))
      out += base([path], [score], leaf)
    return out

  return masker


def _capped(base: pruning.Masker, caps: list, final: float) -> pruning.Masker:
  """``base``, then, from ``final`` sparsity on, each capped leaf pruned to its gap-code cap."""
  rules = Rules(caps, field="prune.layer_gap_codes")

  def masker(paths, scores, sparsity):
    out = []
    for path, score, keep in zip(paths, scores, base(paths, scores, sparsity)):
      cap = rules.lookup(path)
      if cap is not None:
        capped = lambda k, s=score, c=cap: positions.cap_codes(k, s, *c)  # noqa: E731
        keep = jax.lax.cond(jnp.asarray(sparsity) >= final, capped, lambda k: k, keep)
      out.append(keep)
    return out

  return masker


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Fake quantization of weights and layer inputs (0 bits: that part stays float).

  Attributes:
    weight_bits: bits of the selected weights (the layers between the first and the last).
    act_bits: bits of each of those layers' input.
    first_last_bits: bits of the first and last layer in forward order, weights and input,
      whatever ``weight_bits`` and ``act_bits`` say once either is set (0: leave them float):
      ``weight_bits=0, act_bits=8`` keeps the inner kernels float, not the first and last.
    per_channel: one weight scale per output channel.
    method: ``minmax`` (ranges from data), ``lsq`` (learned step sizes) or ``kmeans`` (weight
      sharing; inputs stay ``minmax``).
    layer_bits: ``((regex, weight_bits, act_bits), ...)`` over the student's layer (module)
      paths, ahead of every other setting (first full match wins; 0 bits: float): per-layer
      bit widths, e.g. from :mod:`jaxcompress.budget`; not with ``kmeans``.
    scale_dtype: ``float32`` or ``float16``: how the export stores the per-output-channel scales
      of integer weights (those whose channels are the last axis) and the folded BatchNorms'
      gains and biases. ``float16`` halves their bytes; the values are rounded to float16 and
      the fake-quant model is evaluated with them (:mod:`jaxcompress.precision`), so it still
      agrees with the artifact exactly. Training is unchanged.
  """
  weight_bits: int = 0
  act_bits: int = 0
  first_last_bits: int = 8
  per_channel: bool = True
  method: str = "minmax"
  layer_bits: tuple = ()
  scale_dtype: str = "float32"

  def __post_init__(self):
    if self.method not in QUANT_METHODS:
      raise unknown("quant.method", self.method, QUANT_METHODS)
    if self.scale_dtype not in precision.SCALE_DTYPES:
      raise unknown("quant.scale_dtype", self.scale_dtype, precision.SCALE_DTYPES)
    for field in ("weight_bits", "act_bits", "first_last_bits"):
      _bits(f"quant.{field}", getattr(self, field))
    if not isinstance(self.per_channel, (bool, np.bool_)):
      raise invalid("quant.per_channel", self.per_channel, "True or False")
    for i, rule in enumerate(self.layer_bits):
      if not isinstance(rule, (tuple, list)) or len(rule) != 3:
        raise invalid(f"quant.layer_bits[{i}]", rule,
                      "a (regex, weight_bits, act_bits) triple, bits 0 (float) or in [2, 8]")
      _regex(f"quant.layer_bits[{i}] regex", rule[0])
      _bits(f"quant.layer_bits[{i}] weight_bits", rule[1])
      _bits(f"quant.layer_bits[{i}] act_bits", rule[2])
    if self.layer_bits and self.method == "kmeans":
      raise invalid("quant.layer_bits", self.layer_bits, "empty with quant.method=kmeans")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "QuantSpec":
    return _spec_from(cls, values, "quant")

  @property
  def enabled(self) -> bool:
    return bool(self.weight_bits or self.act_bits or self.layer_bits)


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Distillation: ``loss = (1 - alpha) CE + alpha T^2 KL + feature_weight * hints``.

  Attributes:
    temperature: Hinton KD temperature ``T`` (> 0).
    alpha: weight of the KD term (0: no logits KD).
    feature_weight: weight of the hint (feature MSE) terms.
    feature_pairs: ``((student module path, teacher module path), ...)``.
  """
  temperature: float = 4.0
  alpha: float = 0.0
  feature_weight: float = 0.0
  feature_pairs: tuple = ()

  def __post_init__(self):
    check_positive("distill.temperature", self.temperature)
    check_range("distill.alpha", self.alpha, 0.0, 1.0, hi_closed=True)
    check_positive("distill.feature_weight", self.feature_weight, zero=True)
    for pair in self.feature_pairs:
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not all(isinstance(p, str) for p in pair)):
        raise invalid("distill.feature_pairs", pair, "(student path, teacher path) pairs")
    if self.feature_weight and not self.feature_pairs:
      raise invalid("distill.feature_pairs", self.feature_pairs, "at least one (student path, "
                    "teacher path) pair with distill.feature_weight > 0",
                    "add pairs or set distill.feature_weight=0")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "DistillSpec":
    return _spec_from(cls, values, "distill")

  @property
  def uses_teacher(self) -> bool:
    return self.alpha > 0 or self.feature_weight > 0
