"""The uniform recipe at a budget: one sparsity and one weight bit width for every layer.

The budget job fine-tunes it beside the plan (``uniform.enabled``), so the two stand side by
side at the same budget. Under a size or BOPs budget (:func:`uniform_recipe`): one global
magnitude sparsity (size) or one per-layer sparsity (BOPs), first and last layer dense at 8 bits;
on a device with structured pruning (:func:`device_uniform_recipe`): one fraction of output
channels (``int8-npu``) or 2:4 everywhere (``gpu-sparse``). For each bit width the least pruning
that meets the budget, and of those the least damage the scan predicts.
"""

from __future__ import annotations

import numpy as np

from jaxcompress import budget as budget_lib


def uniform_recipe(layers, edges, weights, macs, sens, kind: str, limit: float, overhead: int, *,
                   bits, act_bits: int) -> dict | None:
  """The uniform recipe under a size or BOPs budget, or ``None`` where none reaches it.

  ``edges``: the first and last layer's paths (dense, 8 bits, as the main job keeps them);
  ``bits``: the weight bit widths to try; ``act_bits``: the inner layers' input bits.
  """
  by_path = {l.path: l for l in layers}
  inner = sorted((l.path for l in layers if l.path not in edges),
                 key=lambda p: tuple(by_path[p].weight.split("/")))
  if kind == "size":
    found = budget_lib.uniform_size(weights, inner, overhead=int(overhead), budget=int(limit),
                                    bits=bits, predict=sens.predict, layers=by_path)
    if found is None:
      return None
    s, b, keep, size = found
    prune = {"method": "magnitude", "structure": "unstructured", "scope": "global",
             "schedule": "one_shot", "begin": 0.0, "sparsity": s, "rules": (),
             "layer_sparsity": ()}
  else:
    best = None
    for b in bits:
      for s in np.round(np.arange(0, 0.99, 0.01), 2):
        keep = {p: budget_lib.keep_mask(weights[p], float(s), "unstructured", by_path[p])
                for p in inner}
        if not all(np.any(k) for k in keep.values()):  # a layer pruned whole cuts the network
          break
        bops = uniform_bops(layers, macs, keep, b, act_bits)
        if bops <= limit:
          damage = sum(sens.predict(p, float(s), b) for p in inner)
          if best is None or damage < best[0]:
            best = (damage, float(s), b, keep)
          break
    if best is None:
      return None
    _, s, b, keep = best
    size = None
    prune = {"method": "magnitude" if s else "none", "structure": "unstructured",
             "scope": "layer", "schedule": "one_shot", "begin": 0.0, "sparsity": s,
             "rules": (), "layer_sparsity": ()}
  quant = {"weight_bits": int(b), "act_bits": act_bits, "first_last_bits": 8, "layer_bits": ()}
  paths = [l.path for l in layers]
  masks_and_bits = ({p: k for p, k in keep.items() if s},
                    {p: int(b) if p in keep else 8 for p in paths}, {p: act_bits for p in paths})
  return {"fields": (prune, quant), "sparsity": s, "weight_bits": int(b), "size_bytes": size,
          "masks_and_bits": masks_and_bits, "bops": uniform_bops(layers, macs, keep, b, act_bits),
          "recipe": f"sparsity {s:.3f} ({'global magnitude' if kind == 'size' else 'per layer'}),"
                    f" {int(b)}-bit weights; first and last layer dense at 8 bits"}


def device_uniform_recipe(layers, plannable, cost, pick, limit, fixed, sens, structure,
                    whole) -> dict | None:
  """The uniform recipe of a device whose pruning is structured, or ``None``.

  ``cost(path, option)`` gives ``(bytes, BOPs)``, ``pick`` which of them the budget counts and
  ``fixed`` what the artifact costs besides the weights (0 under a BOPs budget).

  One setting for every layer, within the device's space: ``channel`` (``int8-npu``) one
  fraction of output channels in 1 % steps, ``nm`` (``gpu-sparse``) 2:4 or dense, with one weight
  bit width; a layer the device keeps dense (the last layer's outputs, a reduction axis without
  groups of 4) stays dense at that width. For each bit width the least pruning that meets the
  budget (costed as the plans are), and of those the least predicted damage.
  """
  paths = [l.path for l in layers]
  prunable = {p for p in paths if any(o.sparsity > 0 for o in plannable[p])}
  act = {p: plannable[p][0].act_bits for p in paths}
  grid = np.round(np.arange(0.0, 1.0, 0.01), 2) if structure == "channel" else (0.0, 0.5)
  best = None
  for b in sorted({o.weight_bits for opts in plannable.values() for o in opts}):
    for s in grid:
      opts = {p: budget_lib.Option(float(s) if p in prunable else 0.0, b, act[p]) for p in paths}
      costs = {p: cost(p, o) for p, o in opts.items()}
      if fixed + sum(c[pick] for c in costs.values()) <= limit:
        damage = sum(sens.predict(p, o.sparsity, o.weight_bits) for p, o in opts.items())
        if best is None or damage < best[0]:
          best = (damage, float(s), int(b), opts, costs)
        break
  if best is None:
    return None
  _, s, b, opts, costs = best
  plan = budget_lib.Plan(tuple(
      budget_lib.LayerPlan(l.path, l.weight, o.sparsity, o.weight_bits, o.act_bits,
                           *costs[l.path]) for l in layers for o in [opts[l.path]]), structure,
      fixed)
  what = (f"{s:.0%} of the output channels of every layer but the last" if structure == "channel"
          else "2:4 along the reduction axis in every layer that has groups of 4"
          if s else "dense")
  return {"fields": (plan.prune_fields(), plan.quant_fields()), "sparsity": s, "weight_bits": b,
          "size_bytes": plan.size_bytes if pick == 0 else None, "masks_and_bits": whole(plan),
          "bops": plan.bops, "recipe": f"{what}, {b}-bit weights"}


def uniform_bops(layers, macs, keep, bits, act) -> int:
  """BOPs of one bit width and input width on the kept weights; layers not in ``keep`` at 8."""
  total = 0
  for l in layers:
    k = keep.get(l.path)
    dens = 1.0 if k is None else float(np.mean(k))
    wb = bits if k is not None else 8
    ab = 0 if l.kind == "embed" else act if k is not None else 8  # an Embed's inputs stay float
    total += budget_lib.option_bops(macs.get(l.path, 0), budget_lib.Option(0.0, wb, ab), dens)
  return total
