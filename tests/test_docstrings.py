"""The docstring examples are Python, and those that show their output print it, as a user who
copies them sees it."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import jaxcompress

# The modules whose docstring examples run on their own (the others use the reader's model).
RUNNABLE = ("jaxcompress.export.packing", "jaxcompress.optim", "jaxcompress.pruning.schedules",
            "jaxcompress.pruning.select", "jaxcompress.pruning.summary",
            "jaxcompress.quantization.config", "jaxcompress.quantization.fake_quant",
            "jaxcompress.quantization.lsq", "jaxcompress.quantization.qparams",
            "jaxcompress.quantization.schedule", "jaxcompress.rules", "jaxcompress.tables")


@pytest.mark.parametrize("name", RUNNABLE)
def test_docstring_examples_print_what_they_show(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def test_every_docstring_example_is_python():
  finder = doctest.DocTestFinder()
  names = [m.name for m in pkgutil.walk_packages(jaxcompress.__path__, "jaxcompress.")]
  bad = []
  for name in names:
    for test in finder.find(importlib.import_module(name), name):
      for example in test.examples:
        try:
          compile(example.source, test.name, "single")
        except SyntaxError as e:
          bad.append(f"{test.name}: {e.msg}")
  assert len(names) > 50 and bad == []


def test_the_package_docstring_names_modules_that_import():
  names = [n for line in re.findall(r"^  (\w+(?:, \w+)*)(?: {2,}|$)", jaxcompress.__doc__, re.M)
           for n in line.split(", ")]
  assert len(names) > 15
  for name in names:
    importlib.import_module(f"jaxcompress.{name}")
