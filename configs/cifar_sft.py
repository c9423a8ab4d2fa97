"""Ablation of ``cifar_distill``: the same compression, then plain supervised fine-tuning.

No teacher (``distill.alpha = 0``): the compressed ResNet-20 recovers with cross-entropy on the
labels alone, supervised fine-tuning. Compare its report with
``cifar_distill``'s to see what distillation adds.

  python -m experiments.cifar_distill --config=configs/cifar_sft.py:quick --workdir=runs/sft_quick
"""

import ml_collections

from configs import cifar_distill


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Same variants as ``cifar_distill``: None for the full run, ``quick`` for the CPU-sized one."""
  if arg not in (None, "quick"):
    raise ValueError(f"configs/cifar_sft.py: unknown variant {arg!r}; valid: quick")
  c = cifar_distill.get_config(arg)
  c.distill.alpha = 0.0  # no KD term ...
  c.distill.feature_weight = 0.0  # ... and no hints: the teacher is not used
  c.eval.teacher = False  # and not evaluated
  return c
