"""fit's numeric guard: a diverged step stops training with one line and keeps the workdir good."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.checkpoint import Checkpointer
from jaxcompress import data as data_lib
from jaxcompress.data import DataSpec
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model
from jaxcompress.steps import TrainState, make_train_step, supervised_loss
from jaxcompress.train import LoopSpec, NonFiniteError, fit


def _setup():
  rng = np.random.default_rng(0)
  train = (rng.integers(0, 256, (48, 28, 28, 1), dtype=np.uint8),
           rng.integers(0, 10, 48).astype(np.int32))
  data = DataSpec.from_mapping({"name": "mnist", "batch_size": 16, "mean": (0.5,),
                                "std": (0.5,)})
  model, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  return train, data, model, v


def _fit(tx, loss_fn, v, train, data, workdir, epochs):
  state = TrainState.create(v["params"], {}, tx)
  loop = LoopSpec(epochs=epochs, log_every_steps=3, checkpoint_every_steps=4)
  return fit(state, make_train_step(loss_fn, tx), train, data, loop, str(workdir))


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def test_a_diverging_loss_stops_at_its_step_and_the_run_resumes(tmp_path):
  train, data, model, v = _setup()
  loss_fn = supervised_loss(model)
  # A sane rate for 4 steps, then one so large that step 6's loss is nan.
  blowup = optax.sgd(lambda count: jnp.where(count >= 4, 1e30, 0.01))
  with pytest.raises(NonFiniteError) as e:
    _fit(blowup, loss_fn, v, train, data, tmp_path, epochs=3)  # 9 steps
  msg = str(e.value)
  assert isinstance(e.value, ConfigError) and "\n" not in msg
  assert msg == ("training stopped at step 6: the loss is nan (or a label is outside the model's "
                 "classes); the workdir keeps the checkpoint of step 4; lower the learning rate "
                 "to go on (fit resumes from it; a job records its config: start a new "
                 "--workdir)")
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [4]
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  like = TrainState.create(v["params"], {}, blowup)
  restored, _ = ckpt.restore(like)
  ckpt.close()
  assert int(restored.step) == 4 and _finite(restored.params)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  # A record every 3 steps and at each checkpoint; the diverged interval is not logged.
  assert [r["step"] for r in records] == [3, 4]
  assert records[0]["finite"] == 1.0 and np.isfinite(records[0]["grad_norm"])

  sane = optax.sgd(lambda count: 0.01)  # the same optimizer-state structure, a lower rate
  state, info = _fit(sane, loss_fn, v, train, data, tmp_path, epochs=3)
  assert info["steps"] == 9 and int(state.step) == 9 and _finite(state.params)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [3, 4, 6, 8, 9]
  assert all(np.isfinite(r["loss"]) for r in records)


def test_a_non_finite_gradient_with_a_finite_loss_is_caught_before_any_checkpoint(tmp_path):
  train, data, model, v = _setup()
  task = supervised_loss(model)

  def loss_fn(params, model_state, batch, rng):
    loss, aux = task(params, model_state, batch, rng)
    w = params["fc1"]["kernel"][0, 0]
    return loss + 0.0 * jnp.sqrt(jnp.abs(w - w)), aux  # same value; d sqrt(0) = inf -> nan

  with pytest.raises(NonFiniteError, match=(
      r"^training stopped at step 1: the gradient norm is nan; the workdir has no checkpoint "
      r"yet; lower the learning rate and start again$")):
    _fit(optax.sgd(0.01), loss_fn, v, train, data, tmp_path, epochs=1)
  assert not os.listdir(tmp_path / "checkpoints")
  state, info = _fit(optax.sgd(0.01), task, v, train, data, tmp_path, epochs=1)
  assert info["steps"] == 3 and _finite(state.params)


def test_an_update_that_makes_a_parameter_inf_is_caught_at_its_step(tmp_path):
  """Step 5's loss and gradients are finite, but its learning rate (inf) makes the parameters
  inf/nan: that step stops the run (its checkpoint would hold them), or is skipped."""
  train, data, model, v = _setup()
  tx = optax.sgd(lambda count: jnp.where(count >= 4, jnp.inf, 0.01))
  loop = LoopSpec(epochs=2, log_every_steps=1, checkpoint_every_steps=5)  # 6 steps
  with pytest.raises(NonFiniteError, match=(
      r"^training stopped at step 5: its update turned a parameter into nan or inf; the workdir "
      r"has no checkpoint yet")):
    fit(TrainState.create(v["params"], {}, tx), make_train_step(supervised_loss(model), tx),
        train, data, loop, str(tmp_path / "stop"))
  assert not os.listdir(tmp_path / "stop" / "checkpoints")
  step = make_train_step(supervised_loss(model), tx, skip_nonfinite=True)
  before, _ = fit(TrainState.create(v["params"], {}, tx), step, train, data,
                  LoopSpec(epochs=4 / 3), str(tmp_path / "skip"))
  after, info = fit(before, step, train, data, loop, str(tmp_path / "skip"))
  assert info["skipped"] == 2 and int(after.step) == 6  # steps 5 and 6, as lr stays inf
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):  # the step-4 state
    if a.ndim:
      np.testing.assert_array_equal(a, b)


def test_a_checkpoint_holding_nan_is_refused_on_resume_naming_it(tmp_path):
  """One saved by a run that diverged unnoticed: resuming from it could only compute NaN."""
  train, data, model, v = _setup()
  tx = optax.sgd(0.01)
  state = TrainState.create(v["params"], {}, tx)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(3, state.replace(step=jnp.int32(3), params=jax.tree.map(
      lambda p: p.at[0].set(jnp.nan), state.params)))
  ckpt.close()
  with pytest.raises(ConfigError, match=(
      r"^.*checkpoints: the checkpoint of step 3: params\['fc1'\]\['bias'\] holds 1 NaN/Inf "
      r"value\(s\); a run resumed from it computes NaN: delete that step's folder")):
    _fit(tx, supervised_loss(model), v, train, data, tmp_path, epochs=2)


def test_skip_nonfinite_keeps_the_state_counts_the_steps_and_trains_on(tmp_path):
  train, data, model, v = _setup()
  train[0][0] = 255  # the one example whose batch gets a nan loss, once an epoch
  data = DataSpec.from_mapping({**data.__dict__, "augment": False})
  base = supervised_loss(model)

  def loss_fn(params, model_state, batch, rng):
    loss, aux = base(params, model_state, batch, rng)
    marked = jnp.any(jnp.all(batch.image >= 1.0, axis=(1, 2, 3)))  # 255 normalises to 1.0
    return jnp.where(marked, jnp.nan, loss), aux

  tx = optax.sgd(0.01)
  step = make_train_step(loss_fn, tx, skip_nonfinite=True)
  state = TrainState.create(v["params"], {}, tx)
  marked = data_lib.Batch(np.ones((16, 28, 28, 1), np.float32), np.zeros(16, np.int32),
                          np.ones(16, np.float32))
  after, metrics = step(state, marked)
  assert float(metrics["skipped"]) == 1.0 and float(metrics["finite"]) == 0.0
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  loop = LoopSpec(epochs=3, log_every_steps=3, checkpoint_every_steps=4)
  state, info = fit(state, step, train, data, loop, str(tmp_path))  # 9 steps, 3 of them nan
  assert info["steps"] == 9 and info["skipped"] == 3 and _finite(state.params)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert sum(r["skipped"] for r in records) == 3
  # Each record's means are over the steps taken; a window of skipped steps only shows theirs,
  # a nan loss logged as null (strict JSON).
  steps = [0] + [r["step"] for r in records]
  assert steps[1:] == [3, 4, 6, 8, 9]
  assert [r["loss"] is not None for r in records] == [
      r["skipped"] < n for r, n in zip(records, np.diff(steps))]


def test_a_stop_in_the_middle_of_training_finishes_the_save_in_flight(tmp_path, monkeypatch):
  """Ctrl-C or SIGTERM (both KeyboardInterrupt) at step 6: the step-4 checkpoint is committed
  and orbax's threads are released before the stop goes on (closed once, not left running)."""
  train, data, model, v = _setup()
  tx = optax.sgd(0.01)
  step_fn = make_train_step(supervised_loss(model), tx)
  calls = []

  def stopping(state, batch):
    if len(calls) == 5:
      raise KeyboardInterrupt
    calls.append(1)
    return step_fn(state, batch)

  closed = []
  close = Checkpointer.close
  monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append(1), close(self)))
  loop = LoopSpec(epochs=3, log_every_steps=3, checkpoint_every_steps=4)
  with pytest.raises(KeyboardInterrupt):
    fit(TrainState.create(v["params"], {}, tx), stopping, train, data, loop, str(tmp_path))
  assert closed == [1]
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


