"""The main job: compress a model, fine-tune it (with a teacher), evaluate, export, report.

``train_and_evaluate(config, workdir)`` runs the stages below; each stage's result is kept in
``WORKDIR/stages.json`` and training checkpoints in ``WORKDIR/checkpoints``, so a rerun with the
same command resumes where it stopped, and ends exactly as an uninterrupted run would, however it
was stopped (even by SIGKILL): every file is written under a temporary name and renamed, a stage is
recorded only once its outputs are complete, and training resumes from its latest checkpoint at the
exact step (:func:`jaxcompress.train.fit`). Stages: evaluate the teacher and the original student;
compress the student one-shot (final-sparsity masks + calibrated fake quantization) and evaluate
it "before fine-tuning"; fine-tune with the composed step; evaluate "after"; export; write
``results.json``, ``report.md`` and PNG plots. With ``data.val_examples > 0`` the original and the
fine-tuned student are evaluated on that held-out slice of the training examples too (``val``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np

from experiments import report as report_lib
from experiments.train_job import train_model
from jaxcompress import compose, datasets, parallel, precision, pruning, quantization
from jaxcompress import data as data_lib
from jaxcompress.data import DataSpec
from jaxcompress.checkpoint import (RESUMABLE, MetricsLog, Stages, check_workdir, write_json,
                                    write_text)
from jaxcompress.errors import ConfigError, invalid, unknown
from jaxcompress.metrics import prediction_agreement
from jaxcompress.models import create_model, get_model
from jaxcompress.models.functional import functional
from jaxcompress.models.weights import (WEIGHTS_ENV, check_dataset, check_writable,
                                        resolve_weights, save_weights, weights_dir,
                                        weights_format)
from jaxcompress.optim import OptimizerSpec, make_optimizer
from jaxcompress.steps import make_eval_step
from jaxcompress.train import LoopSpec, evaluate_split, fit, load_data

FLOAT32_BYTES = 4


def _sections(config) -> list[str]:
  """The model sections the job builds: the teacher when it teaches or is evaluated, the student."""
  uses_teacher = config.distill.alpha > 0 or config.distill.feature_weight > 0
  with_teacher = config.teacher.name and (uses_teacher or config.eval.teacher)
  return ["teacher", "student"] if with_teacher else ["student"]


def weights_plan(config) -> tuple[str, dict[str, str | None], dict[str, str]]:
  """Where each model's weights come from.

  Returns:
    ``(folder, paths, to_train)``: the weights folder; ``{section: weights path, or None for a
    random initialisation or weights still to be trained}``; ``{weights name: model name}`` of the
    weights named in the config that the folder does not hold (the pretrain stage trains them).

  Raises:
    ConfigError: a name for another dataset than ``data.name`` (``resnet20_cifar10`` on
      cifar100: :func:`~jaxcompress.models.weights.check_dataset`), found or to be trained and
      saved under it; or one name for two models.
  """
  folder = weights_dir(config.weights_dir)
  paths, to_train = {}, {}
  for section in _sections(config):
    spec, name = config[section].weights, config[section].name
    check_dataset(spec, config.data.name, field=f"{section}.weights")
    paths[section] = resolve_weights(spec, folder)
    if spec and paths[section] is None:
      if to_train.setdefault(spec, name) != name:
        raise invalid(f"{section}.weights", spec, f"weights of one model; {to_train[spec]} and "
                      f"{name} both name them", "give each model its own weights name")
  return folder, paths, to_train


def validate_config(config) -> tuple[str, dict[str, str | None], dict[str, str]]:
  """Every check that needs no data or weights, before anything is written.

  Returns:
    The :func:`weights_plan`.
  """
  datasets.dataset_spec(config.data.name)
  get_model(config.student.name, field="student.name", inputs="images")
  if config.teacher.name:
    get_model(config.teacher.name, field="teacher.name", inputs="images")
  folder, paths, to_train = weights_plan(config)
  for section, path in paths.items():  # .npz, .msgpack or orbax folder; empty: random init
    if path:
      weights_format(path, field=f"{section}.weights")
  # checked whether or not weights are to be trained now
  OptimizerSpec(epochs=config.pretrain.epochs, learning_rate=config.pretrain.learning_rate,
                section="pretrain")
  if to_train:
    name = next(iter(to_train))
    section = next(s for s in paths if config[s].weights == name)
    if not config.pretrain.epochs > 0:
      raise ConfigError(
          f"{section}.weights: no weights named {name!r} in the weights folder {folder!r} "
          f"(looked for {name}.npz, {name}.msgpack and an orbax folder {name}/) and "
          f"pretrain.epochs is {config.pretrain.epochs}; set pretrain.epochs > 0 to train them "
          f"here, or point weights_dir (or ${WEIGHTS_ENV}) at the folder that holds them")
    check_writable(folder)
  OptimizerSpec.from_mapping(config.train)
  LoopSpec.from_mapping(config.train)
  precision.compute_dtype(config.train.compute_dtype)
  DataSpec.from_mapping(config.data)
  compression_specs(config)
  max_bytes = config.export.get("max_bytes", 0)
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
    raise invalid("export.max_bytes", max_bytes, "an integer >= 0 (0: no cap)")
  if max_bytes and not config.export.enabled:
    raise ConfigError(f"export: export.max_bytes={max_bytes} caps the artifact, but "
                      "export.enabled=False writes none; drop one of them")
  if config.export.slim and not (config.export.enabled and config.export.serving):
    off = "serving" if config.export.enabled else "enabled"
    raise ConfigError(f"export: export.slim=True slims the serving function, but "
                      f"export.{off}=False writes none; drop one of them")
  return folder, paths, to_train


def compression_specs(config) -> dict:
  """The ``prune``, ``quant`` and ``distill`` sections as the library's typed specs (validated,
  with the job's own ``quant.calibration`` and ``quant.calibration_examples``)."""
  if config.quant.calibration not in quantization.CALIBRATION_METHODS:
    raise unknown("quant.calibration", config.quant.calibration, quantization.CALIBRATION_METHODS)
  n = config.quant.calibration_examples
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise invalid("quant.calibration_examples", n, "an integer >= 1", "the first of them also "
                  "trace the student to find its layers")
  quant = {k: v for k, v in config.quant.items()
           if k not in ("calibration", "calibration_examples")}
  return dict(prune=compose.PruneSpec.from_dict({**config.prune, "seed": config.seed}),
              quant=compose.QuantSpec.from_dict(quant),
              distill=compose.DistillSpec.from_dict(dict(config.distill)))


