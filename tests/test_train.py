"""train_and_evaluate end to end on mock data: metrics, checkpoints, exact resume."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from configs import train as train_config
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


def test_batch_larger_than_the_data_is_rejected(tmp_path):
  c = _config(1)
  c.data.batch_size = 128
  with pytest.raises(ConfigError, match="data.batch_size must be at most the 64 training"):
    _run(c, tmp_path)
