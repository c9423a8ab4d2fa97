"""Pruning sensitivity: how much accuracy each sparsity costs, without and with fine-tuning.

Two studies of a trained model, each driven by a config and returning a JSON-ready dict:

* :func:`one_shot_sensitivity` (``configs/prune_sensitivity.py``): magnitude masks at every
  sparsity and scope, evaluated with no fine-tuning. :func:`sweep` is its config-free core; one
  compiled eval step serves the dense model and every pruned one (only values change).
* :func:`iterative_search` (``configs/iterative_prune.py``): rounds of prune -> fine-tune ->
  validate (:func:`jaxcompress.pruning.iterative_prune`) with validation on a held-out slice of the
  *training* split; the sparsest model within the tolerance is then evaluated once on the test
  split. Each round fine-tunes with :func:`jaxcompress.pruning.prune` holding the round's zeros
  at exactly zero (:func:`keep_nonzero`), so one compiled train step serves every round; each
  round's checkpoints go to ``WORKDIR/round_<r>``, so a rerun with the same command resumes.

Example:
  >>> def evaluate(p):
  ...   predicted = model.apply({**variables, "params": p}, x[:64]).argmax(-1)
  ...   return {"accuracy": float((predicted == y[:64]).mean() * 100), "loss": loss(p, batch)}
  >>> rows = sweep(params, evaluate, [0.5, 0.9], ["layer", "global"])
  >>> for r in rows:  # of the 3*3*3*8 + 3*3*8*16 + 16*10 = 1528 kernel entries
  ...   print(r["scope"], r["sparsity"], r["pruned"], r["prunable"], 0 <= r["accuracy"] <= 100)
  layer 0.5 764 1528 True
  layer 0.9 1375 1528 True
  global 0.5 764 1528 True
  global 0.9 1375 1528 True
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import data as data_lib
from jaxcompress import datasets, parallel, precision, pruning
from jaxcompress.checkpoint import check_workdir, read_json, write_json
from jaxcompress.data import DataSpec
from jaxcompress.errors import invalid, shortened, unknown
from jaxcompress.models import create_model, get_model
from jaxcompress.models.functional import functional
from jaxcompress.models.weights import check_dataset, weights_format
from jaxcompress.optim import OptimizerSpec, make_optimizer
from jaxcompress.pruning.masks import SCOPES, check_sparsities
from jaxcompress.pruning.select import compile_rules
from jaxcompress.rules import Rule
from jaxcompress.selection import trace_layers
from jaxcompress.steps import TrainState, make_eval_step, make_train_step, supervised_loss
from jaxcompress.tables import markdown_table
from jaxcompress.train import LoopSpec, evaluate_split, fit, load_data


def zero_count(tree: Any, rules: Sequence[Rule] | None = None) -> tuple[int, int]:
  """``(zeros, size)`` over the leaves of ``tree`` that ``rules`` select (the prunable ones).

  The totals of :func:`jaxcompress.pruning.summary`. ``tree`` is a parameter or mask tree; with
  masks, zeros are pruned entries.
  """
  s = pruning.summary(tree, rules)
  return s.size - s.nonzero, s.size


def sweep(params: Any, evaluate: Callable[[Any], dict], sparsities: Sequence[float],
          scopes: Sequence[str], *, rules: Sequence[Rule] | None = None) -> list[dict]:
  """Evaluates ``params`` magnitude-pruned at every ``(scope, sparsity)``, with no fine-tuning.

  Args:
    params: trained parameters.
    evaluate: ``params -> {'accuracy': ..., 'loss': ..., 'nonfinite': ..., ...}``
      (:func:`jaxcompress.steps.evaluate`'s fields).
    sparsities: targets in [0, 1).
    scopes: ``"layer"`` and/or ``"global"`` (see :func:`jaxcompress.pruning.magnitude_masks`).
    rules: leaf selection; ``None``: every floating-point leaf of rank >= 2 but a
      ``bias`` or ``scale``.

  Returns:
    One row per scope and sparsity, in that order: ``{'scope', 'sparsity', 'pruned',
    'prunable', 'achieved', 'model_sparsity', 'accuracy', 'loss', 'nonfinite'}``; the counts of
    :func:`sparsity_counts` over the evaluated (pruned) parameters; ``nonfinite``, the examples
    whose logits hold NaN or Inf (counted wrong), ``None`` where ``evaluate`` does not count
    them.
  """
  rows = []
  for scope in scopes:
    for sparsity in sparsities:
      masks = pruning.magnitude_masks(params, sparsity, scope=scope, rules=rules)
      pruned = pruning.apply_masks(params, masks)
      metrics = evaluate(pruned)
      rows.append({"scope": scope, "sparsity": float(sparsity), **sparsity_counts(pruned, rules),
                   "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                   "nonfinite": metrics.get("nonfinite")})
  return rows


def sparsity_counts(params: Any, rules: Sequence[Rule] | None = None) -> dict:
  """``{'pruned', 'prunable', 'achieved', 'model_sparsity'}`` of a parameter tree: ``pruned``
  counts the zero entries among the ``prunable`` ones (those ``rules`` select), whether a mask
  zeroed them or the weights held them already; ``achieved`` is their fraction,
  ``model_sparsity`` their fraction of all parameters."""
  pruned, prunable = zero_count(params, rules)
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  return {"pruned": pruned, "prunable": prunable, "achieved": pruned / prunable,
          "model_sparsity": pruned / total}


def _rules(prune_cfg) -> list | None:
  """The config's rule list (``None`` for ``()``: the model's policy), compiled to validate it."""
  rules = list(prune_cfg.rules) or None
  compile_rules(rules)  # before tuple(): a number is no pair, a string not its characters
  return rules and [tuple(r) for r in rules]


def _policy(rules, model, variables, image_shape) -> list:
  """``rules``, or the library's policy for this model: every linear-like layer's weight, the
  first and last in forward order dense (:mod:`jaxcompress.selection`). Rules that select no
  weight are refused: there would be nothing to prune."""
  sample = np.zeros((1, *image_shape), np.float32)
  if rules is None:
    return trace_layers(model, variables, sample, field="model.name").prune_rules()
  with warnings.catch_warnings():  # the rules' own warning would repeat this error
    warnings.simplefilter("ignore")
    _, selected = zero_count(variables["params"], rules)
  if not selected:
    weights = [l.weight for l in trace_layers(model, variables, sample).layers]
    raise invalid("prune.rules", tuple(tuple(r) for r in rules), "rules that select at least "
                  f"one weight to prune (e.g. {shortened(weights, 3)})")
  return rules


def _check_scope(field: str, scope: str) -> None:
  if scope not in SCOPES:
    raise unknown(field, scope, SCOPES)


def _build(config, mesh):
  """The model, its variables and one compiled eval step."""
  spec = datasets.dataset_spec(config.data.name)
  model, variables = create_model(config.model.name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, weights=config.model.weights,
                                  seed=config.get("seed", 0))
  eval_step = make_eval_step(lambda v, x, fm=functional(model): fm.apply(v, x)[0], mesh=mesh)
  return model, variables, eval_step


def one_shot_sensitivity(config) -> dict:
  """One-shot magnitude pruning of a trained model, no fine-tuning (``configs/prune_sensitivity``).

  Returns:
    ``{'model', 'weights', 'dataset', 'split', 'examples', 'dense': {'accuracy', 'loss',
    'nonfinite', 'pruned', 'prunable', 'achieved', 'model_sparsity'}, 'results': [row of
    :func:`sweep`, ...], 'eval_compiles', 'seconds'}``; ``dense`` counts the zeros the weights
    hold. ``eval_compiles`` counts the compilations of the eval step (1: every evaluation reused
    the first one).

  Raises:
    ConfigError: for a bad sparsity, scope, rule, model, dataset, weights file or missing data,
      all checked before any data is decoded.
  """
  t0 = time.perf_counter()
  check_sparsities(config.prune.sparsities, "prune.sparsities")
  if not len(config.prune.scopes):
    raise invalid("prune.scopes", config.prune.scopes, "a non-empty list of layer, global")
  for i, scope in enumerate(config.prune.scopes):
    _check_scope(f"prune.scopes[{i}]", scope)
  rules = _rules(config.prune)
  data = DataSpec.from_mapping(config.data)  # the edge: the config section becomes a typed spec
  get_model(config.model.name, inputs="images")
  check_dataset(config.model.weights, data.name)
  if config.model.weights:
    weights_format(config.model.weights, field="model.weights")
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
  model, variables, eval_step = _build(config, mesh)
  rules = _policy(rules, model, variables, datasets.dataset_spec(config.data.name).image_shape)
  params = variables.pop("params")
  split = data_lib.load_split(config.data.name, config.data.eval_split,
                              data_dir=config.data.data_dir, field="data.eval_split")
  model_state = parallel.replicate(mesh, variables)


  def evaluate(p, desc="eval"):
    return evaluate_split(eval_step, {"params": parallel.replicate(mesh, p), **model_state},
                          split, data, mesh=mesh, desc=desc)

  dense = evaluate(params, "dense")
  rows = sweep(params, evaluate, config.prune.sparsities, config.prune.scopes, rules=rules)
  return {"model": config.model.name, "weights": config.model.weights,
          "dataset": config.data.name, "split": config.data.eval_split,
          "examples": dense["examples"],
          "dense": {"accuracy": dense["accuracy"], "loss": dense["loss"],
                    "nonfinite": dense["nonfinite"], **sparsity_counts(params, rules)},
          "results": rows,
          "eval_compiles": eval_step._cache_size(),  # pylint: disable=protected-access
          "seconds": round(time.perf_counter() - t0, 2)}


def one_shot_table(result: dict) -> str:
  """A markdown table of :func:`one_shot_sensitivity`'s result: dense row, then each point."""
  d = result["dense"]
  dense = d["accuracy"]
  rows = [("dense", "0.00", f"{d['achieved']:.4f}", f"{d['model_sparsity']:.4f}", f"{dense:.2f}",
           "")]
  rows += [(r["scope"], f"{r['sparsity']:.2f}", f"{r['achieved']:.4f}",
            f"{r['model_sparsity']:.4f}", f"{r['accuracy']:.2f}", f"{r['accuracy'] - dense:+.2f}")
           for r in result["results"]]
  return markdown_table(("scope", "target sparsity", "achieved (pruned layers)", "whole model",
                         "test accuracy", "change"), rows, align="lrrrrr")


