"""Optimizers and learning-rate schedules from a typed :class:`OptimizerSpec`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax

from jaxcompress.errors import check_positive, check_range, invalid, unknown

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The base optimizer and its learning-rate schedule (the CIFAR ResNet recipe by default).

  Validated when built: every field is in range, or :class:`~jaxcompress.errors.ConfigError`
  names it as ``SECTION.<field>``, ``section`` (not a field: ``train`` by default) being the
  config section the spec is built from.

  Attributes:
    epochs: length of the schedule in epochs (>= 0; may be fractional).
    optimizer: ``sgd`` (PyTorch-style: decay added to the gradient) or ``adamw``.
    learning_rate: peak learning rate (> 0).
    momentum: sgd momentum, in ``[0, 1)``.
    nesterov: sgd Nesterov momentum.
    weight_decay: L2 (sgd) or decoupled (adamw) weight decay (>= 0).
    schedule: ``cosine``, ``step`` or ``constant``.
    warmup_epochs: linear warmup from 0, in ``[0, epochs]``.
    decay_at: ``step`` schedule: fractions of training where the rate is multiplied...
    decay_factor: ... by this factor, in ``(0, 1]``.
  """
  epochs: float = 200.0
  optimizer: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  schedule: str = "cosine"
  warmup_epochs: float = 0.0
  decay_at: tuple = (0.5, 0.75)
  decay_factor: float = 0.1
  section: dataclasses.InitVar[str] = "train"

  def __post_init__(self, section: str):
    check_positive(f"{section}.epochs", self.epochs, zero=True)
    if self.optimizer not in OPTIMIZERS:
      raise unknown(f"{section}.optimizer", self.optimizer, OPTIMIZERS)
    if self.schedule not in SCHEDULES:
      raise unknown(f"{section}.schedule", self.schedule, SCHEDULES)
    check_positive(f"{section}.learning_rate", self.learning_rate)
    check_positive(f"{section}.weight_decay", self.weight_decay, zero=True)
    check_range(f"{section}.momentum", self.momentum, 0.0, 1.0)
    if not isinstance(self.nesterov, (bool, np.bool_)):
      raise invalid(f"{section}.nesterov", self.nesterov, "True or False")
    if self.nesterov and self.optimizer != "sgd":
      raise invalid(f"{section}.nesterov", True, f"False with {section}.optimizer={self.optimizer}",
                    "Nesterov momentum is sgd's; adamw has none")
    if self.nesterov and not self.momentum:
      raise invalid(f"{section}.nesterov", True, f"False with {section}.momentum=0",
                    "Nesterov momentum needs momentum > 0")
    check_range(f"{section}.warmup_epochs", self.warmup_epochs, 0.0, max(self.epochs, 0) + 1e-9,
                hi_closed=True)
    if isinstance(self.decay_at, (str, bytes)) or not isinstance(self.decay_at, Sequence):
      raise invalid(f"{section}.decay_at", self.decay_at, "a sequence of fractions of training in "
                    "(0, 1), e.g. (0.5, 0.75)")
    for i, f in enumerate(self.decay_at):
      check_range(f"{section}.decay_at[{i}]", f, 0.0, 1.0, lo_closed=False)
    # a decay: a factor > 1 would raise the rate at each fraction of decay_at
    check_range(f"{section}.decay_factor", self.decay_factor, 0.0, 1.0, lo_closed=False,
                hi_closed=True)
    object.__setattr__(self, "decay_at", tuple(self.decay_at))

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], section: str = "train") -> "OptimizerSpec":
    """The spec from the fields of ``values`` it names (a job's ``train`` config section holds
    loop settings too; they are not read here); messages name them under ``section``."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values},
               section=section)



def learning_rate_schedule(spec: OptimizerSpec, steps_per_epoch: int) -> optax.Schedule:
  """``step -> learning rate``: optional linear warmup, then cosine, step or constant.

  ``step`` multiplies the rate by ``spec.decay_factor`` at each fraction ``f`` of training in
  ``spec.decay_at`` (e.g. ``(0.5, 0.75)``, the usual CIFAR ResNet recipe), from the first step
  ``>= f * total`` on; fractions that reach the same step each apply their factor.

  Args:
    spec: the optimizer spec (a mapping with its fields is converted).
    steps_per_epoch: optimizer steps per epoch.
  """
  if isinstance(spec, Mapping):
    spec = OptimizerSpec.from_mapping(spec)
  total = max(1, int(round(spec.epochs * steps_per_epoch)))
  warmup = int(round(spec.warmup_epochs * steps_per_epoch))
  lr = spec.learning_rate
  if spec.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif spec.schedule == "step":
    bounds: dict[int, float] = {}  # steps of `main`, which starts after the warmup
    for f in spec.decay_at:
      at = math.ceil(round(f * total, 9)) - warmup  # rounded first: 0.7 * 10 is 7.000000000000001
      bounds[at] = bounds.get(at, 1.0) * spec.decay_factor
    main = optax.piecewise_constant_schedule(lr, bounds)
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(spec: OptimizerSpec, steps_per_epoch: int, *,
                   decay_mask=None) -> optax.GradientTransformation:
  """The base optimizer of ``spec``.

  ``sgd`` follows PyTorch's ``SGD(momentum, weight_decay)``: the decay is added to the gradient
  before momentum, on every parameter (BatchNorm included, as in the recipe of the pretrained
  CIFAR ResNets). ``adamw`` uses decoupled weight decay.

  Args:
    spec: the optimizer spec (a job builds it from its ``train`` section with
      :meth:`OptimizerSpec.from_mapping`).
    steps_per_epoch: for the learning-rate schedule.
    decay_mask: optional pytree (or ``params -> pytree``) of booleans: decay only where True
      (e.g. not on learned quantization step sizes).

  Example:
    >>> opt = make_optimizer(OptimizerSpec(epochs=30, learning_rate=0.02), steps_per_epoch=390)
  """
  schedule = learning_rate_schedule(spec, steps_per_epoch)
  if spec.optimizer == "sgd":
    return _same_under_x64(optax.chain(
        optax.add_decayed_weights(spec.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=spec.momentum or None, nesterov=bool(spec.nesterov))))
  return _same_under_x64(optax.adamw(schedule, weight_decay=spec.weight_decay, mask=decay_mask))


def _same_under_x64(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose update runs with ``jax_enable_x64`` off when no array it reads is wider than 32
  bits: optax computes the learning-rate schedule and Adam's bias corrections from the int32 step
  count and Python floats, which x64 promotes to float64, so a float32 model would otherwise take
  other steps (by float32 rounding) with x64 on than off. A float64 model keeps x64."""
  def update(updates, state, params=None, **extra_args):
    narrow = all(np.dtype(x.dtype).itemsize <= 4 for x in jax.tree.leaves((updates, state, params))
                 if hasattr(x, "dtype"))
    if not (narrow and jax.config.jax_enable_x64):
      return tx.update(updates, state, params, **extra_args)
    with jax.enable_x64(False):
      return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update)
