"""Compressing character-level language models: teacher, PTQ, plain and KD fine-tuning, export.

``train_and_evaluate(config, workdir)`` (``configs/shakespeare_distill.py``) runs, for the
transformer and then (``lstm.enabled``) the LSTM: the teacher (trained into ``WORKDIR/teacher``,
``WORKDIR/lstm/teacher``, unless ``teacher.checkpoint`` names a finished ``train_lm`` run); the
student = the teacher's architecture and weights, compressed by the main job's pieces
(:func:`experiments.pipeline.compression_specs` -> :func:`jaxcompress.compose.build`); its PTQ
evaluation (final masks + calibrated fake quantization, no training); fine-tuning with the composed
step, plainly (transformer only) and with token-level KD; the artifact
(:meth:`~jaxcompress.compose.Compression.export`), reloaded (:func:`jaxcompress.export.load`) and
compared position by position with the fake-quant model; seeded samples. Each stage's result is
kept in ``WORKDIR/stages.json`` and fine-tuning checkpoints under its folder, so rerunning the same
command resumes. Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from experiments import lm_lib
from experiments.lm_train_job import check_data, load_corpus, train_lm
from experiments.pipeline import FLOAT32_BYTES, compression_specs, param_count
from jaxcompress import compose, parallel, pruning, text
from jaxcompress.checkpoint import (Stages, check_workdir, read_json, release_workdir, write_json,
                                   write_text)
from jaxcompress.errors import ConfigError, check_counts, invalid
from jaxcompress.metrics import prediction_agreement
from jaxcompress.models.functional import functional
from jaxcompress.optim import make_optimizer
from jaxcompress.steps import make_eval_step
from jaxcompress.tables import markdown_table
from jaxcompress.train import fit


@dataclasses.dataclass
class Family:
  """One model family's run: its config section (``config`` or ``config.lstm``) and folder."""
  name: str  # "gpt" or "lstm"
  section: ml_collections.ConfigDict  # holds teacher (checkpoint, model, train) and train
  folder: str  # where its teacher, fine-tuning runs and artifacts go
  prefix: str  # of its stage names and fields ("" or "lstm/")
  with_sft: bool  # also fine-tune without the teacher
  model_name: str = ""
  module: object = None
  variables: dict | None = None
  vocab: text.Vocabulary | None = None
  context: int = 0  # the length of its training and evaluation windows
  comps: dict = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    """Its model as the report and the progress bars call it."""
    return _model_label(self.model_name)


def _families(config, workdir: str) -> list[Family]:
  out = [Family("gpt", config, workdir, "", bool(config.sft))]
  if config.lstm.enabled:
    out.append(Family("lstm", config.lstm, os.path.join(workdir, "lstm"), "lstm/", False))
  return out


def _field(fam: Family, name: str) -> str:
  return ("lstm." if fam.name == "lstm" else "") + name


def _context(section, config, field: str) -> int:
  """A family's window length: ``section.context`` (0 or none: ``data.context``), checked."""
  check_counts({"data.context": config.data.context})  # the bound below, and the default
  context = section.get("context") or config.data.context
  if not 1 <= context <= config.data.context:
    raise invalid(field, context, f"in [1, data.context={config.data.context}] (0: data.context)")
  return context


def _prepare(fam: Family, config, corpus: text.Corpus, specs: dict, mesh) -> None:
  """Loads a given teacher (checking its vocabulary and context) or builds an untrained one, and
  builds the plain and KD compressions; every user mistake surfaces here, before any write."""
  t = fam.section.teacher
  fam.context = _context(fam.section, config, _field(fam, "context"))
  if t.checkpoint:
    field = _field(fam, "teacher.checkpoint")
    module, variables, vocab, model, context = lm_lib.load_trained(t.checkpoint, field,
                                                                   can_train=True)
    if model.name != t.model.name:  # the family (its stages and report rows) is its model's
      raise ConfigError(f"{field}: {t.checkpoint!r} holds a {model.name} model, not this "
                        f"family's {_field(fam, 'teacher.model.name')}={t.model.name}; give "
                        f"the workdir of a {t.model.name} run of experiments.train_lm")
    if vocab.chars != corpus.vocab.chars:
      raise ConfigError(f"{field}: the teacher's vocabulary ({vocab.size} characters) differs "
                        f"from the student's ({corpus.vocab.size} characters of the training "
                        f"split of {text.text_path(config.data.path)!r}); distillation needs the "
                        "same vocabulary: train the teacher on the same text")
    if fam.context > context and model.name == "char_gpt":
      raise invalid("data.context", fam.context, f"at most the teacher's context "
                    f"{context} ({t.checkpoint!r})")
  else:
    lm_lib.check_model(t.model, _field(fam, "teacher.model"))
    module, variables = lm_lib.build_model(t.model, corpus.vocab.size, fam.context,
                                           config.seed, _field(fam, "teacher.model"))
    source = text.TrainWindows(corpus.ids["train"], config.data.batch_size, fam.context)
    lm_lib.train_specs(t.train, source.steps_per_epoch, _field(fam, "teacher.train"))
    vocab, model = corpus.vocab, t.model
  fam.model_name = model.name
  fam.module, fam.variables, fam.vocab = module, variables, vocab
  source = text.TrainWindows(corpus.ids["train"], config.data.batch_size, fam.context)
  opt_spec, _ = lm_lib.train_specs(fam.section.train, source.steps_per_epoch,
                                   _field(fam, "train"))
  sample = np.zeros((2, fam.context), np.int32)
  kinds = {"kd": specs["distill"]}
  if fam.with_sft:
    kinds["sft"] = dataclasses.replace(specs["distill"], alpha=0.0, feature_weight=0.0)
  for kind, distill in kinds.items():
    optimizer = make_optimizer(opt_spec, source.steps_per_epoch, decay_mask=compose.decay_mask)
    fam.comps[kind] = compose.build(
        module, variables, sample, optimizer=optimizer, total_steps=fam.section.train.steps,
        prune=specs["prune"], quant=specs["quant"], distill=distill,
        teacher=module if distill.uses_teacher else None)


