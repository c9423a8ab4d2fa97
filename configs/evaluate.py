"""Evaluate a model on a dataset split; the last line printed is one JSON object.

  python -m experiments.evaluate --config=configs/evaluate.py \
      --config.model.name=resnet56 --config.model.weights=resnet56_cifar10

Expected on the CIFAR-10 test split: resnet20 91.73, resnet56 93.39 (accuracy, percent).

An exported artifact (``jaxcompress.export.export_model``) is evaluated the same way:

  python -m experiments.evaluate --config=configs/evaluate.py --config.model.exported=DIR/export
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """No variants; ``arg`` must be empty."""
  if arg:
    raise ValueError(f"configs/evaluate.py takes no variant, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.model = common.model_config("resnet20", "resnet20_cifar10")
  c.model.exported = ""  # artifact folder (DIR/export) to evaluate instead of model.weights
  c.data = common.data_config("cifar10")
  return c
