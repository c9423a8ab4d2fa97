"""The iterative pruning job (``experiments.sensitivity.iterative_search``): every bad config is
one line and writes nothing, so the corrected command is not refused as "a different config"."""

import re

import pytest
import tensorflow_datasets as tfds

from configs import iterative_prune as iterative_config
from conftest import pretrained, requires_cifar10
from experiments import sensitivity
from experiments.sensitivity import iterative_search
from jaxcompress.errors import ConfigError

N = 64  # mock examples per split


def _tiny(**overrides):
  """The quick config on an MLP and mock MNIST; ``overrides``: ``{'section.field': value}``."""
  config = iterative_config.get_config("quick")
  config.model.name, config.model.weights = "mlp", ""
  config.data.name = "mnist"
  config.data.mean, config.data.std = (0.5,), (0.5,)
  config.data.batch_size, config.data.eval_batch_size = 16, 16
  config.data.val_examples = 16
  config.train.epochs = 1.0
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.mark.parametrize("overrides,message", [
    ({"prune.sparsities": (0.9, 0.5)},
     r"^prune.sparsities\[1\] must be > prune.sparsities\[0\]=0.9, got 0.5; list the targets in "
     r"increasing order$"),
    ({"prune.sparsities": (0.5, 0.5)}, r"^prune.sparsities\[1\] must be > "),
    ({"prune.sparsities": (0.5, 1.0)}, r"^prune.sparsities\[1\] must be in \[0.0, 1.0\), got 1.0"),
    ({"data.val_examples": 60000},
     r"^data.val_examples must be in \[0, 64\) for mnist/train, got 60000$"),
    ({"train.epochs": 0.01}, r"^train.epochs must be at least one step per round"),
    ({"prune.tolerance": float("nan")}, r"^prune.tolerance must be a number >= 0 \(accuracy "
                                        r"points\), got nan$"),
    ({"data.batch_size": 100}, r"^data.batch_size must be at most the 48 training examples"),
    ({"train.compute_dtype": "float16"}, r"^train.compute_dtype must be one of bfloat16, "
                                         r"float32, got 'float16'"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=N):
    with pytest.raises(ConfigError, match=message):
      iterative_search(_tiny(**overrides), str(workdir))
  assert not workdir.exists()


def test_weights_of_another_depth_write_nothing(tmp_path):
  config = _tiny(**{"model.name": "resnet20", "data.name": "cifar10"})
  config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
  config.model.weights = pretrained("resnet56")
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=N):
    with pytest.raises(ConfigError, match=r"^model.weights=.*resnet56_cifar10.npz: tensor "
                                          r"'layer1.3.conv1.weight' .* another architecture"):
      iterative_search(config, str(workdir))
  assert not workdir.exists()


@requires_cifar10
@pytest.mark.parametrize("field", ["prune.val_split", "data.eval_split"])
def test_an_unknown_split_names_the_field_before_the_model_is_built(tmp_path, monkeypatch, field):
  # (the mock data accepts any split name: this reads the real CIFAR-10's split list); building
  # a randomly initialised model compiles its init: seconds a refusal must not wait for
  def build(*args, **kwargs):
    raise AssertionError("the model was built before the data was opened")

  monkeypatch.setattr(sensitivity, "create_model", build)
  held_out = {"data.val_examples": 0} if field == "prune.val_split" else {}
  config = _tiny(**{"data.name": "cifar10", **held_out, field: "tset"})
  config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: cannot read split 'tset' of "
                                        r"'cifar10' .*Unknown split 'tset'"):
    iterative_search(config, str(workdir))
  assert not workdir.exists()