class _Batches:
  """Three hand-made batches an epoch: batch 1 has a label 10 of weight 0 (padding, no error),
  batch 2 a label ``bad`` of weight 1 (10 classes: ids 0..9)."""
  batch_size, steps_per_epoch = 4, 3

  def __init__(self, bad):
    self.bad = bad

  def batches(self, seed, epoch, start):
    del seed, epoch
    for i in range(start, 3):
      labels, weight = np.arange(i, i + 4, dtype=np.int32), np.ones(4, np.float32)
      if i == 1:
        labels[3], weight[3] = 10, 0.0
      if i == 2:
        labels[1] = self.bad
      yield data_lib.Batch(np.full((4, 28, 28, 1), 0.1 * i, np.float32), labels, weight)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("bad", [-1, 10, 12])
def test_a_label_outside_the_classes_stops_with_one_line_even_when_skipping(tmp_path, skip, bad):
  # With skip_nonfinite the batch (every epoch) was dropped silently; without, the error blamed
  # the learning rate. Its loss is nan: fit names the label and stops at its step (3, by hand).
  _, _, model, v = _setup()
  tx = optax.sgd(0.01)
  step = make_train_step(supervised_loss(model), tx, skip_nonfinite=skip)
  state = TrainState.create(v["params"], {}, tx)
  with pytest.raises(ConfigError) as e:
    fit(state, step, _Batches(bad), None, LoopSpec(epochs=2), str(tmp_path))
  assert str(e.value) == (f"training stopped at step 3: batch.label holds class ids outside "
                          f"the model's classes, e.g. {bad}; labels must be in [0, num_classes): "
                          "fix them, or give an example without a label weight 0")
  assert not isinstance(e.value, NonFiniteError)
  _, info = fit(state, step, _Batches(5), None, LoopSpec(epochs=2), str(tmp_path / "good"))
  assert info["steps"] == 6 and info["skipped"] == 0  # the weight-0 label 10 stops nothing


def test_a_negative_weight_is_refused_before_its_step(tmp_path):
  # A weight of -1 turned its example's gradient around: fit trained on it without a word.
  _, _, model, v = _setup()
  tx = optax.sgd(0.01)
  calls = []
  step = make_train_step(supervised_loss(model), tx)

  class Negative(_Batches):
    def batches(self, seed, epoch, start):
      for b in super().batches(seed, epoch, start):
        yield b._replace(weight=np.array([1, 1, -0.5, 1], np.float32))

  with pytest.raises(ConfigError, match=r"^batch.weight must be >= 0, got -0.5 \(a negative "
                                        r"weight turns its example's gradient around\); 0 leaves "
                                        r"an example out$"):
    fit(TrainState.create(v["params"], {}, tx), lambda s, b: (calls.append(1), step(s, b))[1],
        Negative(5), None, LoopSpec(epochs=1), str(tmp_path))
  assert not calls