def keep_nonzero(paths: Sequence[str], scores: Sequence[jax.Array], sparsity) -> list[jax.Array]:
  """Masker that keeps exactly the entries with a non-zero score, whatever the sparsity.

  With the magnitude score it freezes the zeros a parameter tree already has: a round of
  :func:`iterative_search` hands the optimizer weights pruned by ``iterative_prune``'s masks, and
  this masker makes :func:`jaxcompress.pruning.prune` keep precisely those entries at zero. The
  target sparsity is thus data (the zeros), not a constant of the optimizer, so one compiled
  train step serves every round.
  """
  del paths, sparsity
  return [s > 0 for s in scores]  # |w| > 0; the wrapper scores what it pruned already -inf


def iterative_search(config, workdir: str) -> dict:
  """Iterative prune -> fine-tune -> validate; the sparsest model within tolerance, tested once.

  Round ``r`` prunes the previous round's weights to ``prune.sparsities[r]`` (magnitude,
  ``prune.scope``), fine-tunes them ``train.epochs`` epochs with :func:`jaxcompress.pruning.prune`
  holding the pruned entries at zero (fresh optimizer state each round, so the learning-rate
  schedule restarts), and validates; the first round more than ``prune.tolerance`` points below
  the dense model ends the search. Validation reads the last ``data.val_examples`` training
  examples (held out from fine-tuning), or, when ``prune.val_split`` names a split, that split,
  which must then be disjoint from ``data.eval_split``: a model pretrained on the *whole* training
  split has memorised its last examples (ResNet-20: 99.8 % on them), so they measure how much
  memorisation survives, not generalisation; ``val_split="test[:5000]"`` with
  ``eval_split="test[5000:]"`` validates and reports on disjoint halves of the test split.
  Writes ``WORKDIR/results.json``; ``WORKDIR/round_<r>`` holds each round's checkpoints and
  ``metrics.jsonl``, so a rerun with the same command resumes; a rerun of a finished search
  returns its ``results.json``.

  Returns:
    ``{'model', 'dataset', 'scope', 'tolerance', 'val_split', 'val_examples', 'eval_split',
    'dense_val_accuracy', 'dense_val_nonfinite',
    'history': [{'round', 'sparsity', 'val_accuracy', 'val_nonfinite', 'within_tolerance',
    'pruned', 'prunable', 'achieved', 'steps', 'seconds'}, ...], 'sparsity', 'pruned',
    'prunable', 'val_accuracy', 'test_accuracy', 'test_loss', 'test_nonfinite',
    'dense_test_accuracy', 'dense_test_nonfinite', 'test_examples', 'train_compiles',
    'seconds'}``. ``sparsity`` is the chosen round's target (0 when even the first round fails);
    ``pruned``/``prunable`` count its zeroed entries among the selected ones; each ``nonfinite``
    counts the examples of that evaluation whose logits hold NaN or Inf (counted wrong).

  Raises:
    ConfigError: for a bad config (checked before any data is decoded) or a workdir holding
      another config's run.
  """
  t0 = time.perf_counter()
  check_sparsities(config.prune.sparsities, "prune.sparsities", increasing=True)
  _check_scope("prune.scope", config.prune.scope)
  if not 0 <= config.prune.tolerance < float("inf"):  # a NaN fails every round
    raise invalid("prune.tolerance", config.prune.tolerance, "a number >= 0 (accuracy points)")
  if config.prune.val_split:
    if config.data.val_examples:
      raise invalid("data.val_examples", config.data.val_examples,
                    f"0 when prune.val_split={config.prune.val_split!r} is set",
                    "validate on one of them")
    shared = data_lib.shared_examples(config.data.name, config.prune.val_split,
                                      config.data.eval_split, data_dir=config.data.data_dir)
    if shared:
      raise invalid("prune.val_split", config.prune.val_split,
                    f"a split disjoint from data.eval_split={config.data.eval_split!r} (they "
                    f"share {shared:,} examples)",
                    "e.g. val_split='test[:5000]' with eval_split='test[5000:]'")
  elif config.data.val_examples <= 0:
    raise invalid("data.val_examples", config.data.val_examples, "> 0 (or set prune.val_split)",
                  "rounds are validated on held-out examples, never on the reported split")
  rules = _rules(config.prune)
  data = DataSpec.from_mapping(config.data)  # the edge: config sections become typed specs
  opt_spec, loop = OptimizerSpec.from_mapping(config.train), LoopSpec.from_mapping(config.train)
  precision.compute_dtype(config.train.compute_dtype)
  get_model(config.model.name, inputs="images")
  check_dataset(config.model.weights, data.name)
  if config.model.weights:
    weights_format(config.model.weights, field="model.weights")
  mesh = parallel.make_mesh()
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(config.data[field], mesh, f"data.{field}")

  splits = load_data(data)  # a bad split or data folder is refused before the model's compile
  if config.prune.val_split:
    splits["val"] = data_lib.open_split(config.data.name, config.prune.val_split,
                                        data_dir=config.data.data_dir, field="prune.val_split")
    if not len(splits["val"]):
      raise invalid("prune.val_split", config.prune.val_split, "a split with examples")
    trained = data_lib.first_examples(data.name, data.train_split, len(splits["train"]),
                                      data_dir=data.data_dir)
    shared = data_lib.shared_examples(data.name, config.prune.val_split,
                                      trained or data.train_split, data_dir=data.data_dir)
    if shared:  # examples the rounds fine-tune on would validate them
      common = f"{trained}; they share {shared:,} examples" if trained else data.train_split
      raise invalid("prune.val_split", config.prune.val_split,
                    f"a split disjoint from the examples fine-tuned on ({common})",
                    "e.g. val_split='test[:5000]' with eval_split='test[5000:]'")
  per_epoch = data_lib.steps_per_epoch(len(splits["train"]), data.batch_size)
  steps = int(round(loop.epochs * per_epoch))
  if steps < 1:
    raise invalid("train.epochs", loop.epochs,
                  f"at least one step per round (>= 1/{per_epoch} epoch)")
  model, variables, eval_step = _build(config, mesh)
  rules = _policy(rules, model, variables, datasets.dataset_spec(config.data.name).image_shape)
  dense_params = variables.pop("params")
  # Weights, data and splits checked: only now write.
  check_workdir(config, workdir)
  done = read_json(os.path.join(workdir, "results.json"))
  if done:  # a finished search: its results, nothing evaluated again
    return done
  # Outermost: the train step applies its updates unchanged, so no contract check is needed.
  optimizer = pruning.prune(make_optimizer(opt_spec, per_epoch),
                            pruning.constant_schedule(0.0), structure=keep_nonzero,
                            rules=rules, update_every=steps, check_updates=False)
  # Every round's fine-tuning starts at step 0, and the step's key is folded from the step: the
  # round is folded in too (an input of the one compiled step), or each round would draw round
  # 0's keys (dropout masks) step for step.
  loss = supervised_loss(model, config.train.compute_dtype)
  train_step = make_train_step(
      lambda params, model_state, batch, rng, r: loss(params, model_state, batch,
                                                      jax.random.fold_in(rng, r)),
      optimizer, mesh=mesh, seed=config.seed, num_aux=1,
      skip_nonfinite=config.train.skip_nonfinite)
  # Non-trainable state (BatchNorm statistics) after each round, on the host; -1 is dense.
  model_states = {-1: jax.device_get(variables)}
  current = [-1]  # the round whose model state goes with the parameters being evaluated
  rounds, counts, nonfinite = [], [], []  # nonfinite: of each validation, the dense one first

  def finetune(params, masks, r):
    del masks  # ``params`` arrive pruned; keep_nonzero keeps exactly their zeros at zero
    state = TrainState.create(params, jax.tree.map(jnp.asarray, model_states[current[0]]),
                              optimizer)
    state, info = fit(state, train_step, splits["train"], data, loop,
                      os.path.join(workdir, f"round_{r}"), seed=config.seed + r, mesh=mesh,
                      desc=f"round {r}: {config.prune.sparsities[r]:.0%}",
                      step_args=(parallel.replicate(mesh, np.int32(r)),))
    model_states[r] = jax.device_get(state.model_state)
    current[0] = r
    rounds.append({"steps": info["steps"], "seconds": round(info["seconds"], 2)})
    return state.params

  def evaluate(params, split, desc):
    variables = {"params": params, **model_states[current[0]]}
    return evaluate_split(eval_step, parallel.replicate(mesh, variables), splits[split], data,
                          mesh=mesh, desc=desc)

  def validate(params):
    counts.append(zero_count(params, rules))
    metrics = evaluate(params, "val", "validate")
    nonfinite.append(metrics["nonfinite"])
    return metrics["accuracy"]

  result = pruning.iterative_prune(
      dense_params, config.prune.sparsities, finetune, validate, tolerance=config.prune.tolerance,
      mask_fn=lambda p, s: pruning.magnitude_masks(p, s, scope=config.prune.scope, rules=rules))

  history = []
  for rnd, extra, (pruned, prunable), bad in zip(result.history, rounds, counts[1:],
                                                 nonfinite[1:]):
    history.append({"round": rnd.index, "sparsity": rnd.sparsity, "val_accuracy": rnd.accuracy,
                    "val_nonfinite": bad, "within_tolerance": rnd.within_tolerance,
                    "pruned": pruned, "prunable": prunable, "achieved": pruned / prunable,
                    **extra})
  current[0] = max([h["round"] for h in history if h["within_tolerance"]], default=-1)
  test = evaluate(result.params, "eval", "test")
  current[0] = -1
  dense_test = evaluate(dense_params, "eval", "test (dense)")
  pruned, prunable = zero_count(result.params, rules)
  # The held-out examples as a split spec TFDS reads back (absolute, whatever train_split is)
  val_split = config.prune.val_split or data_lib.last_examples(
      data.name, data.train_split, len(splits["val"]), data_dir=data.data_dir) or (
          f"{data.train_split}[-{len(splits['val'])}:]")
  out = {"model": config.model.name, "dataset": config.data.name, "scope": config.prune.scope,
         "tolerance": config.prune.tolerance, "val_split": val_split,
         "val_examples": len(splits["val"]), "eval_split": config.data.eval_split,
         "dense_val_accuracy": result.dense_accuracy, "dense_val_nonfinite": nonfinite[0],
         "history": history, "sparsity": result.sparsity, "pruned": pruned, "prunable": prunable,
         "val_accuracy": result.accuracy, "test_accuracy": test["accuracy"],
         "test_loss": test["loss"], "test_nonfinite": test["nonfinite"],
         "dense_test_accuracy": dense_test["accuracy"],
         "dense_test_nonfinite": dense_test["nonfinite"], "test_examples": test["examples"],
         "train_compiles": train_step._cache_size(),  # pylint: disable=protected-access
         "seconds": round(time.perf_counter() - t0, 2)}
  write_json(os.path.join(workdir, "results.json"), out)
  return out


def iterative_table(result: dict) -> str:
  """A markdown table of :func:`iterative_search`'s rounds, then the chosen model's test line."""
  dense = result["dense_val_accuracy"]
  rows = [("dense", "0.00", f"{dense:.2f}", "", "", "", "")]
  rows += [(h["round"], f"{h['sparsity']:.2f}", f"{h['val_accuracy']:.2f}",
            f"{h['val_accuracy'] - dense:+.2f}", "yes" if h["within_tolerance"] else "no",
            h["steps"], f"{h['seconds']:.0f}") for h in result["history"]]
  table = markdown_table(("round", "sparsity", "val accuracy", "change", "within tolerance",
                          "fine-tune steps", "seconds"), rows, align="lrrrcrr")
  test = (f"chosen sparsity {result['sparsity']:.2f} (tolerance {result['tolerance']} points): "
          f"test accuracy {result['test_accuracy']:.2f} (dense "
          f"{result['dense_test_accuracy']:.2f}) on {result['test_examples']} test examples")
  return "\n".join([table, "", test])
