"""Plans as compose specs (2:4, channels, unstructured) and the uniform recipe's search."""

import itertools

import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export, pruning
from jaxcompress.budget import LayerPlan, Plan
from jaxcompress.models import create_model
from jaxcompress.selection import Layer

SHAPE = (8, 8, 1)


def _masks(plan):
  model, variables = create_model("mlp", num_classes=10, image_shape=SHAPE, seed=0)
  x = np.zeros((4, *SHAPE), np.float32)
  prune = compose.PruneSpec(**plan.prune_fields())
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=10,
                       prune=prune, quant=compose.QuantSpec(**plan.quant_fields()))
  state = comp.init_state(variables, x, calibration=[x])
  masks = pruning.compute_masks(state.params, prune.sparsity, structure=prune.masker(),
                                rules=comp.prune_rules)
  bits = {l.path: (l.config.weight_bits, l.config.act_bits)
          for l in state.model_state["quant"].layers}
  return {k: np.asarray(v["kernel"]) for k, v in masks["model"].items()}, bits


def _plan(structure, sparsities, bits=(8, 4, 2)):
  return Plan(tuple(LayerPlan(f"fc{i + 1}", f"fc{i + 1}/kernel", s, b, 8, 0, 0)
                    for i, (s, b) in enumerate(zip(sparsities, bits))), structure, 0)


def test_nm_plan_prunes_two_of_four_where_planned():
  masks, bits = _masks(_plan("nm", (0.0, 0.5, 0.0)))
  assert masks["fc1"].all() and masks["fc3"].all()
  groups = masks["fc2"].reshape(64, 4, 128)  # fc2 is [256, 128]: groups along the inputs
  assert np.all(groups.sum(axis=1) == 2)
  assert bits == {"fc1": (8, 8), "fc2": (4, 8), "fc3": (2, 8)}


def test_channel_plan_removes_whole_output_channels():
  masks, _ = _masks(_plan("channel", (0.25, 0.5, 0.0)))
  for name, s in (("fc1", 0.25), ("fc2", 0.5)):
    kept = masks[name].all(axis=0)
    assert np.all(masks[name].any(axis=0) == kept)  # a channel is all kept or all pruned
    assert np.sum(~kept) == round(s * masks[name].shape[1])
  assert masks["fc3"].all()


def test_unstructured_plan_reaches_each_layers_sparsity():
  masks, _ = _masks(_plan("unstructured", (0.3, 0.9, 0.5)))
  for name, s in (("fc1", 0.3), ("fc2", 0.9), ("fc3", 0.5)):
    assert np.sum(masks[name] == 0) == round(s * masks[name].size)


def test_uniform_search_finds_the_least_sparsity_within_the_budget():
  rng = np.random.default_rng(0)
  weights = {"a": rng.normal(size=(16, 32)), "b": rng.normal(size=(32, 64)),
             "c": rng.normal(size=(64, 4))}
  found = budget.uniform_size(weights, ["b"], overhead=100, budget=1200, bits=(2, 4),
                              predict=lambda p, s, b: s + 1.0 / b, resolution=0.01)
  s, b, keep, size = found
  edges = 16 * 32 + 64 * 4  # dense, 8 bits
  def total(s, b):
    k = budget.global_keep([weights["b"]], s)[0]
    return 100 + edges + budget.weight_bytes(k, b)
  assert size == total(s, b) <= 1200
  assert s == 0 or total(round(s - 0.01, 2), b) > 1200  # one step less does not fit
  assert np.sum(~keep["b"]) == round(s * 32 * 64)
  assert budget.uniform_size(weights, ["b"], overhead=100, budget=700, bits=(2,),
                             predict=lambda *a: 0.0) is None  # the dense edges alone exceed it


