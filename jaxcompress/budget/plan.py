"""A per-layer plan, the uniform plan it is compared with, and their compose specs.

:class:`Plan` is what the allocator chose for every layer (sparsity, weight bits, input bits, and
what that costs; :func:`allocate_plan` makes it from each layer's options, costs and damages);
:meth:`Plan.prune_fields` and :meth:`Plan.quant_fields` turn it into the fields
of :class:`jaxcompress.compose.PruneSpec` and :class:`~jaxcompress.compose.QuantSpec`, so the
plan trains in the ordinary composed step. Those fields prune one-shot at the first step from the
weights the plan was sized on; :func:`scheduled` puts them on another schedule (gradual), with
each weight capped at the gap codes of its sized pattern, so the artifact still meets the budget.

:func:`threshold_plans` makes the plans of one global threshold (on magnitude, LAMP scores or whole
kernels' L2 norms), each layer's bits allocated exactly; :func:`global_bits` keeps the one with the
least predicted damage.

:func:`uniform_size` finds the uniform recipe at the same budget: one sparsity by global
magnitude over the inner layers and one weight bit width (first and last layer dense at 8 bits),
the least sparsity each bit width needs, and of those the bit width with the least predicted damage.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcompress import pruning
from jaxcompress.pruning.masks import across, num_pruned, ranks
from jaxcompress.budget.allocate import Allocation, allocate
from jaxcompress.budget.cost import (KERNEL_NORM, gap_cap, has_kernels, keep_mask, kernel_keep,
                                     kernel_size, shared_kernel_bytes, weight_bytes)
from jaxcompress.budget.presets import Option
from jaxcompress.errors import ConfigError


class LayerPlan(NamedTuple):
  """One layer's choice and its cost: bytes of its weight in the artifact, BOPs per example."""
  path: str
  weight: str
  sparsity: float
  weight_bits: int
  act_bits: int
  bytes: int
  bops: int
  damage: float = 0.0


class Plan(NamedTuple):
  """Every layer's choice.

  Invariants: ``size_bytes = overhead + sum(layer bytes)`` bounds the artifact's bytes on disk;
  ``bops`` is the sum of the layers' BOPs per example. ``shared``: the weights whose kernels share
  one threshold in training (``kernel`` structure), ``shared_sparsity`` the fraction of their
  kernels it prunes.
  """
  layers: tuple[LayerPlan, ...]
  structure: str
  overhead: int
  shared: tuple[str, ...] = ()
  shared_sparsity: float = 0.0

  @property
  def size_bytes(self) -> int:
    return int(self.overhead + sum(l.bytes for l in self.layers))

  @property
  def bops(self) -> int:
    return int(sum(l.bops for l in self.layers))

  @property
  def damage(self) -> float:
    return float(sum(l.damage for l in self.layers))

  def prune_fields(self) -> dict:
    """PruneSpec fields: the plan's per-layer sparsities, pruned one-shot at step 0."""
    pruned = [l for l in self.layers if l.sparsity > 0]
    if not pruned:
      return {"method": "none", "sparsity": 0.0, "rules": (), "layer_sparsity": ()}
    rules = only_rules(l.weight for l in pruned)
    fields = {"method": "magnitude", "structure": self.structure, "scope": "layer",
              "schedule": "one_shot", "begin": 0.0, "rules": rules,
              "sparsity": max(l.sparsity for l in pruned)}
    if self.structure == "nm":
      return {**fields, "n": 2, "m": 4, "layer_sparsity": ()}
    if self.shared:
      return {**fields, "norm": KERNEL_NORM, "scope": "global", "rules": only_rules(self.shared),
              "sparsity": self.shared_sparsity, "layer_sparsity": ()}
    return {**fields, "layer_sparsity": tuple((re.escape(l.weight), l.sparsity) for l in pruned)}

  def quant_fields(self) -> dict:
    """QuantSpec fields: the plan's per-layer weight and input bits."""
    return {"layer_bits": tuple((re.escape(l.path), l.weight_bits, l.act_bits)
                                for l in self.layers)}

  def to_list(self) -> list[dict]:
    """``[{path, sparsity, weight_bits, act_bits, bytes, bops, damage}]`` (JSON-able)."""
    return [{"path": l.path, "sparsity": l.sparsity, "weight_bits": l.weight_bits,
             "act_bits": l.act_bits, "bytes": l.bytes, "bops": l.bops,
             "damage": round(l.damage, 6)} for l in self.layers]


def only_rules(weights) -> tuple:
  """PruneSpec rules selecting exactly these weight paths."""
  return tuple((re.escape(w), True) for w in weights) + ((".*", False),)


