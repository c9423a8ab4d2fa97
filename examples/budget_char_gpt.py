"""Plan a character transformer to a byte budget with the library alone, against the uniform recipe.

The budget job (``experiments.autocompress``) reads images. This example takes its steps on a
model it does not read, the decoder-only transformer of the text jobs: the sensitivity of every
attention and MLP kernel on held-out windows of the validation split (one compilation), plans of
per-layer (sparsity, weight bits) at a byte budget (exact allocation over the layers' own options,
and bits at one global magnitude threshold; the less damaged whole is kept), the uniform recipe at
the same bytes (one global magnitude sparsity, one bit width), and both fine-tuned with KD and
exported by ``experiments.shakespeare_distill``. The token embedding and the head stay dense at 8
bits in both, as the text job keeps them; the budget counts the planned kernels' bytes.

  export JAXCOMPRESS_TEXT_DIR=../shared/text
  python -m experiments.train_lm --config=configs/shakespeare.py:quick --workdir=runs/lm_quick
  python -m examples.budget_char_gpt --trained=runs/lm_quick --ratio=24 --workdir=runs/lm_budget24

Writes ``WORKDIR/results.json`` (and prints it) and ``WORKDIR/report.md``: the budget, the plan
per layer and the uniform recipe, their damage on the held-out windows before fine-tuning, and
each text-job run's test loss and artifact bytes (``WORKDIR/plan`` and ``WORKDIR/uniform`` hold
those runs; rerunning resumes them). Measured (docs/autocompress.md): at 24x of the kernels'
bytes the plan ends at 1.761 nats per character on the test split against the uniform recipe's
1.786, at 40x 1.848 against 1.917 (seed 0). ``--trained`` may be any ``train_lm`` run, the
LSTM's too.
"""

import functools
import os

import numpy as np
from absl import flags

from experiments import cli

