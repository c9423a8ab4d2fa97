"""jaxcompress.text: splits, vocabulary, training and evaluation windows, against hand counts."""

import os

import numpy as np
import pytest

from jaxcompress import text
from jaxcompress.errors import ConfigError

SHAKESPEARE = text.text_path("")


def _write(tmp_path, content, name="input.txt"):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  return str(path)


def test_split_sizes_follow_tfds_on_a_hand_example():
  # 25 characters: int(22.5) = 22 train; the rest (3) halves to 1 validation, 2 test.
  s = "abcdefghijklmnopqrstuvwxy"
  splits = text.split_text(s)
  assert splits["train"] == s[:22]
  assert splits["validation"] == "w"
  assert splits["test"] == "xy"
  assert splits["val111k"] == "wxy"


def test_vocabulary_is_the_sorted_training_characters_and_round_trips():
  vocab = text.Vocabulary.from_text("hello world")
  assert vocab.chars == " dehlorw"
  ids = vocab.encode("low")
  np.testing.assert_array_equal(ids, [4, 5, 7])
  assert ids.dtype == np.int32
  assert vocab.decode(ids) == "low"


def test_unknown_characters_are_one_line(tmp_path):
  vocab = text.Vocabulary("abc")
  with pytest.raises(ConfigError, match=r"^sample.prompt holds 3 character\(s\) outside the "
                     r"training vocabulary of 3: '\\nxz'"):
    vocab.encode("abxz\n", what="sample.prompt")
  # Characters that only the held-out part holds: the corpus refuses them in one line.
  path = _write(tmp_path, "ab" * 45 + "abcdabcdZ\n")  # 100 chars: train = 90 chars of a/b
  with pytest.raises(ConfigError) as e:
    text.load_corpus(path, context=2)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith(f"data.path: the validation split of {path!r} holds 2 ")


def test_missing_and_empty_files_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match="data.path: no text file at"):
    text.read_text(str(tmp_path / "absent.txt"))
  with pytest.raises(ConfigError, match="is empty"):
    text.read_text(_write(tmp_path, ""))


def test_context_longer_than_a_split_is_one_line(tmp_path):
  path = _write(tmp_path, "abcd" * 25)  # 100 chars: validation 5, test 5
  with pytest.raises(ConfigError, match=r"data.context must be at most 4: the validation split"):
    text.load_corpus(path, context=5)
  corpus = text.load_corpus(path, context=4)
  assert {k: len(v) for k, v in corpus.ids.items()} == {
      "train": 90, "validation": 5, "test": 5, "val111k": 10}


def test_line_ends_are_characters_as_stored(tmp_path):
  path = tmp_path / "crlf.txt"
  content = "to be,\r\nor not\rto be\n" * 20  # 420 characters, CR LF, lone CR and LF
  path.write_bytes(content.encode("utf-8"))
  assert text.read_text(str(path)) == content
  corpus = text.load_corpus(str(path), context=8)
  assert "\r" in corpus.vocab.chars
  assert len(corpus.ids["train"]) == int(0.9 * len(content))
  assert corpus.vocab.decode(np.concatenate([corpus.ids[k] for k in ("train", "val111k")])) == (
      content)


def test_the_context_bound_is_the_shortest_splits(tmp_path):
  path = _write(tmp_path, "ab" * 25)  # 50 chars: train 45, validation 2, test 3
  with pytest.raises(ConfigError, match=r"^data.context must be at most 1: the validation split"):
    text.load_corpus(path, context=50)  # over every split: the bound is validation's, not train's


@pytest.mark.parametrize("context", [0, -2])
def test_windows_of_no_characters_are_one_line(context):
  ids = np.arange(40, dtype=np.int32) % 5
  with pytest.raises(ConfigError, match=rf"^data.context must be >= 1, got {context}$"):
    text.TrainWindows(ids, 8, context)
  with pytest.raises(ConfigError, match=rf"^data.context must be >= 1, got {context}$"):
    next(text.eval_batches(ids, batch_size=8, context=context))


@pytest.mark.parametrize("field,value", [("context", 2.5), ("context", "3"), ("context", True),
                                         ("batch_size", 1.5), ("batch_size", 2.0)])
def test_a_window_or_batch_of_no_whole_size_is_one_line(field, value):
  ids = np.arange(40, dtype=np.int32) % 5
  sizes = {"batch_size": 2, "context": 3, field: value}
  match = rf"^data.{field} must be an integer >= 1, got {value!r}$"
  for call in (lambda: text.TrainWindows(ids, sizes["batch_size"], sizes["context"]),
               lambda: text.train_batch(ids, **sizes, seed=0, step=0),
               lambda: next(text.eval_batches(ids, **sizes))):
    with pytest.raises(ConfigError, match=match):
      call()
  # Whole sizes cut what a hand slicing does: window w of eval reads ids[3 w : 3 w + 3].
  first = next(text.eval_batches(ids, batch_size=2, context=np.int64(3)))
  np.testing.assert_array_equal(first.image, [ids[0:3], ids[3:6]])
  np.testing.assert_array_equal(first.label, [ids[1:4], ids[4:7]])


@pytest.mark.parametrize("batch_size", [38, 10**12])
def test_a_batch_of_more_windows_than_the_split_holds_is_one_line(batch_size):
  # 40 characters hold windows of 3 (and their targets) at the 37 offsets 0..36, by hand; a batch
  # of 10**12 was accepted, to fail drawing its offsets once the run had started.
  ids = np.arange(40, dtype=np.int32) % 5
  assert text.TrainWindows(ids, 37, 3).steps_per_epoch == 1
  with pytest.raises(ConfigError, match=rf"^data.batch_size must be at most 37, the windows of "
                                        rf"data.context=3 characters the train split holds, got "
                                        rf"{batch_size}$"):
    text.TrainWindows(ids, batch_size, 3)


