"""Preparing a missing dataset: with a fake TFDS builder, no network and no TensorFlow needed."""

import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcompress import data, datasets
from jaxcompress.errors import ConfigError

EXTRA = "pip install -e '.[prepare]'"


class FakeBuilder:
  """Stands in for ``tfds.builder(name, data_dir=...)``; records every call it gets."""

  def __init__(self, calls, name, data_dir, fail=None, write=True, incomplete=False):
    self.calls, self.name, self.data_dir = calls, name, data_dir
    self.fail, self.write, self.incomplete = fail, write, incomplete
    calls.append(("builder", name, data_dir))

  def download_and_prepare(self, file_format=None):
    self.calls.append(("download_and_prepare", file_format))
    if self.write:
      version = "incomplete.ABC123_3.0.2" if self.incomplete else "3.0.2"
      folder = os.path.join(self.data_dir, self.name, version)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        f.write("{}")
    if self.fail:
      raise self.fail


@pytest.fixture
def fake_tfds(monkeypatch):
  """Makes TensorFlow look installed and ``tfds.builder`` a :class:`FakeBuilder`.

  Returns ``(calls, options)``: the recorded calls and a dict of FakeBuilder keyword arguments a
  test may change before preparing.
  """
  calls, options = [], {}
  monkeypatch.setattr(datasets, "_tensorflow_available", lambda: True)
  monkeypatch.setattr(tfds, "builder",
                      lambda name, data_dir=None: FakeBuilder(calls, name, data_dir, **options))
  return calls, options


@pytest.fixture
def no_tensorflow(monkeypatch):
  """Makes ``importlib.util.find_spec('tensorflow')`` say TensorFlow is not installed."""
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a, **k: None if name == "tensorflow" else real(name, *a, **k))


def test_prepare_builds_array_record_into_the_folder(tmp_path, fake_tfds, capsys):
  calls, _ = fake_tfds
  assert datasets.prepare("cifar10", str(tmp_path)) == str(tmp_path)
  assert calls == [("builder", "cifar10", str(tmp_path)),
                   ("download_and_prepare", "array_record")]
  datasets.check_prepared("cifar10", str(tmp_path))  # passes now
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2
  assert lines[0] == (f"preparing cifar10 into {tmp_path} with TFDS "
                      "(downloads about 163 MB once) ...")
  assert lines[1].startswith(f"prepared cifar10 into {tmp_path} in ")


def test_prepare_resolves_the_folder_from_tfds_data_dir(tmp_path, fake_tfds, monkeypatch):
  calls, _ = fake_tfds
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert datasets.prepare("mnist") == str(tmp_path)
  assert calls[0] == ("builder", "mnist", str(tmp_path))
  assert datasets.is_prepared("mnist", str(tmp_path))


