"""The docstring examples that show their output print it, as a user who copies them sees it."""

from __future__ import annotations

import doctest
import importlib

import pytest

# The modules whose docstring examples run on their own (the others use the reader's model).
RUNNABLE = ("jaxcompress.export.packing", "jaxcompress.optim", "jaxcompress.pruning.schedules",
            "jaxcompress.pruning.summary", "jaxcompress.quantization.config",
            "jaxcompress.quantization.fake_quant", "jaxcompress.quantization.lsq",
            "jaxcompress.quantization.qparams", "jaxcompress.quantization.schedule",
            "jaxcompress.rules", "jaxcompress.tables")


@pytest.mark.parametrize("name", RUNNABLE)
def test_docstring_examples_print_what_they_show(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
