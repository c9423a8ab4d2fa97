"""Workdir bookkeeping: a run's config is recorded once and a different one is refused."""

import json

import pytest

from configs import common
from jaxcompress.checkpoint import check_workdir
from jaxcompress.errors import ConfigError


def test_a_plain_dict_is_recorded_and_a_different_one_refused(tmp_path):
  config = {"data": {"name": "mnist"}, "train": {"epochs": 2.0}}
  check_workdir(config, str(tmp_path))
  assert json.load(open(tmp_path / "config.json")) == config
  check_workdir(dict(config), str(tmp_path))  # the same run: resumes
  with pytest.raises(ConfigError, match=r"holds a run with a different config \(sections train "
                                        r"differ\)"):
    check_workdir({**config, "train": {"epochs": 3.0}}, str(tmp_path))


def test_a_config_dict_is_recorded_as_its_json(tmp_path):
  section = common.train_config()
  check_workdir(section, str(tmp_path))
  assert json.load(open(tmp_path / "config.json")) == json.loads(section.to_json())
