"""Every job command the docs show names flags and config fields that exist, with values of the
field's type: README.md, docs/*.md and the docstrings of configs/, experiments/ and examples/."""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import shlex

import pytest

from conftest import REPO

SOURCES = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=REPO)),
           *(f"{d}/{f}" for d in ("configs", "experiments", "examples")
             for f in sorted(os.listdir(os.path.join(REPO, d))) if f.endswith(".py"))]
_COMMAND = re.compile(r"python -m experiments\.(\w+)")


def _commands() -> list[tuple[str, str]]:
  """``(where, command)`` for every ``python -m experiments.NAME ...`` line, continuation lines
  (a trailing backslash) joined, inline code and quoted strings cut at their closing quote."""
  found = []
  for source in SOURCES:
    with open(os.path.join(REPO, source)) as f:
      lines = f.read().splitlines()
    for number, line in enumerate(lines):
      match = _COMMAND.search(line)
      if not match:
        continue
      text, i = line[match.start():], number
      while text.rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text.rstrip()[:-1] + " " + lines[i].strip()
      for quote in "`\"'":  # inline code or a quoted string: up to the closing quote
        if quote in line[:match.start()]:
          text = text.split(quote)[0]
      found.append((f"{source}:{number + 1}", text.split("#")[0].strip()))
  return found


def _flags(job: str) -> tuple[set[str], str | None]:
  """The flag names ``experiments/{job}.py`` defines and its default config file, read from its
  source (importing every job into one process would define clashing flags)."""
  with open(os.path.join(REPO, "experiments", f"{job}.py")) as f:
    source = f.read()
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
  config = re.search(r"cli\.define_flags\(\"([^\"]+)\"(.*)\)", source)
  if config:
    names.add("config")
    if "workdir=False" not in config.group(2):
      names.add("workdir")
  return names, config.group(1) if config else None


def _config(spec: str):
  path, _, arg = spec.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(arg or None)


def _check_value(field: str, current, value: str) -> None:
  """``value`` parses as ``current``'s type, as ml_collections parses an override."""
  if value.startswith("$") or re.fullmatch(r"[A-Z_]+", value):  # a placeholder
    return
  if isinstance(current, bool):
    assert value.lower() in ("true", "false"), f"{field}={value}: not a bool"
  elif isinstance(current, int):
    int(value)
  elif isinstance(current, float):
    float(value)
  elif isinstance(current, (tuple, list)):
    assert isinstance(ast.literal_eval(value), (tuple, list)), f"{field}={value}: not a sequence"


COMMANDS = _commands()


def test_the_docs_show_commands():
  assert len(COMMANDS) > 80
  assert {_COMMAND.search(c).group(1) for _, c in COMMANDS} >= {"cifar_distill", "autocompress",
                                                                 "bench", "train_lm"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_names_existing_flags_and_fields(where, command):
  job = _COMMAND.search(command).group(1)
  assert os.path.isfile(os.path.join(REPO, "experiments", f"{job}.py")), f"{where}: no job {job}"
  names, default = _flags(job)
  args = [a for a in shlex.split(command.replace("\\", " "))[3:] if a.startswith("--")]
  config_file = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), default)
  config = None
  for arg in args:
    name, _, value = arg[2:].partition("=")
    if name.startswith("config."):
      assert config_file, f"{where}: {job} takes no --config"
      config = config or _config(config_file)
      node = config
      for key in name.split(".")[1:]:
        assert key in node, f"{where}: {config_file} has no field {name[7:]}"
        node = node[key]
      _check_value(name, node, value)
    else:
      assert name in names, f"{where}: {job} has no flag --{name}"
