"""The package as a user installs it: its sources compile on every Python it claims, and
``pyproject.toml`` declares what the code needs."""

import glob
import os
import re
import tomllib
import warnings

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def _sources() -> list[str]:
  return sorted(p for folder in ("jaxcompress", "experiments", "configs", "examples", "tests")
                for p in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True))


def test_sources_compile_without_warnings():
  # An invalid escape such as "\ " in a string or docstring is a DeprecationWarning on Python
  # 3.11 but a SyntaxWarning, shown to the user, on 3.12+ (requires-python is >=3.11): an
  # editable install compiles the sources at the first import, in front of the user.
  sources = _sources()
  assert len(sources) > 100
  bad = []
  for path in sources:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      try:
        compile(source, path, "exec", dont_inherit=True)
      except (SyntaxError, Warning) as e:
        bad.append(f"{os.path.relpath(path, REPO)}:{getattr(e, 'lineno', '')}: {e}")
  assert bad == []


def _lower_bounds() -> dict[str, tuple[int, ...]]:
  """``{name: version}`` of every ``name>=version`` dependency in ``pyproject.toml``."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
  found = [re.fullmatch(r"([\w.-]+)>=([\d.]+)", d.replace(" ", "")) for d in dependencies]
  return {m[1]: tuple(int(v) for v in m[2].split(".")) for m in found if m}


def test_the_oldest_flax_allowed_runs_on_the_oldest_jax_allowed():
  # jax 0.8.2 removed jax.jit's abstracted_axes argument; flax 0.12.1's nnx.jit still passes it
  # (TypeError at the first call of an nnx.jit function), flax 0.12.2's no longer does (both
  # releases' sources): the test suite failed on that pair, which the bounds allowed.
  bounds = _lower_bounds()
  if bounds["jax"] >= (0, 8, 2):
    assert bounds["flax"] >= (0, 12, 2)


def test_the_readme_gives_the_bounds_of_pyproject():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  bounds = _lower_bounds()
  for name, shown in (("jax", "JAX"), ("flax", "Flax")):
    assert f"{shown} ≥ {'.'.join(map(str, bounds[name]))}" in readme


# The machines each build of TensorFlow ships wheels for (platform_machine values), from PyPI's
# file lists of the 2.16 to 2.21 releases: tensorflow-cpu has manylinux x86_64, win_amd64 and
# (to 2.16) macosx x86_64 wheels and none for arm64 (Apple silicon) or aarch64 (Linux ARM),
# where tensorflow has them.
TENSORFLOW_WHEELS = {"tensorflow-cpu": {"x86_64", "AMD64"},
                     "tensorflow": {"x86_64", "AMD64", "arm64", "aarch64"}}


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "arm64", "aarch64"])
def test_the_prepare_extra_installs_on_every_common_machine(machine):
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    prepare = tomllib.load(f)["project"]["optional-dependencies"]["prepare"]
  chosen = [r for r in map(Requirement, prepare)
            if r.marker is None or r.marker.evaluate({"platform_machine": machine, "extra": ""})]
  assert [r.name for r in chosen if r.name.startswith("tensorflow")] != []
  assert [r.name for r in chosen if machine not in TENSORFLOW_WHEELS.get(r.name, {machine})] == []
