"""Train-step variants timed by ``experiments/bench.py``.

Each variant is the composed ResNet-20 CIFAR train step (:mod:`jaxcompress.compose`) with a
subset of the compression methods switched on, so ``python -m experiments.bench`` measures what
each method adds to the step: ``plain`` (none), ``prune`` (80 % gradual magnitude pruning),
``wquant`` (4-bit per-channel weights), ``waquant`` (+ 8-bit inputs), ``kd`` (Hinton KD with the
ResNet-56 teacher's forward in the step) and ``all``. ``teacher_forward`` times the teacher's
eval-mode forward alone, the yardstick of the ``kd`` target.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from configs import cifar_distill
from experiments.pipeline import compression_specs
from jaxcompress import compose
from jaxcompress.errors import unknown
from jaxcompress.models import create_model
from jaxcompress.models.functional import functional
from jaxcompress.optim import OptimizerSpec, make_optimizer

VARIANTS = {  # name -> (prune, weight quant, activation quant, distill)
    "plain": (False, False, False, False),
    "prune": (True, False, False, False),
    "wquant": (False, True, False, False),
    "waquant": (False, True, True, False),
    "kd": (False, False, False, True),
    "all": (True, True, True, True),
}


class Variant(NamedTuple):
  """A ready-to-run step; ``run`` times ``steps`` calls and keeps the last state."""
  step: Callable
  state: list  # one-element box: the state is replaced on every call
  args: tuple

  def run(self, batches, steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps; returns (images/s wall, process CPU seconds)."""
    state = self.state[0]
    jax.block_until_ready(state)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, _ = self.step(state, batches[i % len(batches)], *self.args)
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    self.state[0] = state
    return steps * batches[0].image.shape[0] / wall, cpu


def _config(prune: bool, wquant: bool, aquant: bool, distill: bool):
  c = cifar_distill.get_config()
  c.prune.method = "magnitude" if prune else "none"
  c.quant.weight_bits = 4 if wquant else 0
  c.quant.first_last_bits = 8 if (wquant or aquant) else 0
  c.quant.act_bits = 8 if aquant else 0
  c.distill.alpha = 0.9 if distill else 0.0
  return c


def build_variant(name: str, sample_x: np.ndarray, teacher=None) -> Variant:
  """The composed train step of variant ``name`` on randomly initialised ResNet-20 weights."""
  prune, wquant, aquant, distill = VARIANTS[name]
  config = _config(prune, wquant, aquant, distill)
  student, student_vars = create_model("resnet20", num_classes=10, image_shape=(32, 32, 3))
  model, tvars = teacher if distill else (None, None)
  optimizer = make_optimizer(OptimizerSpec.from_mapping(config.train), 390,
                             decay_mask=compose.decay_mask)
  comp = compose.build(student, student_vars, sample_x, optimizer=optimizer,
                       total_steps=390 * 30, teacher=model, **compression_specs(config))
  state = comp.init_state(student_vars, sample_x, teacher_vars=tvars, calibration=[sample_x])
  return Variant(comp.make_train_step(), [state], (tvars,) if distill else ())


def teacher_forward(teacher) -> Callable:
  """``fn(batch) -> logits`` of the teacher in eval mode, jitted (the KD step's extra work)."""
  model, variables = teacher
  fwd = jax.jit(lambda v, x, fm=functional(model): fm.apply(v, x)[0])
  return lambda batch: fwd(variables, batch.image)


def build_variants(names: list[str] | None, sample_x: np.ndarray) -> tuple[dict, Callable]:
  """Builds the named variants (all when ``names`` is None) and the teacher-forward timer."""
  names = list(VARIANTS) if not names else names
  for n in names:
    if n not in VARIANTS:
      raise unknown("--variants", n, VARIANTS)
  teacher = create_model("resnet56", num_classes=10, image_shape=(32, 32, 3))
  return {n: build_variant(n, sample_x, teacher) for n in names}, teacher_forward(teacher)
