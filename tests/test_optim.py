"""OptimizerSpec: validated when built, read from the fields of a config section."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from jaxcompress.errors import ConfigError
from jaxcompress.optim import OptimizerSpec, make_optimizer


@pytest.mark.parametrize("field,value,message", [
    ("epochs", -1.0, r"train.epochs must be >= 0, got -1.0"),
    ("optimizer", "adam", r"train.optimizer must be one of adamw, sgd, got 'adam'"),
    ("schedule", "linear", r"train.schedule must be one of constant, cosine, step, got 'linear'"),
    ("learning_rate", 0.0, r"train.learning_rate must be > 0, got 0.0"),
    ("weight_decay", -1e-4, r"train.weight_decay must be >= 0"),
    ("momentum", 1.0, r"train.momentum must be in \[0.0, 1.0\)"),
    ("warmup_epochs", 3.0, r"train.warmup_epochs must be in"),
    ("learning_rate", float("inf"), r"train.learning_rate must be a finite number > 0, got inf"),
    ("weight_decay", float("nan"), r"train.weight_decay must be a finite number >= 0, got nan"),
    ("decay_at", (1.5, -0.2), r"train.decay_at\[0\] must be in \(0.0, 1.0\), got 1.5"),
    ("decay_at", "0.5", r"train.decay_at must be a sequence of fractions"),
    ("decay_at", 0.5, r"train.decay_at must be a sequence of fractions"),
    ("decay_factor", -1.0, r"train.decay_factor must be in \(0.0, 1.0\], got -1.0"),
    ("decay_factor", 1.5, r"train.decay_factor must be in \(0.0, 1.0\], got 1.5"),
    ("nesterov", "False", r"train.nesterov must be True or False, got 'False'"),
])
def test_a_bad_field_is_rejected_when_the_spec_is_built(field, value, message):
  with pytest.raises(ConfigError, match=message):
    OptimizerSpec(**{"epochs": 2.0, field: value})


def test_from_mapping_reads_the_optimizer_fields_of_a_train_section():
  section = common.train_config()  # also holds log_every_steps & co., which are not read
  spec = OptimizerSpec.from_mapping(section)
  assert spec == OptimizerSpec(epochs=200.0, optimizer="sgd", learning_rate=0.1, momentum=0.9,
                               nesterov=False, weight_decay=1e-4, schedule="cosine",
                               warmup_epochs=0.0, decay_at=(0.5, 0.75), decay_factor=0.1)


def test_a_spec_of_another_section_names_its_fields_there():
  # A spec built from teacher.train named its fields train.* (a job rewrote the message).
  section = {**common.train_config(), "momentum": 0.0, "nesterov": True}
  with pytest.raises(ConfigError, match=r"^teacher.train.nesterov must be False with "
                                        r"teacher.train.momentum=0, got True; "):
    OptimizerSpec.from_mapping(section, "teacher.train")
  with pytest.raises(ConfigError, match=r"^pretrain.decay_at\[1\] must be in \(0.0, 1.0\), "
                                        r"got 2.0$"):
    OptimizerSpec(epochs=2.0, decay_at=(0.5, 2.0), section="pretrain")
  assert OptimizerSpec(epochs=2.0, section="pretrain") == OptimizerSpec(epochs=2.0)


def test_sgd_update_matches_the_pytorch_rule_by_hand():
  # PyTorch SGD: g' = g + wd * w; buf = g' (first step); w -= lr * buf.
  spec = OptimizerSpec(epochs=1.0, learning_rate=0.5, momentum=0.9, weight_decay=0.1,
                       schedule="constant")
  tx = make_optimizer(spec, 10)
  w, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  updates, _ = tx.update(g, tx.init(w), w)
  np.testing.assert_allclose(np.asarray(w + updates), [1.0 - 0.5 * 0.6, -2.0 - 0.5 * 0.05],
                             rtol=1e-6)


def test_nesterov_needs_momentum():
  with pytest.raises(ConfigError, match=r"^train.nesterov must be False with train.momentum=0"):
    OptimizerSpec(epochs=2.0, momentum=0.0, nesterov=True)


def test_nesterov_needs_sgd():
  # adamw has no Nesterov momentum: the flag would be ignored
  with pytest.raises(ConfigError, match=r"^train.nesterov must be False with "
                     r"train.optimizer=adamw, got True; Nesterov momentum is sgd's"):
    OptimizerSpec(epochs=2.0, optimizer="adamw", nesterov=True)


def _step_rates(spec, steps_per_epoch):
  """The learning rate of every step, by hand: warmup from 0, then the peak times the factor
  of every decay fraction f with step >= f * total (the steps counted from the start)."""
  total = round(spec.epochs * steps_per_epoch)
  warmup = round(spec.warmup_epochs * steps_per_epoch)
  rates = []
  for step in range(total):
    if step < warmup:
      rates.append(spec.learning_rate * step / warmup)
    else:
      decays = sum(step >= f * total for f in spec.decay_at)
      rates.append(spec.learning_rate * spec.decay_factor ** decays)
  return rates


@pytest.mark.parametrize("epochs,per_epoch,decay_at,warmup", [
    (1, 2, (0.5, 0.75), 0.0),   # both fractions land on step 1: two decays there
    (1, 10, (0.5, 0.5), 0.0),   # the same fraction twice
    (1, 10, (0.75,), 0.0),      # 7.5: from step 8, not 7
    (1, 3, (0.5,), 0.0),        # 1.5: from step 2, not 1
    (1, 10, (0.7,), 0.0),       # 0.7 * 10 is 7.000000000000001 in floats: from step 7
    (2, 10, (0.5, 0.75), 0.5),  # after a warmup
])
def test_step_schedule_decays_once_per_fraction_from_its_first_step(epochs, per_epoch, decay_at,
                                                                   warmup):
  from jaxcompress.optim import learning_rate_schedule
  spec = OptimizerSpec(epochs=epochs, schedule="step", learning_rate=0.1, decay_at=decay_at,
                       warmup_epochs=warmup)
  sched = learning_rate_schedule(spec, per_epoch)
  got = [float(sched(s)) for s in range(round(epochs * per_epoch))]
  np.testing.assert_allclose(got, _step_rates(spec, per_epoch), rtol=1e-6)
  as_mapping = learning_rate_schedule({"epochs": epochs, "schedule": "step", "learning_rate": 0.1,
                                       "decay_at": decay_at, "warmup_epochs": warmup}, per_epoch)
  np.testing.assert_allclose([float(as_mapping(s)) for s in range(len(got))], got)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("sgd", "step"),
                                                ("adamw", "constant")])
def test_a_float32_update_is_the_same_with_x64_on(optimizer, schedule):
  # optax's schedules and Adam's bias corrections are float64 under x64 (1 - 0.9 ** 1 is
  # 0.1 there, 0.100000024 in float32): the float32 steps differed in the last bits.
  import jax
  spec = OptimizerSpec(epochs=1.0, optimizer=optimizer, schedule=schedule, learning_rate=0.1,
                       warmup_epochs=0.2)
  w0 = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)

  def run():
    tx = make_optimizer(spec, 20)
    w, state, text = w0, tx.init(w0), ""
    for i in range(20):
      g = jnp.sin(w * (i + 1)).astype(jnp.float32)
      text += str(jax.make_jaxpr(tx.update)(g, state, w))
      updates, state = tx.update(g, state, w)
      w = w + updates
    return np.asarray(w), text

  want, _ = run()
  jax.config.update("jax_enable_x64", True)
  try:
    got, text = run()
  finally:
    jax.config.update("jax_enable_x64", False)
  np.testing.assert_array_equal(got, want)
  assert "f64" not in text
