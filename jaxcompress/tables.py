"""The one Markdown table writer of the library and of the experiments.

Callers format their numbers (``f"{acc:.2f}"``, ``f"{n:,}"``); this module only lays the cells
out: one header row, the alignment rule, one line per row, every column padded to its widest
cell so the table reads as well in a terminal as rendered.

Example:
  >>> print(markdown_table(("model", "accuracy %"), [("resnet20", "91.73"), ("mlp", "98.1")]))
  | model    | accuracy % |
  | -------- | ---------: |
  | resnet20 |      91.73 |
  | mlp      |       98.1 |
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Sequence

# A number as callers print it: sign, thousands commas, decimals, exponent, a trailing x or %.
_NUMBER = re.compile(r"[+-]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][+-]?\d+)?[x%]?|[+-]?(inf|nan)",
                     re.IGNORECASE)


def _text(cell: Any) -> str:
  """A cell's text: ``None`` is empty, a ``|`` is escaped, line breaks become spaces."""
  if cell is None:
    return ""
  return " ".join(str(cell).splitlines()).replace("|", r"\|")


def _is_number(cell: Any) -> bool:
  if isinstance(cell, bool):
    return False
  return isinstance(cell, numbers.Number) or (
      isinstance(cell, str) and _NUMBER.fullmatch(cell.strip()) is not None)


def _numeric(column: Sequence[Any]) -> bool:
  """Whether a column has at least one non-empty cell and every non-empty cell is a number."""
  filled = [c for c in column if _text(c).strip()]
  return bool(filled) and all(_is_number(c) for c in filled)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: str | None = None) -> str:
  """Lays out a Markdown (GitHub) table, columns padded to equal width.

  Args:
    header: the column names.
    rows: one sequence of cells per row, as many as ``header``; a cell is printed with ``str``
      (``None`` as an empty cell), so numbers should come formatted.
    align: one character per column: ``l`` (left), ``r`` (right) or ``c`` (centred). Default:
      right for a column whose non-empty cells are all numbers (Python numbers or strings such
      as ``"1,234"``, ``"-0.50"``, ``"16.8x"``, ``"75%"``), left otherwise.

  Returns:
    The table's lines joined by ``\\n``, without a trailing newline.

  Raises:
    ValueError: if a row's length or ``align`` does not match the header.
  """
  n = len(header)
  for i, row in enumerate(rows):
    if len(row) != n:
      raise ValueError(f"markdown_table: row {i} has {len(row)} cells, the header {n}: {row!r}")
  if align is None:
    align = "".join("r" if _numeric([row[j] for row in rows]) else "l" for j in range(n))
  elif len(align) != n or set(align) - set("lrc"):
    raise ValueError(f"markdown_table: align must be one of l, r, c per column ({n} columns), "
                     f"got {align!r}")
  head = [_text(h) for h in header]
  body = [[_text(c) for c in row] for row in rows]
  widths = [max([3, len(head[j])] + [len(row[j]) for row in body]) for j in range(n)]
  pad = {"l": str.ljust, "r": str.rjust, "c": str.center}
  rule = {"l": lambda w: "-" * w, "r": lambda w: "-" * (w - 1) + ":",
          "c": lambda w: ":" + "-" * (w - 2) + ":"}
  line = lambda cells: "| " + " | ".join(cells) + " |"
  cells = lambda row: [pad[a](c, w) for c, w, a in zip(row, widths, align)]
  lines = [line(cells(head)), line(rule[a](w) for w, a in zip(widths, align))]
  return "\n".join(lines + [line(cells(row)) for row in body])