def allocate_plan(layers: Sequence[tuple[str, str]], options: Sequence[Sequence[Option]],
                  costs: Sequence[Sequence[tuple[int, int]]], damage: Sequence[Sequence[float]],
                  budget: float, *, kind: str, structure: str,
                  overhead: int = 0) -> tuple[Allocation, Plan] | None:
  """The least-damage plan within ``budget``, allocated exactly, or ``None`` when none fits.

  Args:
    layers: per layer, ``(path, weight path)``.
    options: per layer, the options it may take.
    costs: per layer and option, ``(bytes, BOPs)`` (:func:`~jaxcompress.budget.cost.option_cost`).
    damage: per layer and option, the predicted damage.
    budget: the artifact's bytes (``kind="size"``, ``overhead`` included) or BOPs per example.
    kind: ``size`` or ``bops``.
    structure: the plan's pruning structure (the preset's).
    overhead: the artifact's bytes besides the planned weights' codes (size budgets).
  """
  pick, fixed = (0, overhead) if kind == "size" else (1, 0)
  alloc = allocate([[c[pick] for c in cs] for cs in costs], damage, budget - fixed)
  if alloc is None:
    return None
  return alloc, Plan(tuple(
      LayerPlan(path, weight, o.sparsity, o.weight_bits, o.act_bits, cs[k][0], cs[k][1],
                float(dmg[k]))
      for (path, weight), opts, cs, dmg, k in zip(layers, options, costs, damage, alloc.choice)
      for o in [opts[k]]), structure, fixed)


def scheduled(prune: Mapping, keeps: Mapping[str, np.ndarray], schedule: Mapping, *,
              bits: Mapping[str, int] | None = None) -> dict:
  """A plan's one-shot :class:`~jaxcompress.compose.PruneSpec` fields on another schedule.

  Each pruned weight still ends with as many kept entries as the pattern it was sized on (a
  global threshold becomes each weight's own sparsity under it), but which entries follows
  training. With ``bits`` (size budgets), each unstructured weight whose sized pattern the export
  stores as gap codes is capped at that pattern's codes (``layer_gap_codes``), so the pattern
  training ends with stores in no more bytes than the sized one.

  Args:
    prune: the one-shot fields (:meth:`Plan.prune_fields`, or the uniform recipe's).
    keeps: ``{weight path: sized kept entries}`` of every pruned weight.
    schedule: ``schedule``, ``begin``, ``end`` and ``update_every`` (PruneSpec's meanings).
    bits: ``{weight path: weight bits}``, or ``None`` for no caps (BOPs budgets count kept
      entries only).
  """
  fields = {**prune, **{k: schedule[k] for k in ("schedule", "begin", "end", "update_every")}}
  if prune["method"] == "none" or prune["structure"] != "unstructured":
    return fields
  pruned = {w: k for w, k in keeps.items() if not np.all(k)}
  if not pruned:
    return {**fields, "method": "none", "sparsity": 0.0, "rules": (), "layer_sparsity": ()}
  sparsity = {w: float(np.sum(~np.asarray(k, bool)) / np.size(k)) for w, k in pruned.items()}
  fields.update(scope="layer", sparsity=max(sparsity.values()),
                rules=only_rules(pruned),
                layer_sparsity=tuple((re.escape(w), s) for w, s in sparsity.items()))
  if bits is not None:
    caps = {w: gap_cap(k, bits[w]) for w, k in pruned.items()}
    fields["layer_gap_codes"] = tuple((re.escape(w), *c) for w, c in caps.items() if c)
  return fields


def global_ranks(weights: Sequence[np.ndarray], score: str = "magnitude") -> list[np.ndarray]:
  """Every weight's position in the stable ascending order of ``score`` across all weights.

  The order of ``pruning.unstructured("global")``: its mask at sparsity ``s`` keeps the ranks
  ``>= round(s * total)``, so one sort serves every sparsity. No weights (a model whose only
  layers are its first and last, which the uniform recipe leaves dense): no ranks.
  """
  if not weights:
    return []
  fn = pruning.get_score(score).fn
  return [np.asarray(r) for r in across(ranks, [fn(jnp.asarray(w), None, None) for w in weights])]


