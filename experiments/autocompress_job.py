"""Compress to a budget: sensitivity scan, per-layer plan, fine-tune, evaluate, export, compare.

``train_and_evaluate(config, workdir)``:

1. checks the budget (``budget.size_bytes``, ``budget.ratio`` or ``budget.bops``; the device
   preset ``budget.device``) and the held-out slice (the last ``data.val_examples`` examples of
   ``data.train_split``, disjoint from ``data.eval_split``);
2. sizes every option of every layer with the export's own size code, on a reference export
   (:mod:`jaxcompress.budget.cost`), and refuses a budget below the smallest reachable size;
3. scans the per-layer sensitivity on the held-out slice (one compiled evaluation);
4. allocates exactly (:mod:`jaxcompress.budget.allocate`) over per-layer sparsities, or over
   bits at one global threshold on magnitude, on LAMP scores or on whole kernels
   (``budget.sparsity``: ``auto`` makes the magnitude and LAMP plans where the budget allows
   them, else the per-layer one),
   and finds the uniform recipe at the same budget (``budget.sizing=coded``: each planned again
   at the budget scaled by its estimated Huffman coding, ``budget.coded_ratio``); with
   ``scan.refine_rounds`` > 0, allocates
   again over damage measured around the uniform recipe, then around each new plan
   (:mod:`jaxcompress.budget.refine`); measures every candidate plan and the uniform recipe
   whole on the held-out slice and keeps the least damaged candidate;
5. runs the main job (:func:`experiments.pipeline.train_and_evaluate`: KD fine-tuning, evaluation,
   export within a size budget, ``export.max_bytes``) on each plan in ``WORKDIR/auto`` and
   ``WORKDIR/uniform``;
6. writes ``results.json``, ``report.md``, ``sensitivity.png`` and ``accuracy_vs_size.png``.

The scan is kept in ``WORKDIR/scan.json``, each refinement round's measurements in
``WORKDIR/context<r>.json``, and each plan's run resumes on its own, so rerunning the
same command continues where it stopped; ``results.json`` is written last, and a rerun of a point
that holds it returns it. Nothing is written before every check has passed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time

import jax
import ml_collections
import numpy as np
import optax

from experiments import pipeline
from experiments.autocompress_checks import (AUTO_THRESHOLDS, GLOBAL_SCORES, check_budget,
                                             check_scan, excluded_bits, global_allowed)
from experiments.autocompress_report import write_report, write_sweep_report
from experiments.autocompress_uniform import device_uniform_recipe, uniform_recipe
from jaxcompress import budget as budget_lib
from jaxcompress import compose, datasets, parallel
from jaxcompress import data as data_lib
from jaxcompress.checkpoint import (check_workdir, config_diff, read_json, release_workdir,
                                    write_json)
from jaxcompress.data import DataSpec
from jaxcompress.errors import ConfigError, check_positive, invalid
from jaxcompress.models import create_model
from jaxcompress.rules import tree_get
from jaxcompress.selection import trace_layers
from jaxcompress.train import load_data

JOB_SECTIONS = ("budget", "scan", "uniform")
CODED_ROUNDS = 2  # budget.sizing=coded: plans sized, their Huffman coding estimated, this often
# What a scan's measurements depend on besides its grid (each measurement is keyed by its layer
# and option): the model, the held-out slice and its batches, the calibration, the damage. A
# scan.json measured with other values is refused; another grid or budget reuses it.
SCAN_SETTINGS = ("student.name", "student.weights", "data.name", "data.train_split",
                 "data.val_examples", "data.train_examples", "data.mean", "data.std",
                 "quant.per_channel", "quant.calibration_examples", "scan.batch_size",
                 "scan.damage", "scan.adapt_norms", "budget.device")


def sub_config(config, prune: dict, quant: dict, *, teacher: bool,
               max_bytes: int = 0) -> ml_collections.ConfigDict:
  """The main job's config for one plan (the job's own sections dropped); ``max_bytes``: the
  size budget its artifact must meet (``export.max_bytes``; 0: none)."""
  d = config.to_dict()
  for key in JOB_SECTIONS:
    d.pop(key, None)
  d["prune"].update(prune)
  d["quant"].update(quant)
  d["eval"]["teacher"] = bool(teacher and d["eval"]["teacher"])
  # A channel-pruned plan is served (where a serving function is written) with its removed
  # channels skipped: the compute it was planned for.
  structure = budget_lib.get_preset(config.budget.device).structure
  d["export"]["slim"] = bool(d["export"]["slim"]
                             or (structure == "channel" and d["export"]["serving"]))
  d["export"]["max_bytes"] = int(max_bytes)
  return ml_collections.ConfigDict(d)


def _reference_overhead(model, variables, layers, calib, config, weights) -> int:
  """Artifact bytes besides the planned codes, from an 8-bit export to a temporary folder."""
  from jaxcompress import export
  quant = compose.QuantSpec(per_channel=config.quant.per_channel, layer_bits=tuple(
      (re.escape(l.path), 8, 8) for l in layers),
      scale_dtype=config.quant.get("scale_dtype", "float32"))  # as the plans will store them
  comp = compose.build(model, variables, calib[0], optimizer=optax.sgd(0.0), total_steps=1,
                       quant=quant)
  state = comp.init_state(variables, calib[0], calibration=calib)
  with tempfile.TemporaryDirectory() as tmp:
    comp.export(tmp, state, input_shape=tuple(calib[0].shape[1:]))
    spec = export.read_spec(tmp)
  return budget_lib.overhead_bytes(spec, weights)


def _check_distillation(config, paths, spec, model, variables, sample) -> None:
  """The KD settings fit the student and the teacher (their classes, ``distill.feature_pairs``):
  the fine-tunings would find out only after the scan, with the workdir written."""
  distill = compose.DistillSpec.from_dict(dict(config.distill))
  if not distill.uses_teacher:
    return
  if "teacher" not in paths:
    raise invalid("teacher.name", config.teacher.name, "a model name when distill.alpha > 0 or "
                  "distill.feature_weight > 0")
  teacher, teacher_vars = create_model(config.teacher.name, num_classes=spec.num_classes,
                                       image_shape=spec.image_shape, weights=paths["teacher"],
                                       seed=config.seed, field="teacher")
  comp = compose.build(model, variables, sample, optimizer=optax.sgd(0.0), total_steps=1,
                       teacher=teacher, distill=distill)
  state = comp.init_state(variables, sample, teacher_vars=teacher_vars)
  batch = data_lib.Batch(sample, np.zeros(len(sample), np.int32), np.ones(len(sample), np.float32))
  jax.eval_shape(lambda s: comp.loss_fn(s.params, s.model_state, batch, jax.random.key(0),
                                        teacher_vars), state)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the job (see the module docstring); returns the ``results.json`` dict.

  With ``budget.sweep`` (ratios), runs one budget point per ratio in ``WORKDIR/ratio<r>``, all
  planned from one scan (``WORKDIR/scan.json``), and returns the ``sweep.json`` dict.
  """
  if config.parallel.distributed:  # the scan and the plan are one process's work
    raise invalid("parallel.distributed", True, "False for the budget job",
                  "it runs in one process on all of its host's devices; give each host its own "
                  "budget point (--config.budget.ratio) and workdir")
  if config.budget.sweep:
    return _sweep(config, workdir)
  return _budget_point(config, workdir)


