"""Evaluates a model described by a config (``configs/evaluate.py``) on a dataset split; run by
``experiments/evaluate.py``."""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxcompress import data as data_lib
from jaxcompress import datasets, parallel
from jaxcompress.checkpoint import read_json
from jaxcompress.data import DataSpec
from jaxcompress.errors import ConfigError
from jaxcompress.export import load as load_artifact
from jaxcompress.export import read_spec
from jaxcompress.export.inputs import image_shape
from jaxcompress.models import create_model, get_model
from jaxcompress.models.functional import functional
from jaxcompress.models.registry import check_logits
from jaxcompress.models.weights import check_dataset
from jaxcompress.steps import make_eval_step
from jaxcompress.train import evaluate_split


def evaluate_config(config) -> dict:
  """Builds the model of ``config.model``, evaluates it on ``config.data.eval_split``.

  With ``config.model.exported`` set, the artifact in that folder is evaluated instead of
  ``config.model.weights``: its module is the model named in the artifact's spec (the
  ``model_name`` it was exported with; ``config.model.name`` when that is empty), and the
  artifact's variables must fit it and its output be one logit per class of the dataset. The spec
  does not record the dataset: an artifact inside a run's workdir (``WORKDIR/export``) must be of
  the dataset that run's ``config.json`` names; a copied artifact is not checked.

  Returns:
    ``{'accuracy', 'loss', 'examples', 'nonfinite', 'precision', 'recall', 'model', 'dataset',
    'split'}``,
    and ``'exported'`` (the artifact's folder) where one is evaluated.
  """
  data = DataSpec.from_mapping(config.data)  # checked before anything is read
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
  spec = datasets.dataset_spec(config.data.name)
  exported = config.model.get("exported", "")
  name = config.model.name
  if exported:  # an artifact from jaxcompress.export: packed weights, folded BN, input fake-quant
    check_run_dataset(exported, config.data.name)
    name = read_spec(exported).get("model") or name
    model = get_model(name, spec.num_classes, field="model.exported model")
    loaded = load_artifact(exported, model)
    shape = image_shape(loaded.spec["input"], spec.image_shape, dataset=config.data.name,
                        field="model.exported")
    out = jax.eval_shape(loaded.apply_fn, loaded.arrays, np.zeros((1, *shape), np.float32))
    check_logits(out, name, spec.num_classes, shape, "model.exported")
    variables, logits_fn = loaded.arrays, loaded.apply_fn
  else:
    check_dataset(config.model.weights, data.name)
    model, variables = create_model(config.model.name, num_classes=spec.num_classes,
                                    image_shape=spec.image_shape, weights=config.model.weights)
    logits_fn = lambda v, x, fm=functional(model): fm.apply(v, x)[0]
  split = data_lib.load_split(config.data.name, config.data.eval_split,
                              data_dir=config.data.data_dir, field="data.eval_split")
  eval_step = make_eval_step(logits_fn, mesh=mesh)
  result = evaluate_split(eval_step, parallel.replicate(mesh, variables), split, data,
                          mesh=mesh)
  out = {**result, "model": name, "dataset": config.data.name,
         "split": config.data.eval_split}
  if exported:
    out["exported"] = exported
  return out


def check_run_dataset(exported: str, dataset: str) -> None:
  """Refuses an artifact whose run (the ``config.json`` beside it) trained on another dataset.

  Raises:
    ConfigError: that run's ``data.name`` is not ``dataset``, naming both.
  """
  run = os.path.dirname(os.path.abspath(os.path.expanduser(exported)))  # as the reader does
  data = read_json(os.path.join(run, "config.json")).get("data")
  trained = data.get("name") if isinstance(data, dict) else None
  if isinstance(trained, str) and trained != dataset:
    raise ConfigError(f"model.exported={exported} was exported by a run on {trained} "
                      f"({os.path.join(run, 'config.json')}), but data.name={dataset}; evaluate "
                      f"it with --config.data.name={trained}")
