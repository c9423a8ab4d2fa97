"""Damage in context: each layer's options measured around a whole reference plan.

The scan (:mod:`.sensitivity`) measures a layer with every other layer float, and the allocator
adds those damages. At high compression that sum misjudges the plan: every layer is compressed at
once, errors compound through depth, and a layer that costs little alone may cost much among
compressed neighbours. :func:`context_damage` measures instead around a reference plan (say the
uniform recipe at the same budget, or a previous plan): the damage of giving layer ``i`` option
``o`` is the increase of the held-out loss of the *whole reference plan* with layer ``i``
switched to ``o``, the first-order expansion of the joint damage around the reference. The
reference's own setting of each layer is one of its options, at damage 0, so an allocation over
these damages is never predicted worse than the reference, and repeating it around the new plan
walks downhill in the measured joint damage.

Like the scan, sparsity, weight bits and input bits are measured apart (layer ``i`` pruned to
``s`` at the reference's bits; layer ``i`` at ``b`` bits with the reference's mask; likewise its
input bits) and added, every
evaluation through one compiled :class:`~jaxcompress.budget.sensitivity.Evaluator`.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxcompress.budget.presets import Option


class Reference(NamedTuple):
  """A whole plan as the evaluator takes it: keep-masks (pruned layers only), weight and input
  bits, and each layer's setting as an :class:`Option` (its exact sparsity)."""
  keeps: Mapping[str, np.ndarray]
  weight_bits: Mapping[str, int]
  act_bits: Mapping[str, int]
  options: Mapping[str, Option]


def reference_of(keeps: Mapping[str, np.ndarray], weight_bits: Mapping[str, int],
                 act_bits: Mapping[str, int]) -> Reference:
  """A :class:`Reference` whose per-layer options carry the masks' exact sparsities."""
  options = {p: Option(1.0 - float(np.mean(keeps[p])) if p in keeps else 0.0, int(b),
                       int(act_bits.get(p, 0))) for p, b in weight_bits.items()}
  return Reference(dict(keeps), dict(weight_bits), dict(act_bits), options)


def context_damage(evaluate: Callable, reference: Reference,
                   options: Mapping[str, Sequence[Option]],
                   keep: Callable[[str, float], np.ndarray], *, measured: dict | None = None,
                   progress: Callable[[dict], None] | None = None
                   ) -> tuple[float, dict[str, list[Option]], dict[str, np.ndarray], dict]:
  """Every option's damage around ``reference``.

  Args:
    evaluate: ``(keeps, weight_bits, act_bits) -> (loss, accuracy)``, e.g. an ``Evaluator``.
    reference: the plan to measure around (every layer of ``options`` has a setting in it).
    options: ``{path: options}`` to measure.
    keep: ``(path, sparsity) -> keep-mask`` (as the plan would prune).
    measured: an earlier, interrupted call's ``measured`` (same reference): not evaluated again.
    progress: called with the measurements so far after each evaluation.

  Returns:
    ``(reference loss, {path: options + the reference's own}, {path: damages}, measured)``:
    options and damages aligned; the reference's option (appended unless already listed) has
    damage 0.
  """
  measured = dict(measured or {})

  def loss(key, keeps, wbits, abits=reference.act_bits):
    if key not in measured:
      measured[key] = evaluate(keeps, wbits, abits)[0]
      if progress is not None:
        progress(measured)
    return measured[key]

  base = loss(("reference",), reference.keeps, reference.weight_bits)
  out_options, out_damage = {}, {}
  for path, opts in options.items():
    ref = reference.options[path]
    row_options = list(opts) + ([ref] if ref not in opts else [])
    row = []
    for o in row_options:
      d = 0.0
      if o.sparsity != ref.sparsity:
        keeps = {**reference.keeps, path: keep(path, o.sparsity)}
        if o.sparsity == 0:
          keeps.pop(path)
        d += loss((path, "sparsity", o.sparsity), keeps, reference.weight_bits) - base
      if o.weight_bits != ref.weight_bits:
        d += loss((path, "bits", o.weight_bits), reference.keeps,
                  {**reference.weight_bits, path: o.weight_bits}) - base
      if o.act_bits != ref.act_bits:
        d += loss((path, "act", o.act_bits), reference.keeps, reference.weight_bits,
                  {**reference.act_bits, path: o.act_bits}) - base
      row.append(d)
    out_options[path], out_damage[path] = row_options, np.asarray(row, np.float64)
  return base, out_options, out_damage, measured