def param_count(tree) -> int:
  """The number of entries in a parameter tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole compression job; returns the ``results.json`` dict."""
  folder, paths, to_train = validate_config(config)
  parallel.initialize_distributed(parallel.DistributedSpec.from_mapping(config.parallel))
  # With several processes (docs/training.md) all compute every stage; process 0 writes the files.
  stages = Stages(workdir)
  parallel.sync("stages read")  # process 0 writes it only once every process has read it
  # WORKDIR/config.json records all but `parallel` (a run may resume on another number of
  # processes) and `export.max_bytes` (a rerun with another cap exports the trained model again).
  # Process 0 claims the workdir.
  claim_workdir = lambda: check_workdir(config, workdir,
                                        ignore=(*RESUMABLE, "export.max_bytes"))
  mesh = parallel.make_mesh()
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(config.data[field], mesh, f"data.{field}")
  spec = datasets.dataset_spec(config.data.name)
  # Models: weights found now, or trained by the pretrain stage below (random until then).
  build = lambda section: create_model(config[section].name, num_classes=spec.num_classes,
                                       image_shape=spec.image_shape, weights=paths[section],
                                       seed=config.seed, field=section)
  student, student_vars = build("student")
  teacher, teacher_vars = None, None
  uses_teacher = config.distill.alpha > 0 or config.distill.feature_weight > 0
  if "teacher" in paths:
    teacher, teacher_vars = build("teacher")
    probe = np.zeros((1, *spec.image_shape), np.float32)
    t_classes = functional(teacher).apply(teacher_vars, probe)[0].shape[-1]
    s_classes = functional(student).apply(student_vars, probe)[0].shape[-1]
    if t_classes != s_classes:
      raise ConfigError(f"teacher.name: teacher has {t_classes} classes, student {s_classes}; "
                        "distillation needs the same classes")
  elif uses_teacher:
    raise invalid("teacher.name", config.teacher.name, "a model name when distill.alpha > 0 or "
                  "distill.feature_weight > 0")
  data = DataSpec.from_mapping(config.data)
  splits = load_data(data)
  evaluate_vars = lambda fn, v, desc, preds=False, split="eval": evaluate_split(
      make_eval_step(fn, mesh=mesh), parallel.replicate(mesh, v), splits[split], data,
      mesh=mesh, desc=desc, predictions=preds)
  # {'val': metrics} on the last data.val_examples training examples, held out of training; {}
  # without them.
  held_out = lambda fn, v, desc: ({"val": evaluate_vars(fn, v, f"{desc} val", split="val")}
                                  if "val" in splits else {})

  # Pretrain stage: weights named in the config but not in the weights folder are trained here
  # with the family's recipe, saved under their name, and the models rebuilt from them. The stage
  # is recorded before the weights are saved: a run stopped in between trains them again from
  # their last checkpoint (no step) and saves them; one stopped after finds them and keeps them.
  if to_train:
    claim_workdir()
    for name, model_name in to_train.items():
      variables, result = _pretrain(config, workdir, folder, name, model_name, splits, data,
                                    mesh)
      stages.record(f"pretrain {name}", result)
      # Process 0 saves them while the others wait; its failure (a folder turned read-only, a
      # full disk) stops every process with the same line, instead of leaving them waiting.
      parallel.on_main_process(lambda: save_weights(variables, name, folder))
    paths = {s: resolve_weights(config[s].weights, folder) for s in paths}
    student, student_vars = build("student")
    if teacher is not None:
      teacher, teacher_vars = build("teacher")

  # Compression.
  per_epoch = data_lib.steps_per_epoch(len(splits["train"]), config.data.batch_size)
  total = int(round(config.train.epochs * per_epoch))
  if total < 1:
    raise invalid("train.epochs", config.train.epochs, f"enough for one step (an epoch is "
                  f"{per_epoch} steps: at least {1 / per_epoch:.3g})")
  calib_x, _ = splits["train"].read(
      np.arange(min(config.quant.calibration_examples, len(splits["train"]))))
  calib = data_lib.calibration_batches(calib_x, data.mean, data.std)
  optimizer = make_optimizer(OptimizerSpec.from_mapping(config.train), per_epoch,
                             decay_mask=compose.decay_mask)
  comp = compose.build(student, student_vars, calib[0][:8], optimizer=optimizer,
                       total_steps=total, teacher=teacher if uses_teacher else None,
                       compute_dtype=config.train.compute_dtype, **compression_specs(config))
  state = comp.init_state(student_vars, calib[0][:8], teacher_vars=teacher_vars,
                          calibration=calib, calibration_method=config.quant.calibration,
                          key=jax.random.key(config.seed))  # the feature hints' adapters

  _check_max_bytes(config, comp, state)
  eval_apply = lambda model: (lambda v, x, fm=functional(model): fm.apply(v, x)[0])
  # Every user mistake (config, weights, data) has surfaced by now: only now touch the workdir.
  claim_workdir()

  if teacher is not None and config.eval.teacher:
    stages("teacher", lambda: evaluate_vars(eval_apply(teacher), teacher_vars, "eval teacher"))
  stages("original", lambda: {
      **evaluate_vars(eval_apply(student), student_vars, "eval original"),
      **held_out(eval_apply(student), student_vars, "eval original")})

  def before():
    params = state.params
    if comp.prune_enabled:
      params = pruning.apply_masks(params, comp.final_masks(params))
    return {**evaluate_vars(comp.logits_fn, {"params": params, "model_state": state.model_state},
                            "eval compressed (before fine-tuning)"),
            "sparsity": float(comp.sparsity(params)) if comp.prune_enabled else 0.0}
  stages("before", before)

  # Fine-tuning.
  train_step = comp.make_train_step(mesh=mesh, seed=config.seed,
                                    skip_nonfinite=config.train.skip_nonfinite)
  step_args = (parallel.replicate(mesh, teacher_vars),) if comp.teacher is not None else ()
  loop = LoopSpec.from_mapping(config.train)
  state, info = fit(state, train_step, splits["train"], data, loop, workdir, seed=config.seed,
                    mesh=mesh, step_args=step_args, desc="fine-tune",
                    eval_fn=lambda s: evaluate_vars(comp.logits_fn, comp.eval_variables(s),
                                                    "eval"))
  after = stages("after", lambda: {**evaluate_vars(comp.logits_fn, comp.eval_variables(state),
                                                  "eval compressed", True),
                                    **held_out(comp.logits_fn, comp.eval_variables(state),
                                               "eval compressed"), **info})
  final_params = jax.device_get(state.params["model"])
  sparsity = float(comp.sparsity({"model": final_params}))
  original_bytes = param_count(student_vars["params"]) * FLOAT32_BYTES
  compressed = {"model": config.student.name, "accuracy": after["accuracy"], "loss": after["loss"],
                "precision": after["precision"], "recall": after["recall"],
                "nonfinite": after.get("nonfinite"), "sparsity": sparsity,
                "weight_bits": _bits(config.quant, 1),
                "act_bits": _bits(config.quant, 2)}
  if "val" in after:  # the held-out slice (data.val_examples)
    compressed["val"] = after["val"]
  if config.export.enabled:
    if stages.get("export", {}).get("max_bytes", 0) != config.export.get("max_bytes", 0):
      stages.pop("export", None)  # exported under another cap: export again
    compressed.update(stages("export", lambda: _export(
        config, data, workdir, comp, state, original_bytes, after["predictions"],
        evaluate_vars)))
  dense = {"sparsity": 0.0, "weight_bits": 32, "act_bits": 32}
  teacher_row = _row(stages.get("teacher"), config.teacher.name)
  if teacher_vars is not None and teacher_row["accuracy"] is not None:
    teacher_row.update(size_bytes=param_count(teacher_vars["params"]) * FLOAT32_BYTES, **dense)
  results = {
      "pretrained": [v for k, v in stages.items() if k.startswith("pretrain ")],
      "teacher": teacher_row,
      "original": {**_row(stages["original"], config.student.name),
                   "size_bytes": original_bytes, **dense},
      "before_finetune": {**_row(stages["before"], config.student.name),
                          "sparsity": stages["before"].get("sparsity", 0.0),
                          "weight_bits": compressed["weight_bits"],
                          "act_bits": compressed["act_bits"]},
      "compressed": compressed,
      "train": {"seconds": after["seconds"], "epochs": after["epochs"], "steps": after["steps"],
                "skipped": after.get("skipped", 0)},
  }
  layers = comp.describe(state)

  def write_outputs() -> None:
    write_text(os.path.join(workdir, "layers.md"), layers + "\n")
    report_lib.write_report(workdir, config, results,
                            MetricsLog(os.path.join(workdir, "metrics.jsonl")).read())
    write_json(os.path.join(workdir, "results.json"), results)  # last: its presence means done

  # Process 0 writes them; its failure (a full disk) fails every process, not only the one.
  parallel.on_main_process(write_outputs)
  return results


