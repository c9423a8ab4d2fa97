"""User-facing errors.

Every mistake a user can make (a bad config value, a missing file, an unknown name) raises
:class:`ConfigError` with one line that names the field, the value it got, what is valid and,
where there is one, the likely fix. Entry points in ``experiments/`` catch it, print that line and
exit non-zero, so a user never sees a traceback for their own mistake.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np


class ConfigError(ValueError):
  """A user mistake: bad config value, unknown name, missing or malformed input file."""


def invalid(field: str, value: Any, valid: str, fix: str | None = None) -> ConfigError:
  """Builds the standard one-line error: ``field must be VALID, got VALUE[; FIX]``.

  Args:
    field: dotted name of the offending field, e.g. ``prune.sparsity``.
    value: the value that was given.
    valid: what would have been accepted, e.g. ``in [0, 1)``.
    fix: optional hint appended after a semicolon.

  Returns:
    A :class:`ConfigError` ready to raise.
  """
  msg = f"{field} must be {valid}, got {value!r}"
  if fix:
    msg += f"; {fix}"
  return ConfigError(msg)


def unknown(field: str, value: Any, choices: Iterable[str]) -> ConfigError:
  """Error for a name that is not one of ``choices``."""
  return invalid(field, value, "one of " + ", ".join(sorted(choices)))


def shortened(items: Sequence[str], n: int, sep: str = ", ") -> str:
  """The first ``n`` of ``items`` joined by ``sep``, then ``sep`` and ``...`` if there are more:
  examples for a message."""
  return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


def check_counts(fields: Mapping[str, Any]) -> None:
  """Raises :class:`ConfigError` for the first of ``{field name: value}`` below 1 or not a whole
  number (an interval of 1.5 steps is not one)."""
  for field, value in fields.items():
    if not is_number(value) or not value >= 1:
      raise invalid(field, value, ">= 1")
    if not np.isfinite(value) or value != int(value):
      raise invalid(field, value, "an integer >= 1")


def check_range(field: str, value: float, lo: float, hi: float, *,
                lo_closed: bool = True, hi_closed: bool = False) -> None:
  """Raises :class:`ConfigError` unless ``value`` lies in the interval ``lo..hi``.

  Args:
    field: dotted field name for the message.
    value: value to check.
    lo: lower bound.
    hi: upper bound.
    lo_closed: whether ``lo`` itself is allowed.
    hi_closed: whether ``hi`` itself is allowed.
  """
  interval = f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
  if not is_number(value):
    raise invalid(field, value, f"a number in {interval}")
  ok_lo = value >= lo if lo_closed else value > lo
  ok_hi = value <= hi if hi_closed else value < hi
  if not (ok_lo and ok_hi):
    raise invalid(field, value, f"in {interval}")


def check_positive(field: str, value: float, *, zero: bool = False) -> None:
  """Raises :class:`ConfigError` unless ``value`` is a finite number > 0 (>= 0 with ``zero``);
  NaN and infinity are refused, not passed on to a training run."""
  bound = ">= 0" if zero else "> 0"
  if not is_number(value) or not np.isfinite(value):
    raise invalid(field, value, f"a finite number {bound}")
  if not (value >= 0 if zero else value > 0):
    raise invalid(field, value, bound)


def check_variables(variables: Any, field: str = "variables") -> None:
  """One line when ``variables`` is not a model's variables dict (e.g. its ``params`` alone)."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    keys = sorted(map(str, variables))[:4] if isinstance(variables, Mapping) else []
    raise invalid(field, f"a {type(variables).__name__} with keys {keys}",
                  "the model's variables, a dict with a 'params' entry (what init returns)",
                  "pass {'params': params, ...}, not the params alone")


def check_finite(field: str, tree: Any, consequence: str) -> None:
  """Raises :class:`ConfigError` naming the first floating leaf of ``tree`` (an array or any
  pytree) that holds NaN/Inf: ``{field}{path} holds n NaN/Inf value(s); {consequence}``."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      raise ConfigError(f"{field}{jax.tree_util.keystr(path)} holds "
                        f"{int(np.sum(~np.isfinite(a)))} NaN/Inf value(s); {consequence}")


def message_line(e: BaseException) -> str:
  """The first line of an error's message without a documentation link (Flax's errors)."""
  return re.sub(r" \(https?://\S+\)", "", str(e).splitlines()[0]) if str(e) else ""


def first_line(e: BaseException) -> str:
  """``Type: first line of the message`` (``Type`` alone for an empty message): an exception
  from code the user gave (their model, their data), quoted inside a one-line error."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def is_number(value: Any, *, integer: bool = False) -> bool:
  """A real scalar (Python, NumPy or a 0-d array), not a bool or a string; with ``integer``, of
  an integer type."""
  if isinstance(value, (bool, str, bytes)):
    return False
  try:
    return (np.ndim(value) == 0 and np.isrealobj(value)
            and np.asarray(value).dtype.kind in ("iu" if integer else "iuf"))
  except TypeError:
    return False