_TRAINED = flags.DEFINE_string("trained", None, "Workdir of a finished train_lm run.",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
_RATIO = flags.DEFINE_float("ratio", 12.0, "Budget: the planned kernels' float32 bytes / ratio.")
_STEPS = flags.DEFINE_integer("steps", 600, "KD fine-tuning steps of each plan.")
_TEXT = flags.DEFINE_string("text", "", "The text file (default: $JAXCOMPRESS_TEXT_DIR).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Training windows per step.")
_HELD_OUT = flags.DEFINE_integer("held_out", 64, "Validation windows the scan measures on.")
_SEED = flags.DEFINE_integer("seed", 0, "Fine-tuning seed (training windows).")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BITS = (3, 4, 8)


def text_config(fields: dict, context: int, model):
  """``shakespeare_distill``'s quick config for one plan: KD only, no second family, no samples;
  the teacher is the ``--trained`` run, whose ``model`` section (a transformer's or an LSTM's)
  the job's family takes."""
  import ml_collections

  from configs import shakespeare_distill
  c = shakespeare_distill.get_config("quick").to_dict()
  c["seed"] = _SEED.value
  c["teacher"]["checkpoint"] = _TRAINED.value
  c["teacher"]["model"] = model.to_dict()
  c["data"].update(path=_TEXT.value, context=context, batch_size=_BATCH.value,
                   eval_batch_size=2 * _BATCH.value)
  c["train"]["steps"] = _STEPS.value
  c["lstm"]["enabled"], c["sft"], c["sample"]["length"] = False, False, 0
  c["prune"].update(fields["prune"])
  c["quant"].update(fields["quant"])
  return ml_collections.ConfigDict(c)


def main(argv):
  del argv
  from experiments import lm_lib, lm_pipeline
  from jaxcompress import budget, text
  from jaxcompress.checkpoint import write_json, write_text
  from jaxcompress.errors import invalid
  from jaxcompress.rules import tree_get
  from jaxcompress.selection import trace_layers

  if not _RATIO.value > 1:
    raise invalid("--ratio", _RATIO.value, "> 1")
  for flag in (_STEPS, _BATCH, _HELD_OUT):
    if flag.value < 1:
      raise invalid(f"--{flag.name}", flag.value, ">= 1")
  module, variables, vocab, model, context = lm_lib.load_trained(_TRAINED.value, "--trained")
  corpus = text.load_corpus(text.text_path(_TEXT.value), context, vocab=vocab, field="--text")
  windows = (len(corpus.ids["validation"]) - 1) // context
  if _HELD_OUT.value > windows:
    raise invalid("--held_out", _HELD_OUT.value, f"at most {windows}: the validation split's "
                  f"windows of {context} characters")
  val = corpus.ids["validation"][:_HELD_OUT.value * context + 1]
  held_out = list(text.eval_batches(val, batch_size=_BATCH.value, context=context))
  calibration = lm_lib.real_windows(held_out)
  layers = trace_layers(module, variables, calibration[0]).layers
  inner = [l for l in layers[1:-1] if l.kind == "linear"]  # the text job's edges stay 8-bit
  weights = {l.path: np.asarray(tree_get(variables["params"], l.weight)) for l in inner}
  limit = int(sum(4 * w.size for w in weights.values()) / _RATIO.value)
  preset = budget.get_preset("any")
  options = {l.path: preset.layer_options(l, last=False, sparsities=SPARSITIES,
                                          weight_bits=BITS, act_bits=(8,)) for l in inner}
  sens = budget.scan(module, variables, held_out, options, calibration=calibration,
                     joint=True, damage="kl")
  by_path = {l.path: l for l in inner}  # each layer's axes (and steps, where nn.scan stacks it)
  keep = functools.cache(  # one per (layer, s)
      lambda p, s: budget.keep_mask(weights[p], s, "unstructured", by_path[p]))

  def plan_of(choice: dict) -> budget.Plan:  # path -> (sparsity, bits)
    return budget.Plan(tuple(
        budget.LayerPlan(l.path, l.weight, s, b, 8, budget.weight_bytes(keep(l.path, s), b), 0,
                         sens.predict(l.path, s, b))
        for l in inner for s, b in [choice[l.path]]), "unstructured", overhead=0)

  costs = [[budget.weight_bytes(keep(p, o.sparsity), o.weight_bits) for o in opts]
           for p, opts in zip(sens.paths, sens.options)]
  alloc = budget.allocate(costs, sens.damage, limit)
  candidates = {}
  if alloc is not None:
    candidates["layer"] = plan_of({p: (opts[k].sparsity, opts[k].weight_bits)
                                   for p, opts, k in zip(sens.paths, sens.options, alloc.choice)})
  found = budget.global_bits(weights, budget=limit, bits=BITS, predict=sens.predict,
                             sparsities=np.round(np.arange(0.0, 0.995, 0.005), 3),
                             layers=by_path)
  if found is not None:
    _, sparsity, bits, _ = found
    candidates["global"] = plan_of({p: (sparsity[p], bits[p]) for p in weights})
  uniform = budget.uniform_size(weights, list(weights), overhead=0, budget=limit, bits=BITS,
                                predict=sens.predict, layers=by_path)
  if not candidates or uniform is None:
    raise invalid("--ratio", _RATIO.value, "a budget these kernels can reach at "
                  f"{min(BITS)} bits and {max(SPARSITIES):.0%} sparsity")
  evaluate = budget.Evaluator(module, variables, held_out, calibration=calibration, damage="kl")
  base, _ = evaluate({}, {}, {})

  def damage(keeps: dict, bits: dict) -> float:  # a whole plan, before fine-tuning
    return evaluate(keeps, bits, {p: 8 for p in bits})[0] - base

  one_shot = {name: damage({l.path: keep(l.path, l.sparsity) for l in p.layers if l.sparsity},
                           {l.path: l.weight_bits for l in p.layers})
              for name, p in candidates.items()}
  chosen = min(one_shot, key=one_shot.get)
  plan = candidates[chosen]
  s, b, uniform_keeps, uniform_bytes = uniform  # one global magnitude threshold
  uniform_fields = {
      "prune": {"method": "magnitude", "structure": "unstructured", "scope": "global",
                "schedule": "one_shot", "begin": 0.0, "sparsity": s, "layer_sparsity": (),
                "rules": budget.only_rules(l.weight for l in inner)},
      "quant": {"weight_bits": int(b), "act_bits": 8, "first_last_bits": 8, "layer_bits": ()}}
  runs = {"plan": {"prune": plan.prune_fields(), "quant": plan.quant_fields()},
          "uniform": uniform_fields}
  out = {name: lm_pipeline.train_and_evaluate(text_config(fields, context, model),
                                              os.path.join(_WORKDIR.value, name))
         for name, fields in runs.items()}
  row = lambda r: {k: r["compressed"][k] for k in (  # noqa: E731
      "loss_test", "bits_test", "nonfinite_test", "size_bytes", "compression_ratio",
      "export_agreement")}
  results = {
      "budget": {"ratio": _RATIO.value, "kernel_bytes": limit},
      "teacher": {k: out["plan"]["teacher"][k] for k in ("loss_test", "bits_test",
                                                          "nonfinite_test", "size_bytes")},
      "plan": {"chosen": chosen, "layers": plan.to_list(), "kernel_bytes": plan.size_bytes,
               "one_shot_damage": one_shot[chosen], **row(out["plan"])},
      "uniform": {"sparsity": s, "weight_bits": int(b), "kernel_bytes": int(uniform_bytes),
                  "one_shot_damage": damage(uniform_keeps if s else {},
                                            {p: int(b) for p in weights}),
                  **row(out["uniform"])},
      "candidates": one_shot, "held_out_windows": len(val) // context,
      "scan": {"evaluations": len(sens.measured), "compiles": sens.compiles}}
  write_text(os.path.join(_WORKDIR.value, "report.md"), report(results))
  write_json(os.path.join(_WORKDIR.value, "results.json"), results)
  cli.print_json(results)


def report(results: dict) -> str:
  """``report.md``: both runs side by side, then the plan per layer."""
  from jaxcompress.tables import markdown_table
  b, p, u = results["budget"], results["plan"], results["uniform"]
  rows = [("float32 teacher", f"{results['teacher']['loss_test']:.4f}", "-",
           f"{results['teacher']['size_bytes']:,}", "-")]
  rows += [(name, f"{r['loss_test']:.4f}", f"{r['kernel_bytes']:,}", f"{r['size_bytes']:,}",
            f"{r['one_shot_damage']:.4f}")
           for name, r in ((f"plan ({p['chosen']})", p),
                           (f"uniform ({u['sparsity']:.1%}, {u['weight_bits']} bits)", u))]
  layers = [(f"`{l['path']}`", f"{l['sparsity']:.2f}", l["weight_bits"], f"{l['bytes']:,}",
             f"{l['damage']:.4f}") for l in p["layers"]]
  return "\n".join([
      f"# Character model to {b['ratio']:g}x of its kernels' bytes ({b['kernel_bytes']:,})", "",
      markdown_table(("model", "test nats/char", "kernel bytes", "bytes on disk",
                      "damage before fine-tuning"), rows, align="lrrrr"), "",
      "## Plan", "",
      markdown_table(("kernel", "sparsity", "weight bits", "bytes", "predicted damage"), layers),
      ""])


if __name__ == "__main__":
  cli.run(main)