def _bits(quant, column: int) -> int | str:
  """The weight (``column`` 1) or input (2) bits of the results: ``quant.weight_bits`` or
  ``act_bits`` (32 for 0, float), or, for a per-layer plan (``quant.layer_bits``, one rule per
  layer), the widths its layers take, ``'2/3/8'`` (one width: that number)."""
  if not quant.get("layer_bits"):
    return (quant.weight_bits, quant.act_bits)[column - 1] or 32
  widths = sorted({int(rule[column]) or 32 for rule in quant.layer_bits})
  return widths[0] if len(widths) == 1 else "/".join(map(str, widths))


def _export(config, data: DataSpec, workdir: str, comp, state, original_bytes: int,
            predictions: list, evaluate_vars) -> dict:
  """Writes ``WORKDIR/export`` (and ``WORKDIR/serving``, normalising uint8 images with
  ``data``'s mean and std), reloads the artifact, evaluates it.

  Both folders are written under temporary names (``export.tmp``, ``serving.tmp``) and renamed
  once complete, replacing what an interrupted earlier attempt left. Process 0 writes them; every
  process loads the artifact and evaluates it (the others return ``{}``: the stage shares process
  0's result).

  With ``export.slim`` the serving function skips the removed output channels
  (:func:`jaxcompress.export.slim`). With ``export.max_bytes`` the artifact is made to fit by
  zeroing the smallest kept weights (:func:`jaxcompress.export.fit_to_bytes`); what is evaluated
  and served is that artifact.

  Returns:
    ``size_bytes`` (artifact bytes on disk), ``compression_ratio``, the artifact's ``accuracy``
    as ``exported_accuracy`` and its prediction agreement with the fake-quant model; with
    ``export.slim``, ``serving_slimmed``: ``{layer: [computed, all] output channels}``; with
    ``export.max_bytes``, that cap as ``max_bytes`` and ``zeroed_to_fit``: how many kept weights
    were zeroed to fit.
  """
  from jaxcompress import export  # heavy; only the export stage needs it
  folders = ["export", "serving"] if config.export.serving else ["export"]
  tmp = {name: os.path.join(workdir, f"{name}.tmp") for name in folders}
  main = parallel.is_main_process()
  max_bytes = config.export.get("max_bytes", 0)

  def write_artifact() -> tuple[dict, int]:  # (size report, weights zeroed to fit)
    for path in tmp.values():
      shutil.rmtree(path, ignore_errors=True)
    write, params = _artifact_writer(config, comp, state, tmp["export"])
    if not max_bytes:
      return write(params), 0
    try:
      _, report, zeroed = export.fit_to_bytes(write, params, comp.prune_rules, max_bytes)
    except ConfigError as e:  # the trained values take more than the starting ones did
      raise ConfigError(f"export.{e}; rerun with a larger --config.export.max_bytes: the "
                        "trained model is kept, only the export runs again") from None
    return report, zeroed

  try:
    # Process 0 writes; its refusal stops every process (the others would wait for the artifact).
    report, zeroed = parallel.on_main_process(write_artifact) or (None, 0)
    parallel.sync("artifact written")
    loaded = export.load(tmp["export"], comp.student)

    def serve() -> dict:  # writes the serving function; returns what export.slim computes
      if not config.export.serving:
        return {}
      served, slimmed = loaded, {}
      if config.export.slim:
        skipped = export.slim(loaded)
        served, slimmed = skipped.loaded, {p: list(c) for p, c in skipped.channels.items()}
      export.save_serving(tmp["serving"], served, mean=data.mean, std=data.std)
      return slimmed

    # Process 0 writes it; its failure (a full disk) stops every process (the others would wait
    # for it in the evaluation below).
    slimmed = parallel.on_main_process(serve)
    result = evaluate_vars(loaded.apply_fn, loaded.arrays, "eval exported artifact", True)

    def finish() -> None:  # the complete folders under their names, and the size report
      for name, path in tmp.items():
        final = os.path.join(workdir, name)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(path, final)
      write_text(os.path.join(workdir, "export_size.md"), export.format_report(report) + "\n")

    # Process 0 writes; its failure stops every process (the others would wait for its result).
    parallel.on_main_process(finish)
  except BaseException:  # nothing half-written stays behind
    if main:
      for path in tmp.values():
        shutil.rmtree(path, ignore_errors=True)
    raise
  if not main:
    return {}
  agree = prediction_agreement(result["predictions"], predictions)
  out = {"size_bytes": int(report["total_bytes"]),
         "compression_ratio": round(original_bytes / report["total_bytes"], 3),
         "exported_accuracy": result["accuracy"], "export_agreement": agree}
  if max_bytes:
    out.update(max_bytes=max_bytes, zeroed_to_fit=zeroed)
  if config.export.serving and config.export.slim:
    out["serving_slimmed"] = slimmed
  return out


