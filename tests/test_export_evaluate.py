"""The evaluate entry point on an exported artifact: same JSON fields, the artifact's accuracy."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import evaluate as evaluate_config_file
from experiments.evaluate_job import evaluate_config
from jaxcompress.data import load_split
from jaxcompress.errors import ConfigError
from jaxcompress.export import export_model, load, read_spec
from jaxcompress.models import get_model
from test_export_runtime import mlp_artifact, random_variables


def _config(exported, name="resnet20"):
  c = evaluate_config_file.get_config()
  c.model.name, c.model.exported = name, exported
  c.data.eval_batch_size = 16
  return c


def test_evaluate_reports_the_artifacts_accuracy(tmp_path):
  # model.name is the config's default (resnet20): the artifact's spec names its model (mlp).
  loaded = mlp_artifact(str(tmp_path / "export"), input_shape=(32, 32, 3))
  with tfds.testing.mock_data(num_examples=40):
    result = evaluate_config(_config(str(tmp_path / "export")))
    images, labels = load_split("cifar10", "test", progress=False)
  mean, std = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
  preds = np.argmax(loaded.logits(((images / 255.0 - mean) / std).astype(np.float32)), -1)
  assert result["examples"] == 40 == len(labels)
  assert result["accuracy"] == pytest.approx(100 * np.mean(preds == labels))
  assert {"loss", "precision", "recall", "model", "dataset", "split"} <= set(result)
  assert result["model"] == "mlp" and result["exported"] == str(tmp_path / "export")


def test_a_home_relative_artifact_folder_is_read(tmp_path, monkeypatch):
  """``~`` in model.exported is the home folder, as in the data, weights and text paths: it was
  taken as a folder named ``~`` ("no spec.json.gz or spec.json in '~/export'")."""
  loaded = mlp_artifact(str(tmp_path / "export"))
  monkeypatch.setenv("HOME", str(tmp_path))
  with gzip.open(tmp_path / "export" / "spec.json.gz") as f:
    assert read_spec("~/export") == json.load(f)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(load("~/export", get_model("mlp")).logits(x), loaded.logits(x))


def test_artifact_of_another_model_or_input_shape_is_refused(tmp_path):
  mlp_artifact(str(tmp_path / "small"), input_shape=(8, 8, 3))
  with pytest.raises(ConfigError, match=r"model.exported input must be one float image of shape "
                                        r"\(32, 32, 3\) for cifar10, got '\(8, 8, 3\) float32'"):
    evaluate_config(_config(str(tmp_path / "small")))
  # A model taking uint8 pixels would be fed normalised floats: its accuracy would be wrong.
  variables = random_variables(get_model("mlp"), (32, 32, 3))
  export_model(str(tmp_path / "uint8"), variables=variables, input_shape=(32, 32, 3),
               input_dtype="uint8", model_name="mlp")
  with pytest.raises(ConfigError, match=r"^model.exported input must be one float image of shape "
                                        r"\(32, 32, 3\) for cifar10, got '\(32, 32, 3\) uint8'; "
                                        r"its images are fed normalised, as float32$"):
    evaluate_config(_config(str(tmp_path / "uint8")))
  # No model name in the spec: config.model.name's module, which the variables do not fit.
  export_model(str(tmp_path / "unnamed"), variables=variables, input_shape=(32, 32, 3))
  with pytest.raises(ConfigError, match="model.exported: the artifact has no "
                                        "'batch_stats/bn1/mean', which CifarResNet needs"):
    evaluate_config(_config(str(tmp_path / "unnamed")))
  spec_file = tmp_path / "unnamed" / "spec.json.gz"  # a spec without the field at all
  spec = json.loads(gzip.decompress(spec_file.read_bytes()))
  del spec["model"]
  spec_file.write_bytes(gzip.compress(json.dumps(spec).encode()))
  with pytest.raises(ConfigError, match="model.exported: the artifact has no "
                                        "'batch_stats/bn1/mean', which CifarResNet needs"):
    evaluate_config(_config(str(tmp_path / "unnamed")))


def wider_mlp(num_classes):  # MODULE:FACTORY of an own model whose head ignores num_classes
  return get_model("mlp", num_classes + 2)


def test_artifact_whose_output_is_not_the_datasets_classes_is_refused(tmp_path):
  variables = random_variables(wider_mlp(10), (32, 32, 3))
  export_model(str(tmp_path / "wide"), variables=variables, input_shape=(32, 32, 3),
               model_name="test_export_evaluate:wider_mlp")
  with tfds.testing.mock_data(num_examples=40):
    with pytest.raises(ConfigError, match=r"^model.exported: 'test_export_evaluate:wider_mlp' "
                                          r"returns \(1, 12\) for one input of shape \[32, 32, "
                                          r"3\]; a classifier of 10 classes must return"):
      evaluate_config(_config(str(tmp_path / "wide")))


def test_artifact_of_a_run_on_another_dataset_is_refused(tmp_path):
  # An MNIST run's artifact: the spec records (28, 28, 1) and 10 classes, as Fashion-MNIST's.
  mlp_artifact(str(tmp_path / "run" / "export"), input_shape=(28, 28, 1))
  (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"name": "mnist"}}))
  c = _config(str(tmp_path / "run" / "export"))
  c.data.name = "fashion_mnist"
  with tfds.testing.mock_data(num_examples=16):  # without the check, it ran without a word
    with pytest.raises(ConfigError, match=r"^model.exported=.*run/export was exported by a run "
                                          r"on mnist \(.*config.json\), but "
                                          r"data.name=fashion_mnist; evaluate it with "
                                          r"--config.data.name=mnist$"):
      evaluate_config(c)
    # The same artifact copied out of its run is not checked: it is evaluated on fashion_mnist.
    mlp_artifact(str(tmp_path / "copy"), input_shape=(28, 28, 1))
    c.model.exported = str(tmp_path / "copy")
    result = evaluate_config(c)
  assert result["dataset"] == "fashion_mnist" and result["examples"] == 16


def test_a_home_relative_artifact_is_checked_against_its_run_dataset(tmp_path, monkeypatch):
  # the artifact reader expands ~; the dataset check read '<cwd>/~/run/config.json' (nothing)
  from experiments.evaluate_job import check_run_dataset
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text('{"data": {"name": "mnist"}}')
  with pytest.raises(ConfigError, match=r"exported by a run on mnist .* data.name=fashion_mnist"):
    check_run_dataset("~/run/export", "fashion_mnist")
