"""Supervised training of a registered model (from scratch or from imported weights).

Full run (GPU): trains ResNet-20 on CIFAR-10 from scratch with the published recipe (SGD 0.1,
momentum 0.9, wd 1e-4, batch 128, cosine, 200 epochs); expect about 92 % test accuracy.

  python -m experiments.train --config=configs/train.py --workdir=runs/train

Quick run (2 CPU cores, about 4 minutes): fine-tunes the pretrained ResNet-20 for 0.2 epoch at a
small learning rate; accuracy stays near its 91.73 %.

  python -m experiments.train --config=configs/train.py:quick --workdir=runs/train_quick
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None for the full run, ``quick`` for the CPU-sized one."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, data order and augmentation seed
  c.model = common.model_config("resnet20")
  c.data = common.data_config("cifar10")
  c.train = common.train_config()
  c.parallel = common.parallel_config()
  if arg == "quick":
    c.model.weights = "resnet20_cifar10"
    c.train.epochs = 0.2
    c.train.learning_rate = 0.002
    c.train.eval_every_epochs = 1000
  elif arg:
    raise ValueError(f"configs/train.py: unknown variant {arg!r}; valid: quick")
  return c
