"""The Markdown table writer: layout against hand-written tables, default alignment, errors."""

import pytest

from jaxcompress.tables import markdown_table


def test_numbers_right_text_left_columns_padded():
  table = markdown_table(
      ("model", "accuracy %", "size (bytes)", "ratio", "bits"),
      [("resnet20", "91.73", "1,078,888", "1.0x", 32),
       ("pruned + int4", "-0.50", "64,172", "16.8x", None)])
  assert table == (
      "| model         | accuracy % | size (bytes) | ratio | bits |\n"
      "| ------------- | ---------: | -----------: | ----: | ---: |\n"
      "| resnet20      |      91.73 |    1,078,888 |  1.0x |   32 |\n"
      "| pruned + int4 |      -0.50 |       64,172 | 16.8x |      |")


def test_explicit_alignment_escapes_and_short_columns():
  table = markdown_table(("#", "ok", "note"), [(1, "yes", "a|b"), (2, "no", "")], align="rcl")
  assert table == (
      "|   # |  ok | note |\n"
      "| --: | :-: | ---- |\n"
      "|   1 | yes | a\\|b |\n"
      "|   2 |  no |      |")


def test_empty_column_and_no_rows_are_left_aligned():
  assert markdown_table(("a", "b"), [("x", ""), ("y", None)]) == (
      "| a   | b   |\n"
      "| --- | --- |\n"
      "| x   |     |\n"
      "| y   |     |")
  assert markdown_table(("value",), []) == "| value |\n| ----- |"


def test_a_column_with_one_word_is_text():
  assert markdown_table(("bits",), [("8",), ("float",)]).splitlines()[1] == "| ----- |"
  assert markdown_table(("ok",), [(True,), (False,)]).splitlines()[1] == "| ----- |"


def test_mismatched_row_or_align_is_an_error():
  with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
    markdown_table(("a", "b"), [(1, 2), (3,)])
  with pytest.raises(ValueError, match="one of l, r, c per column"):
    markdown_table(("a", "b"), [(1, 2)], align="l")
  with pytest.raises(ValueError, match="one of l, r, c per column"):
    markdown_table(("a", "b"), [(1, 2)], align="lx")
