"""Optimizers and learning-rate schedules built from a ``train`` config section."""

from __future__ import annotations

import optax

from jaxcompress.errors import check_range, invalid, unknown

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def validate_train_config(cfg) -> None:
  """Checks a ``train`` config section; raises a one-line ConfigError for the first bad field."""
  if cfg.epochs < 0:
    raise invalid("train.epochs", cfg.epochs, ">= 0")
  if cfg.optimizer not in OPTIMIZERS:
    raise unknown("train.optimizer", cfg.optimizer, OPTIMIZERS)
  if cfg.schedule not in SCHEDULES:
    raise unknown("train.schedule", cfg.schedule, SCHEDULES)
  if not cfg.learning_rate > 0:
    raise invalid("train.learning_rate", cfg.learning_rate, "> 0")
  if cfg.weight_decay < 0:
    raise invalid("train.weight_decay", cfg.weight_decay, ">= 0")
  check_range("train.momentum", cfg.momentum, 0.0, 1.0)
  check_range("train.warmup_epochs", cfg.warmup_epochs, 0.0, max(cfg.epochs, 0) + 1e-9,
              hi_closed=True)


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
  """``step -> learning rate``: optional linear warmup, then cosine, step or constant.

  ``step`` decays by ``cfg.decay_factor`` at each fraction of training in
  ``cfg.decay_at`` (e.g. ``(0.5, 0.75)``), the usual CIFAR ResNet recipe.
  """
  total = max(1, int(round(cfg.epochs * steps_per_epoch)))
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  lr = cfg.learning_rate
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif cfg.schedule == "step":
    bounds = {int(f * total) - warmup: cfg.decay_factor for f in cfg.decay_at}
    main = optax.piecewise_constant_schedule(lr, bounds)
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg, steps_per_epoch: int, *, decay_mask=None) -> optax.GradientTransformation:
  """The base optimizer of a ``train`` section.

  ``sgd`` follows PyTorch's ``SGD(momentum, weight_decay)``: the decay is added to the gradient
  before momentum, on every parameter (BatchNorm included, as in the recipe of the pretrained
  CIFAR ResNets). ``adamw`` uses decoupled weight decay.

  Args:
    cfg: the ``train`` section.
    steps_per_epoch: for the learning-rate schedule.
    decay_mask: optional pytree (or ``params -> pytree``) of booleans: decay only where True
      (e.g. not on learned quantization step sizes).
  """
  validate_train_config(cfg)
  schedule = learning_rate_schedule(cfg, steps_per_epoch)
  if cfg.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=cfg.momentum or None,
                                 nesterov=bool(cfg.nesterov)))
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
