"""One-shot magnitude pruning of the pretrained ResNet-20, no fine-tuning: accuracy vs sparsity.

  python -m experiments.prune_sensitivity \
      --config=configs/prune_sensitivity.py

Nine evaluations on the 10,000 CIFAR-10 test images (dense, then 30/50/70/90 % layer-wise and
global), one compiled eval step; 3.6 minutes on 2 shared CPU cores. Measured here (test accuracy,
percent): dense 91.73; layer-wise 91.49 / 89.75 / 64.64 / 16.87 and global 91.52 / 90.17 /
72.15 / 10.11 at 30 / 50 / 70 / 90 %. Global 90 % empties the last conv (99.2 % zeros), hence
chance accuracy. Prints a markdown table, then one JSON line.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """No variants; ``arg`` must be empty."""
  if arg:
    raise ValueError(f"configs/prune_sensitivity.py takes no variant, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.model = common.model_config("resnet20", "resnet20_cifar10")
  c.data = common.data_config("cifar10")  # only data.eval_split (test) is read
  c.prune = ml_collections.ConfigDict()
  c.prune.sparsities = (0.3, 0.5, 0.7, 0.9)  # fractions of the selected weights zeroed, in [0, 1)
  c.prune.scopes = ("layer", "global")  # layer: each kernel alone; global: all kernels together
  c.prune.rules = ()  # ((regex, True/False), ...) over param paths; () = every layer's weight
  #                     except the first and last layer in forward order
  return c