def test_prepare_does_nothing_when_already_prepared(tmp_path, fake_tfds):
  calls, _ = fake_tfds
  os.makedirs(tmp_path / "cifar10" / "3.0.2")
  (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
  assert datasets.prepare("cifar10", str(tmp_path)) == str(tmp_path)
  assert calls == []


def test_prepare_rejects_an_unknown_dataset(tmp_path, fake_tfds):
  with pytest.raises(ConfigError, match="data.name must be one of .*got 'svhn'"):
    datasets.prepare("svhn", str(tmp_path))
  assert fake_tfds[0] == []


def test_prepare_without_tensorflow_names_the_extra_and_the_folder(tmp_path, no_tensorflow,
                                                                   monkeypatch):
  monkeypatch.setattr(tfds, "builder", lambda *a, **k: pytest.fail("builder called without TF"))
  assert not datasets._tensorflow_available()
  with pytest.raises(ConfigError) as e:
    datasets.prepare("cifar10", str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert EXTRA in msg and f"not prepared under '{tmp_path}'" in msg
  assert "looked for cifar10/<version>/dataset_info.json" in msg and "TFDS_DATA_DIR" in msg
  assert "TensorFlow, which prepares it, is not installed" in msg


def test_tensorflow_available_asks_find_spec(monkeypatch):
  seen = []
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a, **k: seen.append(name) or object())
  assert datasets._tensorflow_available() and seen == ["tensorflow"]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
  assert not datasets._tensorflow_available()


@pytest.mark.parametrize("write", [False, True])
def test_a_failing_builder_gives_one_line_naming_the_dataset(tmp_path, fake_tfds, write):
  _, options = fake_tfds
  # write=True: TFDS died after writing into its temporary folder, which must not count.
  options.update(fail=OSError("[Errno 101] Network is unreachable\nTraceback ..."), write=write,
                 incomplete=True)
  with pytest.raises(ConfigError) as e:
    datasets.prepare("cifar10", str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert f"preparing dataset 'cifar10' into '{tmp_path}' failed " in msg
  assert "(OSError: [Errno 101] Network is unreachable)" in msg
  assert not datasets.is_prepared("cifar10", str(tmp_path))


def test_a_builder_that_leaves_nothing_is_an_error(tmp_path, fake_tfds):
  fake_tfds[1].update(write=False)
  with pytest.raises(ConfigError, match=f"'cifar10' is not prepared under '{tmp_path}'.*even "
                                        "after TFDS download_and_prepare returned") as e:
    datasets.prepare("cifar10", str(tmp_path))
  assert "\n" not in str(e.value)


def test_an_incomplete_folder_does_not_count_as_prepared(tmp_path):
  folder = tmp_path / "cifar10" / "incomplete.XYZ123_3.0.2"
  os.makedirs(folder)
  (folder / "dataset_info.json").write_text("{}")
  assert not datasets.is_prepared("cifar10", str(tmp_path))
  with pytest.raises(ConfigError, match="not prepared under"):
    datasets.check_prepared("cifar10", str(tmp_path))
  os.makedirs(tmp_path / "cifar10" / "plain" / "3.0.2")  # a builder config level is fine
  (tmp_path / "cifar10" / "plain" / "3.0.2" / "dataset_info.json").write_text("{}")
  assert datasets.is_prepared("cifar10", str(tmp_path))


class FakeSource:
  """A data source of ``n`` mnist-shaped records."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitems__(self, keys):
    return [{"image": np.full((28, 28, 1), k, np.uint8), "label": k % 10} for k in keys]


@pytest.fixture
def fake_data_source(monkeypatch):
  """``tfds.data_source`` that reads only a prepared folder; returns the calls it got."""
  calls = []

  def source(name, split, data_dir, download):
    calls.append((name, split, data_dir, download))
    if not datasets.is_prepared(name, data_dir):
      raise FileNotFoundError(f"no {name} in {data_dir}")
    return FakeSource(7)

  monkeypatch.setattr(tfds, "data_source", source)
  return calls


def test_load_split_prepares_a_missing_dataset_then_reads_it(tmp_path, fake_tfds,
                                                             fake_data_source):
  x, y = data.load_split("mnist", "test", data_dir=str(tmp_path), progress=False)
  assert x.shape == (7, 28, 28, 1) and y.tolist() == list(range(7))
  assert fake_tfds[0] == [("builder", "mnist", str(tmp_path)),
                          ("download_and_prepare", "array_record")]
  assert fake_data_source == [("mnist", "test", str(tmp_path), False)] * 2


def test_load_split_with_prepare_missing_off_raises(tmp_path, fake_tfds, fake_data_source):
  with pytest.raises(ConfigError, match=f"not prepared under '{tmp_path}'.*"
                                        "prepare_missing=False.*TFDS_DATA_DIR") as e:
    data.load_split("mnist", "test", data_dir=str(tmp_path), progress=False,
                    prepare_missing=False)
  assert "\n" not in str(e.value) and EXTRA in str(e.value)
  assert fake_tfds[0] == []


def test_load_split_without_tensorflow_names_the_extra(tmp_path, no_tensorflow, fake_data_source):
  with pytest.raises(ConfigError) as e:
    data.load_split("mnist", "test", data_dir=str(tmp_path), progress=False)
  msg = str(e.value)
  assert "\n" not in msg and EXTRA in msg and f"not prepared under '{tmp_path}'" in msg


def test_load_split_keeps_the_split_error_when_prepared(tmp_path, fake_tfds, monkeypatch):
  os.makedirs(tmp_path / "mnist" / "3.0.1")
  (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")

  def source(*a, **k):
    raise ValueError("Unknown split 'tset'")

  monkeypatch.setattr(tfds, "data_source", source)
  with pytest.raises(ConfigError, match="data.split: cannot read split 'tset' of 'mnist'"):
    data.load_split("mnist", "tset", data_dir=str(tmp_path), progress=False)
  # a prepared dataset is never prepared again (its builder may be read for the split sizes)
  assert not [c for c in fake_tfds[0] if c[0] == "download_and_prepare"]
  with pytest.raises(ConfigError, match="data.eval_split: cannot read split 'tset' of 'mnist'"):
    data.load_split("mnist", "tset", data_dir=str(tmp_path), progress=False,
                    field="data.eval_split")
