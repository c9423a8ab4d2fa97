"""A per-layer plan for a budget, in one call: trace, scan, cost, allocate.

:func:`find_plan` is the library's planner for any Flax model: it finds the model's layers by
tracing, offers each the options its device preset allows, measures every option on held-out
training batches (:func:`~jaxcompress.budget.sensitivity.scan`, one compilation), costs each in
artifact bytes (the export's own size code, fixed-width codes: what the export writes at most for
those weights) and BOPs, and allocates exactly (:func:`~jaxcompress.budget.allocate.allocate`).
The budget job (``experiments.autocompress``) adds its own candidates on top (global thresholds,
Huffman-coded sizing, the uniform recipe beside the plan).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from jaxcompress.budget.allocate import Allocation
from jaxcompress.budget.cost import layer_costs, layer_macs
from jaxcompress.budget.plan import Plan, allocate_plan
from jaxcompress.budget.presets import get_preset
from jaxcompress.budget.sensitivity import Sensitivity, check_held_out_batches, scan
from jaxcompress.errors import (ConfigError, check_positive, check_range, check_variables,
                               invalid)
from jaxcompress.quantization.qparams import check_bits
from jaxcompress.rules import tree_get
from jaxcompress.selection import require_layers, trace_layers


class Found(NamedTuple):
  """What :func:`find_plan` found: the plan, its allocation (optimality gap in ``gap``) and the
  scan it was allocated from."""
  plan: Plan
  allocation: Allocation
  sensitivity: Sensitivity


def find_plan(model: Any, variables: Mapping[str, Any], held_out: Sequence[Any], *,
              size_bytes: int | None = None, bops: float | None = None, device: str = "any",
              calibration: Sequence[Any] = (),
              sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9),
              weight_bits: Sequence[int] = (2, 3, 4, 8), act_bits: Sequence[int] = (4, 8),
              overhead: int = 0, per_channel: bool = True, damage: str = "ce",
              adapt_norms: bool = False, sensitivity: Sensitivity | None = None) -> Found:
  """The least-damage per-layer plan of ``model`` within a size or compute budget.

  Args:
    model: a Flax Linen or NNX module.
    variables: its trained variables.
    held_out: held-out training examples as :class:`jaxcompress.data.Batch` es (never the split
      accuracy is reported on); the first one's inputs trace the model.
    size_bytes: the budget in artifact bytes: the planned weights' codes plus ``overhead``.
    bops: the budget in bit-operations per example (MACs x weight bits x input bits).
    device: a preset of :data:`~jaxcompress.budget.presets.PRESETS` (``any``, ``mcu``,
      ``gpu-sparse``, ``int8-npu``): the options each layer may take.
    calibration: input batches that calibrate the input ranges (default: the first held-out
      batch's inputs).
    sparsities: the sparsity grid (0 is always offered; a preset may fix its own).
    weight_bits: the weight bit grid (a preset may fix its own).
    act_bits: the input bit grid, used under a BOPs budget where the preset leaves inputs open
      (8 bits otherwise).
    overhead: the artifact's bytes besides the planned weights' codes (biases, scales, folded
      norms, the spec; :func:`~jaxcompress.budget.cost.overhead_bytes` of a reference export);
      counted against ``size_bytes``.
    per_channel: one weight scale per output channel (a preset may require it).
    damage: ``ce`` or ``kl`` (:func:`~jaxcompress.budget.sensitivity.scan`).
    adapt_norms: evaluate with each batch's normalisation statistics.
    sensitivity: the scan of an earlier call with the same model, batches and options
      (``found.sensitivity``), to plan another budget without measuring again.

  Returns:
    :class:`Found`: ``plan`` (``plan.prune_fields()`` and ``plan.quant_fields()`` are the
    ``compose.PruneSpec`` and ``QuantSpec`` fields), ``allocation`` and ``sensitivity``.

  Raises:
    ConfigError: for not exactly one budget, a budget kind the device does not take, an unknown
      device, ``variables`` without ``params`` (the params alone), empty ``held_out``, a model
      with no layer to compress, a budget below the model's smallest plan (naming it), or a
      ``sensitivity`` of other options.
  """
  given = {k: v for k, v in (("size_bytes", size_bytes), ("bops", bops)) if v is not None}
  if len(given) != 1:
    raise ConfigError(f"budget: give exactly one of size_bytes and bops, got {given or 'none'}")
  (field, limit), = given.items()
  kind = "size" if field == "size_bytes" else "bops"
  check_positive(field, limit)
  preset = get_preset(device, "device")
  if preset.per_channel and not per_channel:
    raise invalid("per_channel", per_channel, f"True for device={device!r}, which quantizes "
                  "weights per output channel")
  if kind not in preset.budgets:
    takes = " or ".join({"size": "size_bytes=", "bops": "bops="}[k] for k in preset.budgets)
    raise ConfigError(f"{field}: device={device!r} takes a {' or '.join(preset.budgets)} "
                      f"budget, not {field}={limit!r}; give {takes}")
  check_variables(variables)
  if not isinstance(held_out, Sequence):  # a generator would be spent by the first check
    raise invalid("held_out", f"a {type(held_out).__name__}", "a list of held-out batches",
                  "pass list(...)")
  if not held_out:
    raise ConfigError("held_out: no batch; give held-out training batches to measure on")
  if isinstance(overhead, bool) or not isinstance(overhead, numbers.Integral) or overhead < 0:
    raise invalid("overhead", overhead, "an integer >= 0 (bytes)")
  overhead = int(overhead)
  for name, grid in (("sparsities", sparsities), ("weight_bits", weight_bits),
                     ("act_bits", act_bits)):
    if np.ndim(grid) != 1:  # one number where a grid was meant
      raise invalid(name, grid, "a list of " + ("sparsities in [0, 1)" if name == "sparsities"
                                                else "bit widths in [2, 8]"), f"pass ({grid!r},)")
  for i, s in enumerate(sparsities):
    check_range(f"sparsities[{i}]", s, 0.0, 1.0)
  for name, grid in (("weight_bits", weight_bits), ("act_bits", act_bits)):
    if not len(grid) and (name == "weight_bits" or kind == "bops"):
      raise invalid(name, tuple(grid), "a non-empty list of bit widths in [2, 8]")
    for i, b in enumerate(grid):
      check_bits(b, f"{name}[{i}]")
  check_held_out_batches(held_out)
  if isinstance(calibration, (np.ndarray, jax.Array)):  # `calibration or ...` cannot take one
    raise invalid("calibration", f"one array of shape {tuple(calibration.shape)}",
                  "a sequence of input batches", "pass [x]")
  sample = held_out[0].image
  traced = trace_layers(model, variables, sample, field="model")
  require_layers(traced, "model")  # an empty plan would meet any budget, compressing nothing
  traced.warn_uncovered("find_plan", ", and the plan's BOPs leave out their products")
  weights = {l.path: np.asarray(tree_get(variables["params"], l.weight))
             for l in traced.layers}
  by_path = {l.path: l for l in traced.layers}
  options = {l.path: preset.layer_options(l, last=l.path == traced.last, sparsities=sparsities,
                                          weight_bits=weight_bits, act_bits=act_bits, kind=kind)
             for l in traced.layers}
  if sensitivity is not None and not isinstance(sensitivity, Sensitivity):
    raise invalid("sensitivity", f"a {type(sensitivity).__name__}", "the Sensitivity of an "
                  "earlier call (found.sensitivity), or None to scan")
  sens = sensitivity or scan(model, variables, held_out, options,
                             calibration=calibration or [sample], structure=preset.structure,
                             per_channel=per_channel, damage=damage,
                             adapt_norms=adapt_norms)
  if {p: list(o) for p, o in zip(sens.paths, sens.options)} != options:
    raise ConfigError(f"sensitivity: scanned other layers or options than device={device!r} "
                      "and these grids offer; give the scan of the same model and grids")
  macs = layer_macs(model, variables, sample)
  costs = [layer_costs(weights[p], by_path[p], opts, macs.get(p, 0), preset.structure)
           for p, opts in zip(sens.paths, sens.options)]  # per layer and option: (bytes, BOPs)
  found = allocate_plan([(p, by_path[p].weight) for p in sens.paths], sens.options, costs,
                        sens.damage, limit, kind=kind, structure=preset.structure,
                        overhead=overhead)
  if found is None:
    pick, fixed = (0, overhead) if kind == "size" else (1, 0)
    smallest = fixed + sum(min(c[pick] for c in cs) for cs in costs)
    unit = "bytes" if kind == "size" else "BOPs per example"
    raise invalid(field, limit, f"reachable under device={device!r}: the smallest plan takes "
                  f"{smallest:,} {unit}" + (f" ({overhead:,} of them overhead)" if fixed else ""))
  alloc, plan = found
  return Found(plan, alloc, sens)