def _point_config(config, ratio: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.budget.sweep, c.budget.ratio = (), float(ratio)
  return c


def _sweep(config, workdir: str) -> dict:
  """A budget point per ratio of ``budget.sweep``; ``sweep.json``, ``sweep.md``, ``pareto.png``."""
  for i, r in enumerate(config.budget.sweep):
    check_positive(f"budget.sweep[{i}]", r)
  ratios = tuple(float(r) for r in config.budget.sweep)
  for f in ("size_bytes", "ratio", "bops"):
    if config.budget[f]:
      raise ConfigError(f"budget: budget.sweep={ratios} and budget.{f}={config.budget[f]} "
                        "contradict (a sweep sets the ratio of each point); give one of them")
  if any(not r > 1 for r in ratios) or len(set(ratios)) != len(ratios):
    raise invalid("budget.sweep", ratios, "distinct compression ratios > 1")
  # The hardest point first, checks only: a ratio out of reach stops the sweep before it starts.
  _budget_point(_point_config(config, max(ratios)), workdir, check_only=True,
                field="budget.sweep")
  check_workdir(config, workdir)
  scan_path = os.path.join(workdir, "scan.json")
  points = []
  for r in sorted(ratios):
    res = _budget_point(_point_config(config, r), os.path.join(workdir, f"ratio{r:g}"),
                        scan_path=scan_path)
    points.append({"ratio": r, "limit": res["budget"]["limit"], "compressed": res["compressed"],
                   "uniform": res.get("uniform")})
  out = {"float32_bytes": res["budget"]["float32_bytes"], "original": res["original"],
         "points": points}
  write_sweep_report(workdir, out)
  write_json(os.path.join(workdir, "sweep.json"), out)
  return out


def _budget_point(config, workdir: str, *, scan_path: str | None = None,
                  check_only: bool = False, field: str | None = None) -> dict | None:
  """One budget: checks, scan (kept in ``scan_path``), plan, both fine-tunes, results.

  ``check_only``: return ``None`` once every check has passed, before anything is written.
  ``field``: the name a budget out of reach is reported under (default: the budget's own field).
  """
  started = time.time()
  check_scan(config)
  check_budget(config)
  preset = budget_lib.get_preset(config.budget.device)
  main_config = sub_config(config, {}, {}, teacher=True)
  folder, paths, to_train = pipeline.validate_config(main_config)
  if to_train:
    name = next(iter(to_train))
    raise ConfigError(f"student.weights: no trained weights named {name!r} in the weights folder "
                      f"{folder!r}; "
                      "a budget plan starts from trained weights (run the main job once to "
                      "pretrain them, or point weights_dir at them)")
  mesh = parallel.make_mesh()  # the fine-tunings split their batches over every device
  for f in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(config.data[f], mesh, f"data.{f}")
  spec = datasets.dataset_spec(config.data.name)
  model, variables = create_model(config.student.name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, weights=paths["student"],
                                  seed=config.seed, field="student")
  data = DataSpec.from_mapping(config.data)
  splits = load_data(data)
  train, val = data_lib.as_split(splits["train"]), data_lib.as_split(splits["val"])
  per_epoch = data_lib.steps_per_epoch(len(train), config.data.batch_size)
  need = 2 if config.prune.schedule == "gradual" else 1  # the fine-tunings' pruning schedule
  if int(round(config.train.epochs * per_epoch)) < need:
    raise invalid("train.epochs", config.train.epochs, f"enough for {need} step(s) of "
                  f"prune.schedule={config.prune.schedule} (an epoch is {per_epoch} steps)")
  norm = dict(mean=data.mean, std=data.std)
  held_out = list(data_lib.eval_batches(val, min(config.scan.batch_size, len(val)), **norm))
  n_calib = max(1, min(config.quant.calibration_examples, 512, len(train)))
  head, _ = train.read(np.arange(n_calib))  # the first examples of the training split
  calib = data_lib.calibration_batches(head, **norm)
  traced = trace_layers(model, variables, calib[0], field="student.name")
  _check_distillation(main_config, paths, spec, model, variables, calib[0][:8])
  layers, last = traced.layers, traced.last
  float32_bytes = pipeline.FLOAT32_BYTES * pipeline.param_count(variables["params"])
  kind, limit = check_budget(config, float32_bytes)
  params = variables["params"]
  weights = {l.path: np.asarray(tree_get(params, l.weight)) for l in layers}
  if config.budget.sparsity == "kernel" and not any(budget_lib.has_kernels(l) for l in layers):
    raise ConfigError(f"budget.sparsity='kernel': no layer of {config.student.name} has kernels "
                      "to prune whole (a Conv window of more than one entry); use auto, layer, "
                      "global or lamp")
  macs = budget_lib.layer_macs(model, variables, calib[0])
  grid = dict(sparsities=config.scan.sparsities, weight_bits=config.scan.weight_bits,
              act_bits=config.scan.act_bits, kind=kind)
  options = {l.path: preset.layer_options(l, last=l.path == last, **grid) for l in layers}
  by_path = {l.path: l for l in layers}
  excluded = excluded_bits(config)
  plannable = {p: [o for o in opts if o.weight_bits not in excluded]
               for p, opts in options.items()}  # the scan measures all options, plans use these
  overhead = _reference_overhead(model, variables, layers, calib, config,
                                 [l.weight for l in layers]) if kind == "size" else 0
  keeps: dict = {}

  def keep(path, s, structure=preset.structure):
    if (path, s, structure) not in keeps:
      keeps[(path, s, structure)] = budget_lib.keep_mask(weights[path], s, structure,
                                                         by_path[path])
    return keeps[(path, s, structure)]

  def cost(path, o):  # (bytes, BOPs) of one option
    return budget_lib.layer_costs(weights[path], by_path[path], [o], macs.get(path, 0),
                                  preset.structure, keep=lambda s: keep(path, s))[0]

  costs = {l.path: [cost(l.path, o) for o in plannable[l.path]] for l in layers}
  pick = 0 if kind == "size" else 1
  fixed = overhead if kind == "size" else 0
  smallest = fixed + sum(min(c[pick] for c in costs[l.path]) for l in layers)
  if smallest > limit:
    unit = "bytes" if kind == "size" else "BOPs per example"
    given = next(f for f in ("size_bytes", "ratio", "bops") if config.budget[f])
    extra = (f", ratio {float32_bytes / smallest:.1f}x" if kind == "size" else "")
    raise invalid(field or f"budget.{given}", config.budget[given], "reachable by "
                  f"{config.student.name} under budget.device={config.budget.device}: its "
                  f"smallest plan takes {smallest:,} {unit}{extra} (this budget allows "
                  f"{int(limit):,})")

  scan_path = scan_path or os.path.join(workdir, "scan.json")
  saved = read_json(scan_path)
  fields = json.loads(config.to_json())  # as recorded: tuples as lists
  # the normalisation used (None: the dataset's), so a scan holds whether it was named or not
  fields["data"].update(mean=list(data.mean), std=list(data.std))
  settings = {f: tree_get(fields, f.replace(".", "/")) for f in SCAN_SETTINGS}
  diff = config_diff(saved.get("settings", settings), settings)  # older scans recorded none
  if diff:
    field, there, here = diff[0]
    raise ConfigError(f"{scan_path} holds a scan measured with {field}={there}, this run has "
                      f"{here}; its measurements hold only for the same model, held-out slice and "
                      "damage (the grid and the budget may differ): use a new --workdir or "
                      "delete that scan.json")

  # Every check has passed: only now touch the workdir.
  if check_only:
    return None
  check_workdir(config, workdir)
  done = read_json(os.path.join(workdir, "results.json"))
  if done:  # a finished point: nothing to redo
    return done
  measured = {tuple(k): tuple(v) for k, v in saved.get("measured", [])}
  t0 = time.time()

  hessian = saved.get("hessian")  # kept with the scan: a rerun or another budget reuses it

  def save(points, compiles=None, complete=False):  # after every evaluation: a rerun resumes
    if compiles is None:  # an evaluation has run: this run's scan has compiled, once
      compiles = saved.get("compiles", 0) + 1
    write_json(scan_path, {"settings": settings,
                           "measured": [[list(k), list(v)] for k, v in points.items()],
                           "seconds": saved.get("seconds", 0.0) + time.time() - t0,
                           "compiles": compiles, **({"hessian": hessian} if hessian else {}),
                           **({"complete": True} if complete else {})}, strict=False)

  sens = budget_lib.scan(model, variables, held_out, options, calibration=calib,
                         structure=preset.structure, per_channel=config.quant.per_channel,
                         joint=config.scan.joint, damage=config.scan.damage,
                         adapt_norms=config.scan.adapt_norms, measured=measured, progress=save)
  scan_seconds = saved.get("seconds", 0.0) + time.time() - t0
  compiles = saved.get("compiles", 0) + sens.compiles  # over every run of the scan
  # the ranking is over this grid's options and from this seed's random vectors: another grid's
  # or seed's (a copied scan.json) is made again
  ranked = json.loads(json.dumps({**grid, "joint": bool(config.scan.joint)}))
  if config.scan.hessian_samples and tuple((hessian or {}).get(k) for k in (
      "samples", "grid", "seed")) != (config.scan.hessian_samples, ranked, config.seed):
    hessian = {**_hessian_ranking(model, variables, held_out, calib[0], sens, preset, config),
               "grid": ranked, "seed": config.seed}
  save(sens.measured, compiles=compiles, complete=True)  # scan.hessian_samples' ranking too
  if not config.scan.hessian_samples:
    hessian = None

  by_path = {l.path: l for l in layers}

  def make_plan(opts: dict, damage: dict, lim: float = limit):  # the exact allocation
    return budget_lib.allocate_plan(
        [(p, by_path[p].weight) for p in sens.paths], [opts[p] for p in sens.paths],
        [[cost(p, o) for o in opts[p]] for p in sens.paths], [damage[p] for p in sens.paths],
        lim, kind=kind, structure=preset.structure, overhead=overhead)

  # Whole plans measured on the held-out slice, before fine-tuning (the summed single-layer
  # damages misjudge them at high compression), and the candidates refined in context.
  evaluate = budget_lib.Evaluator(model, variables, held_out, calibration=calib,
                                  per_channel=config.quant.per_channel,
                                  damage=config.scan.damage, adapt_norms=config.scan.adapt_norms)

  def whole(p):  # the evaluator's view of a plan
    return ({l.path: keep(l.path, l.sparsity, p.structure) for l in p.layers if l.sparsity},
            {l.path: l.weight_bits for l in p.layers}, {l.path: l.act_bits for l in p.layers})

  coded = kind == "size" and config.budget.sizing == "coded"
  sized_for = {}

  def sized(name: str, view_at) -> float:
    """The fixed-width limit at which the plan ``view_at(lim)`` (masks and bits, or ``None``)
    Huffman-codes to the budget less ``budget.coded_margin`` (``budget.sizing=coded``; at
    least the budget)."""
    lim = limit
    for _ in range(CODED_ROUNDS if coded else 0):
      view = view_at(lim)
      if view is None:
        break
      ratio = budget_lib.coded_ratio(weights, view[0], view[1], by_path)
      # never below the budget: fixed-width sizing meets it whatever the codes
      lim = max(limit, fixed + (limit - fixed) * ratio * (1 - config.budget.coded_margin))
    sized_for[name] = int(lim)
    return lim

  candidates = {}
  mode = config.budget.sparsity
  # auto: the global-threshold plans where the budget allows them (they trained better than the
  # per-layer plan wherever both were trained, docs/autocompress.md), else the per-layer plan;
  # global, lamp or kernel: always (check_budget refused them where not allowed)
  if mode == "auto":
    thresholds = AUTO_THRESHOLDS if global_allowed(kind, preset) else ()
  else:
    thresholds = (mode,) if mode in GLOBAL_SCORES else ()
  bits = sorted({o.weight_bits for opts in plannable.values() for o in opts})
  # budget.fixed_edges: the first and last layer dense at 8 bits, as the uniform recipe keeps them
  edges = {traced.first, last} if config.budget.fixed_edges else set()
  edge_bytes = sum(cost(p, budget_lib.Option(0.0, 8, plannable[p][0].act_bits))[0]
                   for p in edges)
  view = lambda p: p and whole(p)  # noqa: E731

  @functools.cache  # sizing asks for the same plan again
  def threshold(name, lim):  # the global-threshold plan at this limit, or None
    found = budget_lib.global_bits(
        {p: weights[p] for p in sens.paths if p not in edges},
        budget=int(lim - fixed - edge_bytes), bits=bits,
        predict=sens.predict, sparsities=np.round(np.arange(0.0, 0.995, 0.005), 3),
        score=GLOBAL_SCORES[name], layers=by_path)
    return found and _threshold_plan(sens, by_path, weights, plannable, cost, overhead, found,
                                     name)

  for name in thresholds:
    found = threshold(name, limit)
    if found is None and mode == name:
      raise ConfigError(f"budget: no global sparsity below 99.5 % meets the budget with weight "
                        f"bits {bits}; use --config.budget.sparsity=layer")
    if found is not None:  # no allocation over sparsities: no optimality gap
      lim = sized(name, lambda lim, name=name: view(threshold(name, lim)))
      candidates[name] = None, threshold(name, lim)
  if mode == "layer" or not candidates:  # the scan measured `options`; plans use `plannable`
    damage = {p: [d for o, d in zip(opts, dmg) if o.weight_bits not in excluded]
              for p, opts, dmg in zip(sens.paths, sens.options, sens.damage)}
    lim = sized("isolated", lambda lim: whole(make_plan(plannable, damage, lim)[1]))
    candidates["isolated"] = make_plan(plannable, damage, lim)
  uniform = None
  if config.uniform.enabled and preset.structure == "unstructured":
    uniform_at = lambda lim: uniform_recipe(  # noqa: E731
        layers, {traced.first, last}, weights, macs, sens, kind, lim, overhead,
        bits=sorted(set(config.scan.weight_bits) - excluded_bits(config)),
        act_bits=config.quant.act_bits or 8)
  elif config.uniform.enabled:
    uniform_at = lambda lim: device_uniform_recipe(  # noqa: E731
        layers, plannable, cost, pick, lim, fixed, sens, preset.structure, whole)
  if config.uniform.enabled:
    uniform = uniform_at(sized("uniform", lambda lim: (uniform_at(lim) or {}).get(
        "masks_and_bits")))
  reference = None
  if uniform is not None and preset.structure == "unstructured" and mode != "kernel":
    reference = budget_lib.reference_of(*uniform["masks_and_bits"])
  for r in range(config.scan.refine_rounds if reference is not None else 0):
    path = os.path.join(workdir, f"context{r + 1}.json")
    saved_ctx = {tuple(k): v for k, v in read_json(path).get("measured", [])}
    _, opts, damage, _ = budget_lib.context_damage(
        evaluate, reference, plannable, keep, measured=saved_ctx,
        progress=lambda m, path=path: write_json(
            path, {"measured": [[list(k), v] for k, v in m.items()]}, strict=False))
    lim = sized(f"context{r + 1}",
                lambda lim, opts=opts, damage=damage: whole(make_plan(opts, damage, lim)[1]))
    candidates[f"context{r + 1}"] = make_plan(opts, damage, lim)
    reference = budget_lib.reference_of(*whole(candidates[f"context{r + 1}"][1]))
  one_shot = {name: _one_shot(evaluate, sens.base_loss, *whole(p))
              for name, (_, p) in candidates.items()}
  chosen = min(candidates, key=lambda name: one_shot[name]["damage"])
  alloc, plan = candidates[chosen]
  whole_plans = {"auto": one_shot[chosen]}
  if uniform is not None:
    whole_plans["uniform"] = _one_shot(evaluate, sens.base_loss, *uniform["masks_and_bits"])
  if config.uniform.only and uniform is None:
    raise ConfigError("uniform.only: no single sparsity and weight bit width reaches this "
                      "budget, so there is no uniform recipe to fine-tune")
  runs = {} if config.uniform.only else {
      "auto": (plan.prune_fields(), plan.quant_fields(), whole(plan))}
  if uniform is not None:
    runs["uniform"] = (*uniform["fields"], uniform["masks_and_bits"])
  schedule = {k: config.prune[k] for k in ("schedule", "begin", "end", "update_every")}
  weight = lambda p: by_path[p].weight  # noqa: E731
  for name, (prune, quant, (keeps, bits, _)) in runs.items():
    runs[name] = (budget_lib.scheduled(
        prune, {weight(p): k for p, k in keeps.items()}, schedule,
        bits={weight(p): bits[p] for p in keeps} if kind == "size" else None), quant)
  out = {}
  for i, (name, (prune, quant)) in enumerate(runs.items()):
    sub = sub_config(config, prune, quant, teacher=i == 0,
                     max_bytes=int(limit) if kind == "size" else 0)
    out[name] = pipeline.train_and_evaluate(sub, os.path.join(workdir, name))
    # done with it: a kill later in this process (a sweep's next point) leaves no lock there,
    # where a rerun, returning the finished point, would never take it over
    release_workdir(os.path.join(workdir, name))

  def row(res, bops):
    c = res["compressed"]  # the accuracy of what meets the budget: the artifact
    out = {"accuracy": c.get("exported_accuracy", c["accuracy"]), "size_bytes": c.get("size_bytes"),
           "compression_ratio": c.get("compression_ratio"), "bops": int(bops),
           "seconds": res["train"]["seconds"]}
    for key in ("serving_slimmed", "zeroed_to_fit"):
      if key in c:
        out[key] = c[key]
    return out

  results = {
      "budget": {"kind": kind, "limit": limit, "device": config.budget.device,
                 "size_bytes": int(config.budget.size_bytes), "ratio": float(config.budget.ratio),
                 "bops": float(config.budget.bops), "float32_bytes": float32_bytes,
                 "hardware": preset.hardware},
      "plan": plan.to_list(),
      "predicted": {"size_bytes": plan.size_bytes, "bops": plan.bops, "damage": plan.damage,
                    "optimality_gap": alloc and alloc.gap, "unit": alloc and alloc.unit,
                    "overhead_bytes": overhead, "sizing": config.budget.sizing,
                    "sized_for": sized_for.get(chosen, int(limit)) if kind == "size" else None},
      "sensitivity": {"examples": len(val), "base_loss": sens.base_loss,
                      "base_accuracy": sens.base_accuracy, "evaluations": len(sens.measured),
                      "compiles": compiles, "seconds": round(scan_seconds, 1),
                      "joint": bool(config.scan.joint), "damage": config.scan.damage,
                      "adapt_norms": bool(config.scan.adapt_norms), "hessian": hessian},
      "one_shot": whole_plans,
      "candidates": {name: {"plan": p.to_list(), "predicted_size_bytes": p.size_bytes,
                            "predicted_damage": p.damage, "one_shot": one_shot[name]}
                     for name, (_, p) in candidates.items()},
      "chosen": chosen,
      "original": next(iter(out.values()))["original"],
      "compressed": row(out["auto"], plan.bops) if "auto" in out else None,  # uniform.only
  }
  if config.uniform.enabled and uniform is None:
    results["uniform"] = None  # one bit width and one sparsity cannot reach this budget
  elif uniform is not None:
    results["uniform"] = {**row(out["uniform"], uniform["bops"]),
                          "sparsity": uniform["sparsity"], "weight_bits": uniform["weight_bits"],
                          "predicted_size_bytes": uniform["size_bytes"],
                          "sized_for": (sized_for.get("uniform", int(limit)) if kind == "size"
                                        else None),
                          "recipe": uniform["recipe"]}
  results["seconds"] = round(time.time() - started, 1)
  write_report(workdir, results, sens)
  write_json(os.path.join(workdir, "results.json"), results)  # last: the point is done
  return results


def _threshold_plan(sens, by_path, weights, plannable, cost, overhead, found, name):
  """The :class:`budget.Plan` of one :func:`budget.threshold_plans` result (``kernel``: the
  layers with kernels share the threshold in training, sized by ``shared_kernel_bytes``)."""
  g, sparsity, layer_bits, _ = found
  shared = [p for p in sparsity if name == "kernel" and budget_lib.has_kernels(by_path[p])]
  window = budget_lib.kernel_window([by_path[p] for p in shared])
  # the shared threshold's kernels (a stacked conv's steps ranked with the rest, as in training)
  kernels = dict(zip(shared, budget_lib.kernel_keep([weights[p] for p in shared], g,
                                                    [by_path[p] for p in shared])))
  layers = []
  for p in sens.paths:
    act = plannable[p][0].act_bits  # a size budget searches no input bits
    s, b = sparsity.get(p, 0.0), layer_bits.get(p, 8)  # a layer left out: dense, 8 bits
    size, bops = cost(p, budget_lib.Option(s, b, act))
    if p in shared:
      size = budget_lib.shared_kernel_bytes(kernels[p], b, window, by_path[p].window_axes)
    layers.append(budget_lib.LayerPlan(p, by_path[p].weight, s, b, act, size, bops,
                                       sens.predict(p, s, b)))
  if not shared:
    return budget_lib.Plan(tuple(layers), "unstructured", overhead)
  return budget_lib.Plan(tuple(layers), "kernel", overhead,
                         shared=tuple(by_path[p].weight for p in shared), shared_sparsity=g)


def _one_shot(evaluate, base_loss: float, keeps: dict, weight_bits: dict, act_bits: dict) -> dict:
  """A whole plan's held-out damage (loss over the float model's) and accuracy, not fine-tuned."""
  loss, accuracy = evaluate(keeps, weight_bits, act_bits)
  return {"damage": loss - base_loss, "accuracy": 100 * accuracy}


def _hessian_ranking(model, variables, held_out, sample, sens, preset, config) -> dict:
  """The Hessian-trace proxy's damage against the measured one: Spearman over every option of
  every layer, and over the layers for each (sparsity, bits) column all layers share (median)."""
  t0 = time.time()
  traces = budget_lib.hessian_traces(model, variables, held_out, sens.paths,
                                     samples=config.scan.hessian_samples, seed=config.seed)
  proxy = budget_lib.proxy_damage(model, variables, sample, traces, dict(zip(sens.paths,
                                  sens.options)), structure=preset.structure,
                                  per_channel=config.quant.per_channel)
  measured = np.concatenate(sens.damage)
  predicted = np.concatenate([proxy[p] for p in sens.paths])
  columns = set.intersection(*(set(o) for o in sens.options)) - {budget_lib.Option(0.0, 0, 8)}
  per_column = []
  for option in sorted(columns):
    k = [opts.index(option) for opts in sens.options]
    per_column.append(budget_lib.spearman([d[i] for d, i in zip(sens.damage, k)],
                                          [proxy[p][i] for p, i in zip(sens.paths, k)]))
  per_column = [r for r in per_column if np.isfinite(r)]  # a constant column has no ranking
  overall = budget_lib.spearman(measured, predicted)
  return {"samples": int(config.scan.hessian_samples), "seconds": round(time.time() - t0, 1),
          "spearman_options": overall if np.isfinite(overall) else None,
          "spearman_layers": float(np.median(per_column)) if per_column else None,
          "columns": len(per_column), "traces": traces}
