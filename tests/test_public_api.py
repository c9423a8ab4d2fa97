"""The public API: every name a package's ``__all__`` exports exists and is documented, every
name its ``__init__`` imports (submodules aside) is in ``__all__``, and every ``jaxcompress``
name README.md and docs/*.md use resolves, so the docs cannot drift from the code.

A function or class is documented by its own docstring; a constant or a type alias by a comment
on the lines just above its definition. The docs' names are their dotted ``jaxcompress.x.y``
names, the names of their ``from jaxcompress... import`` lines, and in their Python blocks each
``module.name`` of a module such a line imports.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
import pkgutil
import re

import pytest

import jaxcompress
from conftest import REPO

PACKAGES = ["jaxcompress"] + [m.name for m in pkgutil.walk_packages(jaxcompress.__path__,
                                                                      "jaxcompress.") if m.ispkg]
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
FROM_IMPORT = re.compile(r"^[ \t]*from (jaxcompress[\w.]*) import (\([^)]*\)|[^\n]*)", re.M)


def resolve(dotted: str):
  """The object ``dotted`` names: its longest importable module prefix, then attributes."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for part in parts[i:]:
      obj = getattr(obj, part)
    return obj
  raise ImportError(dotted)


def commented(package: str, name: str) -> bool:
  """A comment stands on the lines just above the definition of ``name`` in ``package``."""
  folder = os.path.dirname(importlib.import_module(package).__file__)
  define = re.compile(rf"^(?:\w+, )*{name}(?:, \w+)*(?:: [^=\n]+)? = ", re.M)
  for path in glob.glob(os.path.join(folder, "**", "*.py"), recursive=True):
    with open(path) as f:
      text = f.read()
    for m in define.finditer(text):
      above = text[:m.start()].rstrip("\n").rpartition("\n")[2]
      if above.startswith("#"):
        return True
  return False


def documented(package: str, name: str) -> bool:
  obj = getattr(importlib.import_module(package), name)
  if inspect.isclass(obj):
    return bool(vars(obj).get("__doc__")) and not obj.__doc__.startswith(f"{obj.__name__}(")
  if inspect.ismodule(obj) or inspect.isroutine(obj):
    return bool(inspect.getdoc(obj))
  return commented(package, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists_and_is_documented(package):
  module = importlib.import_module(package)
  names = module.__all__
  assert len(names) == len(set(names))
  assert [n for n in names if not hasattr(module, n)] == []
  assert [n for n in names if not documented(package, n)] == []
  public = [n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)]
  assert sorted(set(public) - set(names)) == []  # a name imported for users is exported


def doc_names(text: str) -> list[str]:
  """The dotted ``jaxcompress`` names ``text`` uses (module docstring)."""
  names = re.findall(r"\bjaxcompress(?:\.\w+)+", text)
  imported = {}
  for module, what in FROM_IMPORT.findall(text):
    for alias in what.strip("()").replace("\n", " ").split(","):
      name, _, local = alias.strip().partition(" as ")
      if name:
        names.append(f"{module}.{name}")
        imported[local or name] = f"{module}.{name}"
  for block in re.findall(r"```python\n(.*?)```", text, re.S):
    for local, dotted in imported.items():
      if inspect.ismodule(resolve(dotted)):
        names += [f"{dotted}.{a}" for a in re.findall(rf"(?<![\w.]){local}\.(\w+)", block)]
  return names


@pytest.mark.parametrize("doc", DOCS)
def test_the_jaxcompress_names_of_the_docs_resolve(doc):
  with open(os.path.join(REPO, doc)) as f:
    names = doc_names(f.read())
  bad = []
  for name in names:
    try:
      resolve(name)
    except (ImportError, AttributeError):
      bad.append(name)
  assert bad == []


def test_doc_names_finds_every_kind_of_use():
  text = ("See `jaxcompress.export.slim`.\n```python\nfrom jaxcompress import export, pruning as p"
          "\nfrom jaxcompress.data import (Batch,\n    DataSpec)\np.prune(export.nope)\n```\n")
  assert sorted(doc_names(text)) == sorted([
      "jaxcompress.export.slim", "jaxcompress.data", "jaxcompress.export", "jaxcompress.pruning",
      "jaxcompress.data.Batch", "jaxcompress.data.DataSpec", "jaxcompress.pruning.prune",
      "jaxcompress.export.nope"])
  with pytest.raises(AttributeError):
    resolve("jaxcompress.export.nope")
