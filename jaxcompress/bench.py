"""Train-step variants timed by ``experiments/bench.py``.

Each variant is a jitted ResNet-20 CIFAR train step with one compression method switched on, so
``python -m experiments.bench`` measures what each method adds to the step. New methods register a
builder in :data:`BUILDERS`.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax

from configs import common
from jaxcompress.errors import unknown
from jaxcompress.models import create_model
from jaxcompress.optim import make_optimizer
from jaxcompress.steps import TrainState, make_train_step, supervised_loss


class Variant(NamedTuple):
  """A ready-to-run train step and its state; ``run`` times ``steps`` calls."""
  step: Callable
  state: list  # one-element box: the state is replaced (donated) on every call

  def run(self, batches, steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps; returns (images/s wall, process CPU seconds)."""
    state = self.state[0]
    jax.block_until_ready(state)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
      state, _ = self.step(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    self.state[0] = state
    return steps * batches[0].image.shape[0] / wall, cpu


def _plain() -> Variant:
  model, variables = create_model("resnet20", num_classes=10, image_shape=(32, 32, 3))
  cfg = common.train_config()
  opt = make_optimizer(cfg, 390)
  params = variables.pop("params")
  state = TrainState.create(params, variables, opt)
  return Variant(make_train_step(supervised_loss(model.apply), opt), [state])


BUILDERS: dict[str, Callable[[], Variant]] = {"plain": _plain}


def build_variants(names: list[str] | None) -> dict[str, Variant]:
  """Builds the named variants (all when ``names`` is None); ``plain`` always comes first."""
  names = list(BUILDERS) if not names else names
  for n in names:
    if n not in BUILDERS:
      raise unknown("--variants", n, BUILDERS)
  return {n: BUILDERS[n]() for n in names}
