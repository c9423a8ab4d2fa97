"""Progress bars that stay readable in a log file.

:func:`bar` is ``tqdm`` with one change: where its stream is not a terminal (output piped to a
file, as in CI or a scheduler) it redraws at most every :data:`LOG_INTERVAL_S` seconds, so a
long run writes a bounded number of carriage-return redraws instead of ten a second.
"""

import sys

from tqdm import autonotebook, std
from tqdm.auto import tqdm

# In a notebook tqdm.auto draws a widget, which redraws in place whatever the stream says.
_NOTEBOOK = autonotebook.tqdm is not std.tqdm

LOG_INTERVAL_S = 10.0
"""Seconds between redraws of a bar whose stream is not a terminal."""


def bar(iterable=None, **kwargs) -> tqdm:
  """A ``tqdm`` bar over ``iterable`` (keyword arguments as ``tqdm``'s).

  Unless ``mininterval`` is given, a bar writing to a stream that is not a terminal redraws at
  most every :data:`LOG_INTERVAL_S` seconds (a terminal, and a notebook's widget, keep tqdm's
  0.1 s).
  """
  stream = kwargs.get("file") or sys.stderr
  isatty = getattr(stream, "isatty", None)
  if ("mininterval" not in kwargs and not _NOTEBOOK
      and not (isatty is not None and isatty())):
    kwargs["mininterval"] = LOG_INTERVAL_S
  return tqdm(iterable, **kwargs)
