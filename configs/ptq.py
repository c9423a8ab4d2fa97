"""Post-training quantization of the pretrained ResNet-20 on CIFAR-10: calibration, no training.

  python -m experiments.ptq --config=configs/ptq.py

Calibrates input ranges on the first 512 training images, then evaluates the 10,000 test images
once in float and once per scheme (one compiled eval step per quantizer configuration). Measured
here (16 minutes on 2 CPU cores shared with other jobs; percentile calibration is the slowest part):
float 91.73; W8A8 91.78 (min-max) and 91.74 (percentile), within 0.3 points of float; W4A8 88.06
(min-max) and 87.97 (percentile); 4-bit weights only 88.03; 4-bit k-means weights 90.61; W4A4
86.68; 3-bit k-means 82.87. Prints a markdown table, then one JSON line; docs/quantization.md has
the table.

Schemes (``ptq.schemes``): ``w<b>a<c>[/<calibration>]`` uniform b-bit weights and c-bit inputs;
``w<b>`` weights only; ``k<b>`` k-means weights (2^b centroids per kernel). The first conv and last
dense stay at ``ptq.first_last_bits`` (uniform, also for k-means rows). Override, e.g.:
``--config.ptq.schemes="('w8a8/mse', 'k2')" --config.ptq.first_last_bits=0``.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """No variants; ``arg`` must be empty."""
  if arg:
    raise ValueError(f"configs/ptq.py takes no variant, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.model = common.model_config("resnet20", "resnet20_cifar10")
  c.data = common.data_config("cifar10")  # train_split: calibration images; eval_split: reported
  c.ptq = ml_collections.ConfigDict()
  c.ptq.schemes = ("w8a8/minmax", "w8a8/percentile", "w4a8/minmax", "w4a8/percentile", "w4",
                   "k4", "w4a4/percentile", "k3")  # rows after float, see the docstring
  c.ptq.first_last_bits = 8  # bits of the first conv and last dense (0: keep them float)
  c.ptq.per_channel = True  # one kernel scale per output channel (False: one per tensor)
  c.ptq.percentile = 99.99  # p of "percentile" calibration: range [100 - p, p] percentiles
  c.ptq.calibration_examples = 512  # first N images of data.train_split, unaugmented
  c.ptq.calibration_batch_size = 128  # images per calibration batch
  c.ptq.kmeans_iters = 30  # Lloyd iterations of the k-means rows
  return c