def _artifact_writer(config, comp, state, out: str) -> tuple[Callable, dict]:
  """``(write, params)``: ``write(p)`` replaces the artifact in ``out`` with that of ``state``
  holding the weights ``p`` (``{'model': ...}``) and returns its size report; ``params`` are
  ``state``'s own (host arrays, the paths ``comp.prune_rules`` name)."""
  shape = datasets.dataset_spec(config.data.name).image_shape

  def write(params):
    shutil.rmtree(out, ignore_errors=True)
    return comp.export(out, state.replace(params={**state.params, **params}),
                       input_shape=shape, model_name=config.student.name)

  return write, {"model": jax.device_get(state.params["model"])}


def _check_max_bytes(config, comp, state) -> None:
  """Refuses, before anything is trained or written, an ``export.max_bytes`` below what this
  model's artifact takes with every prunable weight zero (:func:`export.smallest_bytes`)."""
  max_bytes = config.export.get("max_bytes", 0)
  if not (config.export.enabled and max_bytes):
    return
  from jaxcompress import export  # heavy; only a capped export needs it here
  with tempfile.TemporaryDirectory() as tmp:
    floor = export.smallest_bytes(*_artifact_writer(config, comp, state,
                                                    os.path.join(tmp, "export")),
                                  comp.prune_rules)
  if floor > max_bytes:
    raise invalid("export.max_bytes", max_bytes, f"at least {floor:,}, what this model's artifact "
                  "takes with every prunable weight zero (with the starting weights; the trained "
                  "ones may take more)", "raise it, or compress more layers")