def test_a_text_too_short_for_its_splits_is_one_line(tmp_path):
  path = _write(tmp_path, "abcdefghij")  # 10 chars: int(9) train, validation 0, test 1
  with pytest.raises(ConfigError, match=r"^data.path must be a longer text, got '.*input.txt'; "
                     r"its 10 characters leave the validation split 0, and a window needs 2"):
    text.load_corpus(path, context=1)


def test_helpers_refuse_what_they_cannot_cut_in_one_line():
  ids = np.arange(6, dtype=np.int32) % 3
  with pytest.raises(ConfigError, match=r"^data.context must be at most 5 \(the split holds 6"):
    text.train_batch(ids, batch_size=2, context=6, seed=0, step=0)
  for call in (lambda: text.train_batch(ids, batch_size=0, context=2, seed=0, step=0),
               lambda: next(text.eval_batches(ids, batch_size=0, context=2))):
    with pytest.raises(ConfigError, match=r"^data.batch_size must be >= 1, got 0$"):
      call()
  vocab = text.Vocabulary("abc")
  for bad in (-1, 3, 1.5):
    with pytest.raises(ConfigError, match=rf"^ids must be integers in \[0, 3\), .* got {bad}"):
      vocab.decode([0, bad])
  assert vocab.decode(np.float32([2.0, 0.0])) == "ca"


def test_text_path_prefers_config_then_environment(monkeypatch):
  monkeypatch.setenv(text.TEXT_ENV, "/data/text")
  assert text.text_path("/x/y.txt") == "/x/y.txt"
  assert text.text_path("") == "/data/text/tiny_shakespeare/input.txt"
  monkeypatch.delenv(text.TEXT_ENV)
  assert text.text_path("").endswith(".cache/jaxcompress/text/tiny_shakespeare/input.txt")


def test_train_batch_targets_are_inputs_shifted_and_depend_only_on_seed_and_step():
  ids = np.arange(100, dtype=np.int32) * 3  # value = 3 * position: offsets are readable
  b = text.train_batch(ids, batch_size=4, context=8, seed=1, step=7)
  assert b.image.shape == b.label.shape == b.weight.shape == (4, 8)
  starts = b.image[:, 0] // 3
  np.testing.assert_array_equal(b.image, 3 * (starts[:, None] + np.arange(8)))
  np.testing.assert_array_equal(b.label, b.image + 3)
  assert (starts >= 0).all() and (starts + 8 <= 99).all()
  assert b.weight.sum() == 32
  again = text.train_batch(ids, batch_size=4, context=8, seed=1, step=7)
  np.testing.assert_array_equal(again.image, b.image)
  other = text.train_batch(ids, batch_size=4, context=8, seed=1, step=8)
  assert not np.array_equal(other.image, b.image)


def test_train_windows_resume_mid_epoch_with_the_same_batches():
  source = text.TrainWindows(np.arange(200, dtype=np.int32), batch_size=2, context=10)
  assert source.steps_per_epoch == 10  # 200 // (2 * 10)
  full = list(source.batches(seed=3, epoch=1))
  resumed = list(source.batches(seed=3, epoch=1, start=4))
  assert len(full) == 10 and len(resumed) == 6
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a.image, b.image)
  # Step k of the run (epoch 1, step 4 = global step 14) is train_batch at step 14.
  direct = text.train_batch(source.ids, batch_size=2, context=10, seed=3, step=14)
  np.testing.assert_array_equal(full[4].image, direct.image)


def test_eval_batches_predict_every_position_once_with_hand_weights():
  ids = np.arange(1, 12, dtype=np.int32)  # 11 chars, 10 predictions; context 4 -> 3 windows
  assert text.num_eval_windows(11, 4) == 3
  batches = list(text.eval_batches(ids, batch_size=2, context=4))
  assert len(batches) == 2
  x = np.concatenate([b.image for b in batches])
  y = np.concatenate([b.label for b in batches])
  w = np.concatenate([b.weight for b in batches])
  np.testing.assert_array_equal(x[:3], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]])
  np.testing.assert_array_equal(y[:3], [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 0, 0]])
  np.testing.assert_array_equal(w, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
  targets = y[w > 0]
  np.testing.assert_array_equal(np.sort(targets), ids[1:])  # each position exactly once


def test_eval_batches_loss_equals_a_hand_computed_mean():
  # A "model" predicting uniform over 5 symbols has loss log 5 at every counted position.
  ids = np.array([0, 1, 2, 3, 4, 0, 1], np.int32)
  total, count = 0.0, 0
  for b in text.eval_batches(ids, batch_size=3, context=4):
    loss = np.full(b.label.shape, np.log(5.0))
    total += float((loss * b.weight).sum())
    count += int(b.weight.sum())
  assert count == 6
  assert total / count == pytest.approx(np.log(5.0))
  assert text.bits(np.log(5.0)) == pytest.approx(np.log2(5.0))


@pytest.mark.skipif(not os.path.isfile(SHAKESPEARE),
                    reason=f"Tiny Shakespeare not found (set ${text.TEXT_ENV})")
def test_tiny_shakespeare_splits_match_tfds_and_nanogpt():
  corpus = text.load_corpus(SHAKESPEARE, context=256)
  sizes = {k: len(v) for k, v in corpus.ids.items()}
  assert sizes == {"train": 1_003_854, "validation": 55_770, "test": 55_770, "val111k": 111_540}
  assert corpus.vocab.size == 65
  assert corpus.vocab.decode(corpus.ids["train"][:14]) == "First Citizen:"
