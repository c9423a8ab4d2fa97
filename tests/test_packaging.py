"""The package as a user installs it: its sources compile on every Python it claims, and
``pyproject.toml`` declares what the code needs."""

import glob
import os
import warnings

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