def _pretrain(config, workdir: str, folder: str, name: str, model_name: str, splits: dict,
              data: DataSpec, mesh) -> tuple[dict, dict]:
  """Trains ``model_name`` from scratch with the CIFAR ResNet recipe, to be saved as ``name``.

  SGD with momentum 0.9, weight decay 1e-4, cosine from ``pretrain.learning_rate`` over
  ``pretrain.epochs``, the job's batch size and augmentation (He et al. 2016). Resumable: its
  checkpoints live in ``WORKDIR/pretrain/NAME``.

  Returns:
    ``(variables, stage result)``; the result names ``FOLDER/NAME.msgpack``, where the caller
    saves the variables.
  """
  spec = datasets.dataset_spec(config.data.name)
  model, variables = create_model(model_name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, seed=config.seed)
  p = config.pretrain
  opt = OptimizerSpec(epochs=p.epochs, learning_rate=p.learning_rate, momentum=0.9,
                      weight_decay=1e-4, schedule="cosine")
  loop = LoopSpec(epochs=p.epochs, log_every_steps=config.train.log_every_steps,
                  checkpoint_every_steps=config.train.checkpoint_every_steps,
                  eval_every_epochs=10**9)
  variables, result, info = train_model(model, variables, splits, data, opt, loop,
                                        os.path.join(workdir, "pretrain", name),
                                        seed=config.seed, mesh=mesh, desc=f"pretrain {name}",
                                        compute_dtype=config.train.compute_dtype,
                                        skip_nonfinite=config.train.skip_nonfinite)
  return variables, {"weights": name, "model": model_name,
                     "path": os.path.join(folder, f"{name}.msgpack"), "epochs": info["epochs"],
                     "seconds": info["seconds"], "accuracy": result["accuracy"],
                     "loss": result["loss"]}


def _row(result: dict | None, name: str) -> dict:
  if result is None:
    return {"model": name, "accuracy": None}
  row = {"model": name, **{k: result[k] for k in ("accuracy", "loss", "precision", "recall")}}
  row["nonfinite"] = result.get("nonfinite")  # None: recorded before it was counted
  return {**row, "val": result["val"]} if "val" in result else row
