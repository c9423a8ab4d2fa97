"""train_and_evaluate end to end on mock data: metrics, checkpoints, exact resume."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import train as train_config
from experiments import train_job
from experiments.train_job import train_and_evaluate
from jaxcompress.errors import ConfigError


def _config(epochs):
  c = train_config.get_config()
  c.model.name = "mlp"
  c.data.name = "mnist"
  c.data.mean, c.data.std = (0.5,), (0.5,)
  c.data.batch_size = 16
  c.data.eval_batch_size = 24
  c.train.epochs = epochs
  c.train.schedule = "constant"
  c.train.learning_rate = 0.01
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 3
  return c


def _run(config, workdir):
  with tfds.testing.mock_data(num_examples=64):
    return train_and_evaluate(config, str(workdir))


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  straight = _run(_config(2), tmp_path / "a")
  first = _run(_config(1), tmp_path / "b")
  resumed = _run(_config(2), tmp_path / "b")
  assert resumed["loss"] == straight["loss"]
  assert resumed["accuracy"] == straight["accuracy"]
  assert first["loss"] != straight["loss"]
  assert straight["examples"] == 64 and len(straight["recall"]) == 10
  records = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(steps) and steps[-1] == 8  # 64 / 16 = 4 steps an epoch, 2 epochs
  assert {"loss", "accuracy", "images_per_s", "epoch"} <= set(records[0])
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints"))[-1] == "8"
  # Each finished length records its final evaluation: epoch 1 at step 4, epoch 2 at step 8.
  finals = [r for r in records if r.get("final")]
  assert [r["step"] for r in finals] == [4, 8]
  assert finals[-1]["eval_loss"] == pytest.approx(resumed["loss"])
  # The run extended from 1 to 2 epochs evaluates epoch 1 in its log, as the straight run did.
  straight_log = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  evals = [[(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r and not r.get("final")]
           for log in (straight_log, records)]
  assert evals[0] == evals[1] and [s for s, _ in evals[0]] == [4]


def test_a_rerun_with_fewer_epochs_is_refused_and_leaves_the_run_alone(tmp_path):
  _run(_config(2), tmp_path)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(ConfigError, match=r"^train.epochs=1 is 4 steps, and .* has trained 8: a "
                                        r"rerun may raise train.epochs, not lower it"):
    _run(_config(1), tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_workdir_of_another_config_is_refused_and_left_alone(tmp_path):
  _run(_config(1), tmp_path)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  c = _config(1)
  c.train.learning_rate = 0.05
  with pytest.raises(ConfigError, match=r"holds a run with a different config: "
                     r"train.learning_rate is 0.01 there, 0.05 here"):
    _run(c, tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_an_unknown_compute_dtype_writes_nothing(tmp_path):
  c = _config(1)
  c.train.compute_dtype = "float8"
  with pytest.raises(ConfigError, match="train.compute_dtype must be one of bfloat16, float32"):
    _run(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_a_bad_split_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
  # building a randomly initialised model compiles its init: seconds a refusal must not wait for
  def build(*args, **kwargs):
    raise AssertionError("the model was built before the data was opened")

  def load_data(data):
    raise ConfigError(f"data.eval_split: cannot read split {data.eval_split!r}")

  monkeypatch.setattr(train_job, "create_model", build)
  monkeypatch.setattr(train_job, "load_data", load_data)
  c = _config(1)
  c.data.eval_split = "tset"
  with pytest.raises(ConfigError, match=r"^data.eval_split: cannot read split 'tset'$"):
    train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_batch_larger_than_the_data_is_rejected(tmp_path):
  c = _config(1)
  c.data.batch_size = 128
  with pytest.raises(ConfigError, match="data.batch_size must be at most the 64 training"):
    _run(c, tmp_path)


def test_loop_spec_rejects_bad_intervals_and_reads_only_its_fields():
  from configs import common
  from jaxcompress.train import LoopSpec
  spec = LoopSpec.from_mapping(common.train_config())  # optimizer fields are not read
  assert spec == LoopSpec(epochs=200.0, log_every_steps=50, checkpoint_every_steps=500,
                          eval_every_epochs=1)
  with pytest.raises(ConfigError, match=r"train.checkpoint_every_steps must be >= 1, got 0"):
    LoopSpec(checkpoint_every_steps=0)
  with pytest.raises(ConfigError, match=r"train.epochs must be >= 0, got -1"):
    LoopSpec(epochs=-1)
  for epochs in (float("nan"), float("inf"), "1", None):
    with pytest.raises(ConfigError, match=r"^train.epochs must be a finite number >= 0, got "):
      LoopSpec(epochs=epochs)
  for field in ("log_every_steps", "eval_every_epochs"):
    with pytest.raises(ConfigError, match=rf"^train.{field} must be an integer >= 1, got 1.5$"):
      LoopSpec(**{field: 1.5})
  assert LoopSpec(log_every_steps=2.0).log_every_steps == 2.0  # a whole number, as a float
  # A spec built from another config section names its fields there.
  with pytest.raises(ConfigError, match=r"^lstm.train.eval_every_epochs must be >= 1, got 0$"):
    LoopSpec.from_mapping({"eval_every_epochs": 0}, "lstm.train")


def test_fit_with_typed_specs_equals_fit_with_config_sections(tmp_path):
  import jax
  import numpy as np

  from jaxcompress.data import DataSpec
  from jaxcompress.models import create_model
  from jaxcompress.optim import OptimizerSpec, make_optimizer
  from jaxcompress.steps import TrainState, make_train_step, supervised_loss
  from jaxcompress.train import LoopSpec, fit
  c = _config(1)
  rng = np.random.default_rng(0)
  train = (rng.integers(0, 256, (48, 28, 28, 1), dtype=np.uint8),
           rng.integers(0, 10, 48).astype(np.int32))
  model, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  out = {}
  for name, (data, opt, loop) in {
      "spec": (DataSpec.from_mapping(c.data), OptimizerSpec.from_mapping(c.train),
               LoopSpec.from_mapping(c.train)),
      "config": (c.data, c.train, c.train),
      "dict": (c.data.to_dict(), c.train, c.train.to_dict())}.items():
    tx = make_optimizer(opt, 3)
    state = TrainState.create(v["params"], {}, tx)
    step = make_train_step(supervised_loss(model), tx)
    out[name], info = fit(state, step, train, data, loop, str(tmp_path / name))
    assert info["steps"] == 3  # 48 // 16 steps, 1 epoch
  for other in ("config", "dict"):
    for a, b in zip(jax.tree.leaves(out["spec"].params), jax.tree.leaves(out[other].params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(out["spec"].params["fc1"]["kernel"]),
                            np.asarray(v["params"]["fc1"]["kernel"]))
  few = (train[0][:10], train[1][:10])  # fewer examples than one batch of 16
  with pytest.raises(ConfigError, match=r"^data.batch_size must be at most the 10 training "
                                        r"examples given"):
    fit(state, step, few, DataSpec.from_mapping(c.data), LoopSpec.from_mapping(c.train),
        str(tmp_path / "few"))
  assert not os.path.exists(tmp_path / "few" / "checkpoints")
  # A plain dict is checked as the spec it becomes: one line naming the field.
  with pytest.raises(ConfigError, match=r"^data.batch_size must be an integer > 0, got 0"):
    fit(state, step, train, {**c.data.to_dict(), "batch_size": 0}, c.train.to_dict(),
        str(tmp_path / "zero"))


def test_evaluate_split_and_load_data_take_a_dict_data_section():
  import numpy as np

  from jaxcompress.steps import make_eval_step
  from jaxcompress.train import evaluate_split, load_data
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (10, 2, 2, 1), dtype=np.uint8)
  y = rng.integers(0, 3, 10).astype(np.int32)
  step = make_eval_step(lambda v, img: img.reshape(img.shape[0], -1)[:, :3])
  data = {"name": "mnist", "eval_batch_size": 4, "mean": (0.5,), "std": (0.25,)}
  got = evaluate_split(step, None, (x, y), data)
  # NumPy oracle: the class of the largest of the first 3 normalised pixels.
  logits = (x.reshape(10, -1)[:, :3] / 255.0 - 0.5) / 0.25
  assert got["examples"] == 10
  assert got["accuracy"] == pytest.approx(100.0 * np.mean(logits.argmax(-1) == y))
  # A batch larger than the split evaluates it in one batch of its size, not padded to 10**12.
  assert evaluate_split(step, None, (x, y), {**data, "eval_batch_size": 10**12}) == got
  with tfds.testing.mock_data(num_examples=40):
    splits = load_data({"name": "mnist", "train_split": "train", "val_examples": 8,
                        "batch_size": 8, "mean": (0.5,), "std": (0.5,)})
  assert (len(splits["train"]), len(splits["val"])) == (32, 8)


def test_the_training_job_trains_an_nnx_model_named_module_factory(tmp_path, monkeypatch):
  (tmp_path / "nnx_train_models.py").write_text(
      "from flax import nnx\n"
      "class Net(nnx.Module):\n"
      "  def __init__(self, num_classes, rngs):\n"
      "    self.fc = nnx.Linear(784, 32, rngs=rngs)\n"
      "    self.bn = nnx.BatchNorm(32, rngs=rngs)\n"
      "    self.out = nnx.Linear(32, num_classes, rngs=rngs)\n"
      "  def __call__(self, x):\n"
      "    return self.out(nnx.relu(self.bn(self.fc(x.reshape((x.shape[0], -1))))))\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  c = _config(1)
  c.model.name = "nnx_train_models:Net"
  result = _run(c, tmp_path / "w")
  assert result["examples"] == 64 and 0 <= result["accuracy"] <= 100
  assert result["epochs"] == 1.0


def test_results_hold_the_held_out_slice_as_numpy_evaluates_it(tmp_path):
  # No step (0 epochs): the evaluated model is the seeded initial MLP, which NumPy runs too.
  c = _config(0)
  c.data.val_examples = 16
  result = _run(c, tmp_path)
  assert json.load(open(tmp_path / "results.json")) == json.loads(json.dumps(result))
  from jaxcompress.models import create_model
  _, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=c.seed)
  with tfds.testing.mock_data(num_examples=64):
    source = tfds.data_source("mnist", split="train")
    held = [source[i] for i in range(48, 64)]  # the last 16 of the 64 training examples
  x = np.stack([e["image"] for e in held]).reshape(16, -1) / 255.0 / 0.5 - 1.0
  y = np.array([e["label"] for e in held])
  p = {k: {n: np.asarray(a, np.float64) for n, a in layer.items()}
       for k, layer in v["params"].items()}
  h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
  logits = h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
  shifted = logits - logits.max(-1, keepdims=True)
  nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(16), y]
  val = result["val"]
  assert val["examples"] == 16 and result["examples"] == 64  # the eval split: mock test
  assert val["loss"] == pytest.approx(nll.mean(), rel=1e-5)
  assert val["accuracy"] == pytest.approx(100 * np.mean(logits.argmax(-1) == y))


def test_a_rerun_of_a_finished_run_returns_its_results_without_training_or_evaluating(
    tmp_path, monkeypatch):
  c = _config(1)
  c.data.val_examples = 16
  first = _run(c, tmp_path)
  assert first["steps"] == 3 and first["val"]["examples"] == 16  # 48 examples, batch 16
  log = (tmp_path / "metrics.jsonl").read_text()

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was trained or evaluated again")

  monkeypatch.setattr(train_job, "fit", refuse)
  monkeypatch.setattr(train_job, "evaluate_split", refuse)
  assert _run(c, tmp_path) == json.load(open(tmp_path / "results.json"))
  assert json.load(open(tmp_path / "results.json")) == json.loads(json.dumps(first))
  assert (tmp_path / "metrics.jsonl").read_text() == log