def _cut(weight_ranks: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
  pruned = num_pruned(float(sparsity), sum(r.size for r in weight_ranks))
  return [r >= pruned for r in weight_ranks]


def _steps_kept(keep: np.ndarray, stacked: int) -> bool:
  """Whether every step of a weight with ``stacked`` leading step axes keeps an entry (a weight
  of no steps: whether it keeps one)."""
  keep = np.asarray(keep)
  return bool(keep.reshape(-1, int(np.prod(keep.shape[stacked:]))).any(1).all())


def _per_step(keeps: list[np.ndarray], paths: Sequence[str], weights: Mapping[str, np.ndarray],
              layers: Mapping[str, Any] | None) -> list[np.ndarray]:
  """``keeps`` (one global cut), each weight stacked by ``nn.scan`` (``layers[path].stacked``)
  replaced by the mask training gives it: each step pruned on its own at the layer's sparsity
  under the cut (``PruneSpec.layer_sparsity`` with ``ModelLayers.stacked``)."""
  out = list(keeps)
  for i, p in enumerate(paths):
    layer = (layers or {}).get(p)
    if layer is not None and layer.stacked:
      out[i] = keep_mask(weights[p], 1 - float(np.mean(keeps[i])), "unstructured", layer)
  return out


def global_keep(weights: Sequence[np.ndarray], sparsity: float, score: str = "magnitude"
                ) -> list[np.ndarray]:
  """Global masks: the ``round(sparsity * total)`` lowest scores across all weights pruned.

  ``score``: ``magnitude`` (``|w|``) or ``lamp`` (:func:`jaxcompress.pruning.scores.lamp`).
  """
  return _cut(global_ranks(weights, score), sparsity)


def uniform_size(weights: Mapping[str, np.ndarray], inner: Sequence[str], *, overhead: int,
                 budget: int, bits: Sequence[int], predict: Callable[[str, float, int], float],
                 edge_bits: int = 8, resolution: float = 1e-3,
                 layers: Mapping[str, Any] | None = None
                 ) -> tuple[float, int, dict[str, np.ndarray], int] | None:
  """The uniform recipe within a byte budget.

  Args:
    weights: ``{layer path: weight}`` of every planned layer.
    inner: the layers pruned and quantized at the uniform bits (the others: dense, edge bits).
    overhead: artifact bytes besides the weights' codes (:func:`.cost.overhead_bytes`).
    budget: the byte budget.
    bits: the weight bit widths to try.
    predict: ``(path, sparsity, bits) -> damage`` (e.g. ``Sensitivity.predict``).
    edge_bits: bits of the layers outside ``inner``.
    resolution: step of the sparsity search.
    layers: ``{path: traced Layer}``: a weight stacked by ``nn.scan`` is sized with the mask
      training gives it, each step at the layer's sparsity under the threshold (as in
      :func:`threshold_plans`).

  Returns:
    ``(sparsity, bits, {path: keep mask}, predicted bytes)`` or ``None`` if no bit width fits
    without pruning a layer whole (which would cut the network).
  """
  edges = [p for p in weights if p not in inner]
  fixed = overhead + sum(weight_bytes(np.ones(weights[p].shape, bool), edge_bits) for p in edges)
  best = None
  inner_ranks = global_ranks([weights[p] for p in inner])
  for b in sorted(bits):
    def size(s):
      keeps = _per_step(_cut(inner_ranks, s), inner, weights, layers)
      return fixed + sum(weight_bytes(k, b) for k in keeps), keeps
    lo, hi = 0, int(round(1 / resolution)) - 1  # steps of `resolution`, sparsity < 1
    if size(hi * resolution)[0] > budget:
      continue
    while lo < hi:  # least sparsity that fits (sizes shrink as global masks nest)
      mid = (lo + hi) // 2
      if size(mid * resolution)[0] <= budget:
        hi = mid
      else:
        lo = mid + 1
    s = lo * resolution
    total, keeps = size(s)
    if not all(np.any(k) for k in keeps):  # a layer pruned whole cuts the network; more
      continue  #                             sparsity (nested masks) only prunes more
    keep = dict(zip(inner, keeps))
    damage = sum(predict(p, 1 - float(np.mean(keep[p])), b) for p in inner)
    if best is None or damage < best[0]:
      best = (damage, s, b, keep, total)
  return None if best is None else best[1:]


def threshold_plans(weights: Mapping[str, np.ndarray], *, budget: int, bits: Sequence[int],
                    predict: Callable[[str, float, int], float], sparsities: Sequence[float],
                    score: str = "magnitude", layers: Mapping[str, Any] | None = None):
  """Per-layer sparsity from one global threshold, per-layer bits allocated, for each threshold.

  For each global sparsity ``g`` of ``sparsities``, every layer keeps its weights above the
  common threshold on ``score`` (:func:`global_keep`; a ``g`` that empties a layer, or a step of
  a stacked one, is skipped: a layer of no weights cuts the network, and training takes
  sparsities below 1), and the multiple-choice knapsack (:func:`.allocate.allocate`) gives each
  layer the bit width of ``bits`` that minimises the summed predicted damage within ``budget``,
  exactly for that ``g``.

  ``kernel``: the threshold keeps whole kernels of the layers that have them
  (:func:`.cost.kernel_keep`; ``g`` is the fraction of their kernels pruned, and a ``g`` that
  empties a layer is skipped), and those layers share one bit width, so that training may move
  kept kernels between them within the bytes of :func:`.cost.shared_kernel_bytes`; for each
  ``g``, the best shared width with the other layers' widths allocated exactly. The other layers
  stay dense.

  A weight stacked by ``nn.scan`` (``layers[path].stacked``) is pruned step by step in training,
  each step at the layer's sparsity: its keep mask and bytes are those of that sparsity, not of
  the threshold, which may keep one entry more or fewer per step.

  Args:
    weights: ``{layer path: weight}`` of every planned layer (all take part in the threshold).
    budget: the bytes the weights' codes may take (the budget less the artifact's overhead).
    bits: the weight bit widths a layer may take.
    predict: ``(path, sparsity, bits) -> damage`` (e.g. ``Sensitivity.predict``).
    sparsities: the global sparsities to try.
    score: ``magnitude``, ``lamp`` or ``kernel``.
    layers: ``{path: traced Layer}`` (:class:`~jaxcompress.selection.Layer`), needed by
      ``kernel`` (which weights have kernels, and their windows) and by stacked weights; without
      it, every weight is an ordinary one without kernels.

  Yields:
    ``(g, {path: sparsity}, {path: bits}, predicted damage)`` for every ``g`` whose allocation
    fits, in increasing ``g``.
  """
  paths, bits, layers = list(weights), sorted(bits), dict(layers or {})
  if score == "kernel":
    if set(paths) - set(layers):
      raise ConfigError("threshold_plans: score='kernel' needs the traced layer of every weight "
                        "(layers={path: Layer}) to find their kernels")
    yield from _kernel_plans(weights, budget, bits, predict, sparsities, layers)
    return
  weight_ranks = global_ranks([weights[p] for p in paths], score)
  stacked = [i for i, p in enumerate(paths) if p in layers and layers[p].stacked]
  for g in sorted(sparsities):
    keeps = _cut(weight_ranks, g)
    if not all(np.any(k) for k in keeps):
      continue
    layer_sparsity = {p: 1 - float(np.mean(k)) for p, k in zip(paths, keeps)}
    keeps = _per_step(keeps, paths, weights, layers)
    if not all(_steps_kept(keeps[i], layers[paths[i]].stacked) for i in stacked):
      continue  # a step left without weights: rounding per step emptied it
    costs = [[weight_bytes(k, b) for b in bits] for k in keeps]
    damages = [[predict(p, layer_sparsity[p], b) for b in bits] for p in paths]
    alloc = allocate(costs, damages, budget)
    if alloc is not None:
      yield (float(g), layer_sparsity, {p: bits[k] for p, k in zip(paths, alloc.choice)},
             alloc.damage)


def kernel_window(layers: Sequence[Any]) -> int:
  """The largest window (entries per kernel, :func:`.cost.kernel_size`) of these traced
  layers."""
  return max((kernel_size(l) for l in layers), default=1)


def _kernel_plans(weights, budget, bits, predict, sparsities, layers):
  """:func:`threshold_plans` for ``score="kernel"``."""
  paths = list(weights)
  grid = [p for p in paths if has_kernels(layers[p])]
  window = kernel_window([layers[p] for p in grid])
  for g in sorted(sparsities):
    keeps = dict(zip(paths, kernel_keep([weights[p] for p in paths], g,
                                        [layers[p] for p in paths])))
    if not all(_steps_kept(keeps[p], layers[p].stacked) for p in grid):
      continue
    layer_sparsity = {p: 1 - float(np.mean(k)) for p, k in keeps.items()}
    best = None
    for shared in bits:  # one option per kernel layer; every width for the others
      costs = [[shared_kernel_bytes(keeps[p], shared, window, layers[p].window_axes)]
               if p in grid else
               [weight_bytes(keeps[p], b) for b in bits] for p in paths]
      damages = [[predict(p, layer_sparsity[p], shared)] if p in grid else
                 [predict(p, layer_sparsity[p], b) for b in bits] for p in paths]
      alloc = allocate(costs, damages, budget)
      if alloc is not None and (best is None or alloc.damage < best[1]):
        best = ({p: shared if p in grid else bits[k] for p, k in zip(paths, alloc.choice)},
                alloc.damage)
    if best is not None:
      yield float(g), layer_sparsity, *best


def global_bits(weights: Mapping[str, np.ndarray], *, budget: int, bits: Sequence[int],
                predict: Callable[[str, float, int], float], sparsities: Sequence[float],
                score: str = "magnitude", layers: Mapping[str, Any] | None = None
                ) -> tuple[float, dict[str, float], dict[str, int], float] | None:
  """Of the :func:`threshold_plans` (same arguments), the one with the least predicted damage,
  or ``None`` if none fits."""
  return min(threshold_plans(weights, budget=budget, bits=bits, predict=predict,
                             sparsities=sparsities, score=score, layers=layers),
             key=lambda found: found[3], default=None)