def test_uniform_search_of_a_model_with_no_inner_layer():
  # Two layers, both edges: the recipe is the edges dense at 8 bits, nothing pruned, which fits
  # exactly when the overhead and their 16 * 8 + 8 * 4 bytes do.
  rng = np.random.default_rng(0)
  weights = {"a": rng.normal(size=(16, 8)), "b": rng.normal(size=(8, 4))}
  found = budget.uniform_size(weights, [], overhead=100, budget=260, bits=(2, 4),
                              predict=lambda *a: 1.0)
  assert found is not None and found[0] == 0.0 and found[2] == {} and found[3] == 260
  assert budget.uniform_size(weights, [], overhead=100, budget=259, bits=(2, 4),
                             predict=lambda *a: 1.0) is None


def test_uniform_search_never_prunes_a_layer_whole():
  # b's four weights are the smallest of all 68: any global sparsity of 4/68 or more prunes all
  # of b, which would cut the network. A budget that needs about half the weights pruned has no
  # uniform recipe; one that fits dense keeps b whole.
  rng = np.random.default_rng(0)
  weights = {"a": 10 + rng.random((8, 8)), "b": 1e-3 * rng.random((2, 2))}
  dense = budget.weight_bytes(np.ones((8, 8), bool), 4) + budget.weight_bytes(
      np.ones((2, 2), bool), 4)
  fits = budget.uniform_size(weights, ["a", "b"], overhead=0, budget=dense, bits=(4,),
                             predict=lambda *a: 0.0, resolution=0.01)
  assert fits is not None and fits[0] == 0 and fits[2]["b"].all()
  assert budget.uniform_size(weights, ["a", "b"], overhead=0, budget=dense // 2, bits=(4,),
                             predict=lambda *a: 0.0, resolution=0.01) is None


def test_global_lamp_keeps_every_layer():
  """Two of six weights pruned: by magnitude both of ``b``'s go; by LAMP (scores by hand:
  ``a``: 49/294, 64/245, 81/181, 1; ``b``: 0.01/0.05, 1) ``a``'s 7 and ``b``'s 0.1 go."""
  a, b = np.array([7.0, -8.0, 9.0, 10.0]), np.array([0.1, -0.2])
  by_magnitude = budget.global_keep([a, b], 2 / 6)
  assert [k.tolist() for k in by_magnitude] == [[True] * 4, [False, False]]
  by_lamp = budget.global_keep([a, b], 2 / 6, "lamp")
  assert [k.tolist() for k in by_lamp] == [[False, True, True, True], [False, True]]


def test_global_keep_breaks_ties_as_the_pruning_masker():
  """Stable ascending order of the concatenated scores: 0 (b), then a's two 1s, b's 1, 2; two
  pruned are b's 0 and a's first 1."""
  a, b = np.array([1.0, -1.0, 2.0]), np.array([1.0, 0.0])
  keep = budget.global_keep([a, b], 2 / 5)
  assert [k.tolist() for k in keep] == [[False, True, True], [True, False]]
  masker = pruning.unstructured("global")(["a", "b"], [np.abs(a), np.abs(b)], 2 / 5)
  assert [np.asarray(m).tolist() for m in masker] == [k.tolist() for k in keep]


def _lamp_by_hand(w):
  flat = np.square(w.ravel())
  return (flat / np.array([flat[flat >= x].sum() for x in flat])).reshape(w.shape)


def _keep_by_hand(weights, score, g):
  """One global threshold: the round(g * total) smallest scores of all layers pruned; for
  ``kernel``, of all 3x3 kernels (RMS over the window), layers without kernels kept whole."""
  if score == "kernel":
    rms = {p: np.sqrt(np.mean(np.square(w), axis=(0, 1))) for p, w in weights.items()
           if w.ndim == 4}
    flat = np.concatenate([x.ravel() for x in rms.values()])
    cut = np.sort(flat)[int(round(g * flat.size)) - 1] if round(g * flat.size) else -1.0
    return {p: np.broadcast_to(rms[p] > cut, w.shape) if p in rms else np.ones(w.shape, bool)
            for p, w in weights.items()}
  scores = {p: np.abs(w) if score == "magnitude" else _lamp_by_hand(w)
            for p, w in weights.items()}
  total = sum(w.size for w in weights.values())
  flat = np.concatenate([x.ravel() for x in scores.values()])
  cut = np.sort(flat)[int(round(g * total)) - 1] if round(g * total) else -1.0
  return {p: x > cut for p, x in scores.items()}