def calibration_windows(ids: np.ndarray, n: int, batch_size: int, context: int,
                        seed: int) -> list[np.ndarray]:
  """``n`` random training windows (at least one) in batches of at most ``batch_size``."""
  n = max(1, n)
  return [text.train_batch(ids, batch_size=min(batch_size, n - start), context=context,
                           seed=seed, step=i).image
          for i, start in enumerate(range(0, n, batch_size))]


def validate_config(config) -> None:
  """The checks that need no text: sections, names, model fields, steps, sampling."""
  compression_specs(config)
  check_data(config.data)
  families = [("", config)] + ([("lstm.", config.lstm)] if config.lstm.enabled else [])
  for prefix, fam in families:
    _context(fam, config, f"{prefix}context")
    if fam.teacher.checkpoint:
      lm_lib.check_trained(fam.teacher.checkpoint, f"{prefix}teacher.checkpoint", can_train=True)
    else:
      lm_lib.check_model(fam.teacher.model, f"{prefix}teacher.model")
      lm_lib.check_train(fam.teacher.train, f"{prefix}teacher.train")
    lm_lib.check_train(fam.train, f"{prefix}train")
    if fam.train.steps < 1:  # the compressed student is fine-tuned, for one step at least
      raise invalid(f"{prefix}train.steps", fam.train.steps, ">= 1 (the student's fine-tuning)")
  lm_lib.check_sample(config.sample)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole job; returns the ``results.json`` dict."""
  start = time.perf_counter()
  validate_config(config)
  corpus = load_corpus(config.data)
  text.Vocabulary.encode(corpus.vocab, config.sample.prompt, what="sample.prompt")
  mesh = parallel.make_mesh()
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(config.data[field], mesh, f"data.{field}")
  specs = compression_specs(config)
  families = _families(config, workdir)
  for fam in families:
    _prepare(fam, config, corpus, specs, mesh)
  # Every user mistake has surfaced: only now write.
  check_workdir(_run_record(config, corpus, families), workdir)
  stages = Stages(workdir)

  results = {}
  for fam in families:
    out = _run_family(fam, config, corpus, mesh, stages)
    if fam.name == "gpt":
      results.update(out)
    else:
      results["lstm"] = out
  results["seconds"] = round(time.perf_counter() - start, 1)  # this invocation's wall time
  write_text(os.path.join(workdir, "report.md"), format_report(results, config))
  write_json(os.path.join(workdir, "results.json"), results)  # last: the run is complete
  return results


def _run_record(config, corpus: text.Corpus, families: list[Family]) -> dict:
  """What ``check_workdir`` records: :func:`lm_lib.run_record`, and the fingerprint of each given
  teacher's weights as ``teacher.weights`` (``lstm.teacher.weights``), so a rerun after that
  teacher was retrained is refused, not resumed with another teacher."""
  record = lm_lib.run_record(config, corpus)
  for fam in families:
    checkpoint = fam.section.teacher.checkpoint
    if checkpoint:
      section = record["lstm"] if fam.name == "lstm" else record
      section["teacher"]["weights"] = lm_lib.weights_fingerprint(checkpoint)
  return record


def _run_family(fam: Family, config, corpus: text.Corpus, mesh, stage) -> dict:
  """Teacher, PTQ, fine-tuning runs, export and samples of one family; its results."""
  data, p = config.data, fam.prefix
  ids = corpus.ids
  eval_steps = {}  # one compiled eval step per logits function, whatever the split

  def evaluate(fn, variables, split, desc, preds=False):
    if fn not in eval_steps:
      eval_steps[fn] = make_eval_step(fn, mesh=mesh)
    return lm_lib.evaluate_lm(
        eval_steps[fn], parallel.replicate(mesh, variables), ids[split],
        batch_size=data.eval_batch_size, context=fam.context, vocab_size=corpus.vocab.size,
        mesh=mesh, desc=desc, predictions=preds)
  teacher_apply = lambda v, x, fm=functional(fam.module): fm.apply(v, x)[0]

  # Teacher: trained here (a train_lm run in its own folder) or the given one.
  t = fam.section.teacher
  if not t.checkpoint:
    teacher_dir = os.path.join(fam.folder, "teacher")
    tconfig = ml_collections.ConfigDict({"seed": config.seed,
                                         "data": {**data.to_dict(), "context": fam.context},
                                         "model": t.model.to_dict(), "train": t.train.to_dict()})
    # A finished teacher is read back, its folder's lock taken over if a kill left it there.
    train_lm(tconfig, corpus, teacher_dir, mesh=mesh, desc=f"train {fam.label} teacher")
    release_workdir(teacher_dir)  # done with it: a kill later in this process leaves no lock
    fam.module, fam.variables, *_ = lm_lib.load_trained(teacher_dir, _field(fam, "teacher"))

  def teacher_stage():
    row = {"model": fam.model_name,
           "params": param_count(fam.variables["params"]),
           "size_bytes": param_count(fam.variables["params"]) * FLOAT32_BYTES}
    for split in ("validation", "test", "val111k"):
      r = evaluate(teacher_apply, fam.variables, split, f"eval {fam.label} teacher {split}")
      row.update({f"loss_{split}": r["loss"], f"bits_{split}": r["bits"],
                  f"nonfinite_{split}": r["nonfinite"]})
    if not t.checkpoint:
      row["train_seconds"] = read_json(os.path.join(fam.folder, "teacher",
                                                    "results.json"))["train_seconds"]
    return row
  teacher = stage(f"{p}teacher", teacher_stage)
  float_bytes = teacher["size_bytes"]

  calib = calibration_windows(ids["train"], config.quant.calibration_examples,
                              data.eval_batch_size, fam.context, config.seed + 1)

  def init_state(comp):
    return comp.init_state(fam.variables, calib[0], teacher_vars=fam.variables,
                           calibration=calib, calibration_method=config.quant.calibration)

  # PTQ: the final 2:4 masks and calibrated fake quantization, no training.
  kd_comp = fam.comps["kd"]
  ptq_state = init_state(kd_comp)
  if kd_comp.prune_enabled:
    masks = kd_comp.final_masks(ptq_state.params)
    ptq_state = ptq_state.replace(params=pruning.apply_masks(ptq_state.params, masks))
  ptq = stage(f"{p}ptq", lambda: _evaluate_export(
      kd_comp, ptq_state, os.path.join(fam.folder, "ptq", "export"), float_bytes, fam, evaluate))

  runs = {}
  for kind, comp in fam.comps.items():
    state = init_state(comp)
    source = text.TrainWindows(ids["train"], data.batch_size, fam.context)
    _, loop = lm_lib.train_specs(fam.section.train, source.steps_per_epoch)
    step_args = (parallel.replicate(mesh, fam.variables),) if comp.teacher is not None else ()
    run_dir = os.path.join(fam.folder, kind)
    state, info = fit(state, comp.make_train_step(mesh=mesh, seed=config.seed), source, None,
                      loop, run_dir, seed=config.seed, mesh=mesh, step_args=step_args,
                      desc=f"{fam.label} {kind}",
                      eval_fn=lambda s, c=comp: evaluate(c.logits_fn, c.eval_variables(s),
                                                         "validation", "eval validation"))
    row = stage(f"{p}{kind}", lambda: {
        **_evaluate_export(comp, state, os.path.join(run_dir, "export"), float_bytes, fam,
                           evaluate),
        **{f"{k}_val111k": v for k, v in evaluate(comp.logits_fn, comp.eval_variables(state),
                                                   "val111k", "eval val111k").items()
           if k in ("loss", "nonfinite")},
        "train_seconds": info["seconds"], "steps": info["steps"],
        "sparsity": float(comp.sparsity({"model": jax.device_get(state.params["model"])}))})
    runs[kind] = (comp, state, row)

  def samples():
    from jaxcompress import export  # heavy; only needed here and in the export stage
    kw = dict(prompt=config.sample.prompt, length=config.sample.length, context=fam.context,
              seed=config.seed, temperature=config.sample.temperature)
    loaded = export.load(os.path.join(fam.folder, "kd", "export"), fam.comps["kd"].student)
    return {"teacher": lm_lib.sample(teacher_apply, fam.variables, fam.vocab,
                                     desc=f"{p}sample teacher", **kw),
            "compressed": lm_lib.sample(loaded.apply_fn, loaded.arrays, fam.vocab,
                                        desc=f"{p}sample compressed", **kw)}
  out = {"teacher": teacher, "ptq": ptq, "compressed": runs["kd"][2],
         "samples": stage(f"{p}samples", samples)}
  if "sft" in runs:
    out["sft"] = runs["sft"][2]
  for row in ("ptq", "compressed", "sft"):
    if row in out:
      out[row].update(weight_bits=config.quant.weight_bits or 32,
                      act_bits=config.quant.act_bits or 32)
  return out


def _evaluate_export(comp, state, out_dir: str, float_bytes: int, fam: Family, evaluate) -> dict:
  """Exports ``state``'s student, reloads it and evaluates both on the test split.

  Returns:
    The fake-quant model's ``loss_test``, ``bits_test`` and ``nonfinite_test`` (test positions
    whose logits hold NaN or Inf), the artifact's ``size_bytes`` (on disk),
    ``compression_ratio`` (float32 teacher bytes / artifact bytes), its own
    ``exported_loss_test`` and ``exported_nonfinite_test``, and ``export_agreement`` (fraction
    of test positions whose argmax equals the fake-quant model's).
  """
  from jaxcompress import export  # heavy; only the export stages need it
  report = comp.export(out_dir, state, input_shape=(fam.context,), input_dtype="int32",
                       model_name=fam.name)
  write_text(os.path.join(os.path.dirname(out_dir), "export_size.md"),
             export.format_report(report) + "\n")
  loaded = export.load(out_dir, comp.student)
  fq = evaluate(comp.logits_fn, comp.eval_variables(state), "test", "eval fake-quant", True)
  ex = evaluate(loaded.apply_fn, loaded.arrays, "test", "eval exported artifact", True)
  agree = prediction_agreement(fq["predictions"], ex["predictions"])
  size = int(report["total_bytes"])
  return {"loss_test": fq["loss"], "bits_test": fq["bits"], "nonfinite_test": fq["nonfinite"],
          "size_bytes": size, "compression_ratio": round(float_bytes / size, 3),
          "exported_loss_test": ex["loss"], "exported_nonfinite_test": ex["nonfinite"],
          "export_agreement": agree}


def _model_label(model_name: str) -> str:
  """What the report calls a family's model: each family trains the model its config names."""
  return "transformer" if model_name == "char_gpt" else "LSTM"


def format_report(results: dict, config) -> str:
  """``report.md``: the size/loss table and the samples."""
  rows = []

  def add(label, r, bits_label):
    if r is None:
      return
    ratio = f"{r['compression_ratio']:.1f}x" if "compression_ratio" in r else "1.0x"
    rows.append((label, f"{r['loss_test']:.4f}", f"{r['bits_test']:.4f}",
                 f"{r['size_bytes']:,}", ratio, bits_label,
                 "" if "export_agreement" not in r else f"{r['export_agreement']:.4f}"))

  p, q = config.prune, config.quant
  pruned = ("dense" if p.method == "none" or not p.sparsity
            else f"{p.n}:{p.m}" if p.structure == "nm" else f"{p.sparsity:.0%} {p.structure}")
  w = f"{pruned}, {q.weight_bits or 32}/{q.act_bits or 32}"
  families = [(_model_label(res["teacher"]["model"]), res)
              for res in (results, results.get("lstm")) if res]
  for name, res in families:
    add(f"{name} teacher (float32)", res["teacher"], "32/32")
    add(f"{name} PTQ (no training)", res["ptq"], w)
    add(f"{name} compressed + plain fine-tuning", res.get("sft"), w)
    add(f"**{name} compressed + KD**", res["compressed"], w)
  table = markdown_table(("model", "test loss (nats/char)", "bits/char", "bytes", "ratio",
                          "sparsity, weight/input bits", "export agreement"), rows)
  lines = ["# Tiny Shakespeare: compressed character-level models", "",
           f"Losses on the test split; the {families[0][0]} teacher's loss on val111k (validation "
           "and test together, the last 10 % of the text: nanoGPT's split) is "
           f"{results['teacher']['loss_val111k']:.4f} nats/char.", "", table, ""]
  for name, res in families:
    for who in ("teacher", "compressed"):
      lines += [f"## Sampled from the {name} {who} (seed {config.seed}, temperature "
                f"{config.sample.temperature})", "", "```", res["samples"][who], "```", ""]
  return "\n".join(lines)
