"""Strict JSON for the files and lines jobs write: a number that is not finite (a diverged loss,
a metric over no steps) becomes ``null``, not Python's ``NaN`` or ``Infinity``, which are not
JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def finite_or_null(obj: Any) -> Any:
  """``obj`` with every NaN or infinite float (NumPy's included), in dicts, lists and tuples,
  replaced by None: ``json.dumps`` would write the bare words ``NaN`` and ``Infinity``, which
  are not JSON (strict parsers, JavaScript's and jq, reject the whole file), while ``null`` reads
  everywhere."""
  if isinstance(obj, dict):
    return {k: finite_or_null(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_null(v) for v in obj]
  if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of ``obj``: a value that is not finite is ``null``
  (:func:`finite_or_null`)."""
  return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)
