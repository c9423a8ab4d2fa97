"""Evaluate a model described by a config (``configs/evaluate.py``) on a dataset split."""

from __future__ import annotations

from jaxcompress import data as data_lib
from jaxcompress import parallel
from jaxcompress.models import create_model
from jaxcompress.steps import make_eval_step
from jaxcompress.train import evaluate_split


def evaluate_config(config) -> dict:
  """Builds the model of ``config.model``, evaluates it on ``config.data.eval_split``.

  Returns:
    ``{'accuracy', 'loss', 'examples', 'precision', 'recall', 'model', 'dataset', 'split'}``.
  """
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
  spec = data_lib.dataset_spec(config.data.name)
  model, variables = create_model(config.model.name, num_classes=spec.num_classes,
                                  image_shape=spec.image_shape, weights=config.model.weights)
  split = data_lib.load_split(config.data.name, config.data.eval_split,
                              data_dir=config.data.data_dir)
  eval_step = make_eval_step(lambda v, x: model.apply(v, x, train=False), mesh=mesh)
  result = evaluate_split(eval_step, parallel.replicate(mesh, variables), split, config.data,
                          mesh=mesh)
  return {**result, "model": config.model.name, "dataset": config.data.name,
          "split": config.data.eval_split}