@pytest.mark.parametrize("score", ["magnitude", "lamp", "kernel"])
def test_global_bits_against_brute_force(score):
  """Every (global sparsity, bits per layer) of a small instance, sized and scored by hand."""
  rng = np.random.default_rng(0)
  weights = {"a": rng.normal(size=(3, 3, 2, 4)), "b": 2 * rng.normal(size=(8, 6)),
             "c": rng.normal(size=(5, 7))}
  if score == "kernel":  # a second conv: the threshold runs across both convs' kernels
    weights["c"] = 0.7 * rng.normal(size=(3, 3, 4, 2))
  layers = {p: Layer(p, "linear", "Conv" if w.ndim == 4 else "Dense", p, w.shape, (),
                     window_axes=(0, 1) if w.ndim == 4 else ()) for p, w in weights.items()}
  total = sum(w.size for w in weights.values())
  bits, grid = (2, 4, 8), (0.0, 0.3, 0.6, 0.9)
  sens = {p: rng.uniform(0, 1, 2) for p in weights}
  predict = lambda p, s, b: sens[p][0] * s ** 2 + sens[p][1] * 2.0 ** -b  # noqa: E731
  for budget_bytes in (60, 90, 150, 400):
    best = None
    for g in grid:
      keep = _keep_by_hand(weights, score, g)
      if score == "kernel" and not all(k.any() for k in keep.values()):
        continue  # a layer with no kernel left: no plan
      for combo in itertools.product(bits, repeat=3):
        if score == "kernel":  # the convs share one width; bytes: kernel bits, 9 entries per
          if combo[0] != combo[2]:  # kept kernel, a byte of rounding
            continue
          kept = {p: int(keep[p][0, 0].sum()) for p in "ac"}
          size = (sum(-(-keep[p][0, 0].size // 8) + -(-kept[p] * 9 * b // 8) + 1
                      for p, b in zip("ac", combo[::2]))
                  + budget.weight_bytes(keep["b"], combo[1]))
        else:
          size = sum(budget.weight_bytes(keep[p], b) for p, b in zip(weights, combo))
        damage = sum(predict(p, 1 - keep[p].mean(), b) for p, b in zip(weights, combo))
        if size <= budget_bytes and (best is None or damage < best[0] - 1e-12):
          best = (damage, g, dict(zip(weights, combo)))
    found = budget.global_bits(weights, budget=budget_bytes, bits=bits, predict=predict,
                               sparsities=grid, score=score, layers=layers)
    if best is None:
      assert found is None
      continue
    g, sparsity, layer_bits, damage = found
    assert damage == pytest.approx(best[0]) and (g, layer_bits) == (best[1], best[2])
    kept = {p: round((1 - sparsity[p]) * w.size) for p, w in weights.items()}
    if score == "kernel":
      assert sparsity["b"] == 0 and sum(kept[p] // 9 for p in "ac") == 16 - round(g * 16)
    else:
      assert sum(kept.values()) == total - round(g * total)


def test_scheduled_fields_keep_each_sized_count_and_cap_its_codes():
  rng = np.random.default_rng(3)
  weights = {"a/kernel": rng.normal(size=(16, 32)), "b/kernel": rng.normal(size=(32, 64)),
             "c/kernel": rng.normal(size=(64, 4))}
  keeps = dict(zip(weights, budget.global_keep(list(weights.values()), 0.8)))
  keeps["c/kernel"] = np.ones((64, 4), bool)  # kept dense: neither selected nor capped
  one_shot = {"method": "magnitude", "structure": "unstructured", "scope": "global",
              "schedule": "one_shot", "begin": 0.0, "sparsity": 0.8, "rules": (),
              "layer_sparsity": ()}
  schedule = {"schedule": "gradual", "begin": 0.0, "end": 0.4, "update_every": 10}
  bits = {"a/kernel": 8, "b/kernel": 2, "c/kernel": 8}
  fields = budget.scheduled(one_shot, keeps, schedule, bits=bits)
  assert {k: fields[k] for k in schedule} == schedule and fields["scope"] == "layer"
  assert fields["rules"] == (("a/kernel", True), ("b/kernel", True), (".*", False))
  for regex, s in fields["layer_sparsity"]:
    w = regex.replace("\\", "")
    assert round(s * weights[w].size) == np.sum(~keeps[w])
  # By hand from the export's sizes: each weight's cheapest encoding, gap codes capped.
  caps = {}
  for w in ("a/kernel", "b/kernel"):
    sizes = export.sparse.sizes(keeps[w], bits[w])
    best = min(sizes, key=sizes.get)
    if best.startswith("gaps"):
      width = int(best[4:])
      caps[w] = (width, export.sparse.num_gap_codes(export.sparse.gaps_of(keeps[w].ravel()),
                                                    width))
  assert caps and dict((r.replace("\\", ""), (w, c))
                       for r, w, c in fields["layer_gap_codes"]) == caps
  assert "layer_gap_codes" not in budget.scheduled(one_shot, keeps, schedule)  # a BOPs budget
  nm = {**one_shot, "structure": "nm", "scope": "layer", "n": 2, "m": 4}
  assert budget.scheduled(nm, keeps, schedule) == {**nm, **schedule}


@pytest.mark.parametrize("kind", ["size", "bops"])
def test_allocate_plan_against_brute_force(kind):
  """The plan is the least summed damage whose (bytes + overhead) or BOPs fit; each layer keeps
  its option's own costs; nothing fits below the cheapest combination."""
  rng = np.random.default_rng(3)
  layers = [(f"l{i}", f"l{i}/kernel") for i in range(3)]
  options = [[budget.Option(s, b, a) for s in (0.0, 0.5) for b in (4, 8) for a in (8,)]
             for _ in layers]
  costs = [[(int(c), int(c) * 7) for c in rng.integers(10, 100, len(o))] for o in options]
  damage = [list(rng.random(len(o))) for o in options]
  overhead, col = 25, 0 if kind == "size" else 1
  cheapest = sum(min(c[col] for c in cs) for cs in costs) + (overhead if kind == "size" else 0)
  for budget_ in (cheapest, cheapest + 40, cheapest * 2):
    alloc, plan = budget.allocate_plan(layers, options, costs, damage, budget_, kind=kind,
                                       structure="unstructured", overhead=overhead)
    best, best_dmg = None, np.inf
    for choice in itertools.product(*[range(len(o)) for o in options]):
      total = sum(costs[i][k][col] for i, k in enumerate(choice))
      total += overhead if kind == "size" else 0
      dmg = sum(damage[i][k] for i, k in enumerate(choice))
      if total <= budget_ and dmg < best_dmg:
        best, best_dmg = choice, dmg
    assert tuple(alloc.choice) == best
    assert plan.damage == pytest.approx(best_dmg)
    assert [(l.path, l.weight) for l in plan.layers] == layers
    assert [(l.bytes, l.bops) for l in plan.layers] == [costs[i][k] for i, k in enumerate(best)]
    assert [(l.sparsity, l.weight_bits) for l in plan.layers] == [
        (options[i][k].sparsity, options[i][k].weight_bits) for i, k in enumerate(best)]
    assert (plan.size_bytes if kind == "size" else plan.bops) <= budget_
    assert plan.overhead == (overhead if kind == "size" else 0)
  assert budget.allocate_plan(layers, options, costs, damage, cheapest - 1, kind=kind,
                              structure="unstructured", overhead=overhead) is None


def test_a_global_threshold_that_empties_a_layer_is_skipped():
  rng = np.random.default_rng(0)
  weights = {"big": rng.normal(size=(10, 10)).astype(np.float32),
             "small": np.full((2, 2), 0.5, np.float32)}  # |w| = 0.5: above 38 % of "big"
  found = list(budget.threshold_plans(weights, budget=10**6, bits=(4, 8), sparsities=(0.3, 0.97),
                                      predict=lambda path, s, b: s))
  # 30 % of 104 weights leaves "small" whole; 97 % would take all 4 of it: that cut is no plan.
  assert [g for g, *_ in found] == [0.3]
  assert found[0][1]["small"] == 0.0
