"""Plain supervised training from a config (``configs/train.py``); ``experiments/train.py``
runs it, and the main job's pretrain stage uses :func:`train_model`."""

from __future__ import annotations

import os

import jax

from jaxcompress import data as data_lib
from jaxcompress import datasets, parallel, precision
from jaxcompress.checkpoint import RESUMABLE, MetricsLog, check_workdir, read_json, write_json
from jaxcompress.data import DataSpec
from jaxcompress.models import create_model, get_model
from jaxcompress.models.functional import functional
from jaxcompress.models.weights import check_dataset, weights_format
from jaxcompress.optim import OptimizerSpec, make_optimizer
from jaxcompress.steps import TrainState, make_eval_step, make_train_step, supervised_loss
from jaxcompress.train import LoopSpec, evaluate_split, fit, load_data


def train_model(model, variables: dict, splits: dict, data: DataSpec, opt_spec: OptimizerSpec,
                loop: LoopSpec, workdir: str, *, seed: int, mesh, desc: str = "train",
                compute_dtype: str = "float32", skip_nonfinite: bool = False
                ) -> tuple[dict, dict, dict]:
  """Supervised training of any Linen or NNX model, resumable in ``workdir``; the forward and
  backward in ``compute_dtype`` (``train.compute_dtype``, see :mod:`jaxcompress.precision`),
  non-finite steps skipped and counted with ``skip_nonfinite`` (``train.skip_nonfinite``).

  Returns:
    ``(variables, result, info)``: the trained variables (on the host), the final evaluation on
    ``splits['eval']`` and :func:`~jaxcompress.train.fit`'s ``info``.
  """
  optimizer = make_optimizer(opt_spec, data_lib.steps_per_epoch(
      len(data_lib.as_split(splits["train"])), data.batch_size))
  variables = dict(variables)
  params = variables.pop("params")
  state = TrainState.create(params, variables, optimizer)
  train_step = make_train_step(supervised_loss(model, compute_dtype), optimizer, mesh=mesh,
                               seed=seed, skip_nonfinite=skip_nonfinite)
  eval_step = make_eval_step(lambda v, x, fm=functional(model): fm.apply(v, x)[0], mesh=mesh)
  as_vars = lambda s: {"params": s.params, **s.model_state}
  eval_fn = lambda s: evaluate_split(eval_step, as_vars(s), splits["eval"], data, mesh=mesh)
  state, info = fit(state, train_step, splits["train"], data, loop, workdir, seed=seed,
                    mesh=mesh, eval_fn=eval_fn, desc=desc)
  result = eval_fn(state)
  MetricsLog(os.path.join(workdir, "metrics.jsonl")).write_final(
      info["steps"], {f"eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
  return jax.device_get(as_vars(state)), result, info


def train_and_evaluate(config, workdir: str) -> dict:
  """Supervised training from a ``configs/train.py`` config; returns the ``results.json`` dict.

  Starts from ``config.model.weights`` (``.npz``, ``.msgpack`` or orbax folder) or from scratch,
  trains, evaluates on ``config.data.eval_split`` and, with ``data.val_examples > 0``, on the
  held-out training examples; writes ``WORKDIR/results.json`` (atomically, last) and returns it:
  ``{'accuracy', 'loss', 'examples', 'nonfinite', 'precision', 'recall'}`` of the eval split,
  ``'val'`` (the same fields on the held-out slice, only when there is one), ``'train_seconds'``,
  ``'epochs'``, ``'steps'`` and ``'skipped'`` (non-finite steps skipped, with
  ``train.skip_nonfinite``). A rerun of a finished run of the same length returns its
  ``results.json`` without training or evaluating again; one with a larger ``train.epochs`` goes
  on training.
  """
  # The edge: config sections become the library's typed specs, validated here.
  data = DataSpec.from_mapping(config.data)
  opt_spec = OptimizerSpec.from_mapping(config.train)
  loop = LoopSpec.from_mapping(config.train)
  precision.compute_dtype(config.train.compute_dtype)
  parallel.initialize_distributed(parallel.DistributedSpec.from_mapping(config.parallel))
  mesh = parallel.make_mesh()
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(getattr(data, field), mesh, f"data.{field}")
  get_model(config.model.name, inputs="images")
  check_dataset(config.model.weights, data.name)
  if config.model.weights:
    weights_format(config.model.weights, field="model.weights")
  splits = load_data(data)  # a bad split or data folder is refused before the model's compile
  spec = datasets.dataset_spec(data.name)
  model, variables = create_model(config.model.name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, weights=config.model.weights,
                                  seed=config.seed)
  # Every check passed: only now write. A rerun may extend train.epochs (or change parallel).
  check_workdir(config, workdir, ignore=(*RESUMABLE, "train.epochs"))
  path = os.path.join(workdir, "results.json")
  per_epoch = data_lib.steps_per_epoch(len(splits["train"]), data.batch_size)
  done = read_json(path)
  if done.get("steps") == int(round(loop.epochs * per_epoch)):  # fit's count of steps
    return done  # a finished run of this length: nothing trained or evaluated again
  variables, result, info = train_model(model, variables, splits, data, opt_spec, loop, workdir,
                                        seed=config.seed, mesh=mesh,
                                        compute_dtype=config.train.compute_dtype,
                                        skip_nonfinite=config.train.skip_nonfinite)
  results = dict(result)
  if "val" in splits:  # the last data.val_examples training examples, held out of training
    eval_step = make_eval_step(lambda v, x, fm=functional(model): fm.apply(v, x)[0], mesh=mesh)
    results["val"] = evaluate_split(eval_step, parallel.replicate(mesh, variables),
                                    splits["val"], data, mesh=mesh, desc="eval val")
  results.update(train_seconds=info["seconds"], epochs=info["epochs"], steps=info["steps"],
                 skipped=info["skipped"])
  # Process 0 writes; its failure (a full disk) stops every process with the same line.
  parallel.on_main_process(lambda: write_json(path, results))  # last: its presence means done
  return results
