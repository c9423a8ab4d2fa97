"""Character-level text data: a text file, its splits, a vocabulary, training and eval windows.

The splits are TFDS ``tiny_shakespeare``'s: ``train`` is the first ``int(0.9 n)`` characters of
the ``n``, ``validation`` the first half (rounded down) of the rest and ``test`` the remainder;
``val111k`` is ``validation`` and ``test`` together (nanoGPT's ``shakespeare_char`` "val"). On Tiny
Shakespeare (1,115,394 characters) that is 1,003,854 / 55,770 / 55,770 and 111,540 characters.

Characters are the tokens; the vocabulary is the sorted set of the training split's characters.
Batches are :class:`jaxcompress.data.Batch` es, so the library's train and eval steps take them
as they take images: ``image`` holds input ids ``[B, T]``, ``label`` the next character of each
``[B, T]`` and ``weight`` ``[B, T]`` which positions count. Training windows start at random
offsets drawn from ``(seed, step)`` alone, so a resumed run sees the batches an uninterrupted one
would; evaluation cuts a split into consecutive non-overlapping windows and predicts every
character after the first exactly once (the last, partial window and the padding windows of the
last batch carry weight 0 where they hold no character).

Example:
  >>> corpus = load_corpus(text_path(""), context=64)
  >>> batch = train_batch(corpus.ids["train"], batch_size=12, context=64, seed=0, step=0)
  >>> batch.image.shape, batch.label.shape
  ((12, 64), (12, 64))
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Iterator

import numpy as np

from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError, invalid, shortened

TEXT_ENV = "JAXCOMPRESS_TEXT_DIR"
DEFAULT_TEXT_DIR = "~/.cache/jaxcompress/text"
TINY_SHAKESPEARE = os.path.join("tiny_shakespeare", "input.txt")
SPLITS = ("train", "validation", "test", "val111k")
TRAIN_FRACTION = 0.9  # TFDS tiny_shakespeare: 90 % train, then the rest halved


def text_path(configured: str = "") -> str:
  """The text file to read: ``configured``, else
  ``$JAXCOMPRESS_TEXT_DIR/tiny_shakespeare/input.txt``, else
  ``~/.cache/jaxcompress/text/tiny_shakespeare/input.txt``."""
  if configured:
    return os.path.expanduser(configured)
  folder = os.environ.get(TEXT_ENV) or DEFAULT_TEXT_DIR
  return os.path.expanduser(os.path.join(folder, TINY_SHAKESPEARE))


def read_text(path: str, *, field: str = "data.path") -> str:
  """The whole file as UTF-8 text, every character as stored (``\r\n`` stays two characters).

  Raises:
    ConfigError: the file is missing, unreadable, not UTF-8, or empty.
  """
  where = (f"set {field} to the text file, or ${TEXT_ENV} to the folder that holds "
           f"{TINY_SHAKESPEARE}")
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no text file at {path!r}; {where}")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ConfigError(f"{field}: {path!r} is not UTF-8 text (byte {e.start}: {e.reason})"
                      ) from None
  except OSError as e:
    raise ConfigError(f"{field}: cannot read {path!r} ({e.strerror}); {where}") from None
  if not text:
    raise ConfigError(f"{field}: the text file {path!r} is empty; {where}")
  return text


def split_text(text: str) -> dict[str, str]:
  """``{'train', 'validation', 'test', 'val111k'}`` substrings of ``text`` (module docstring)."""
  cut = int(len(text) * TRAIN_FRACTION)
  rest = text[cut:]
  half = int(len(rest) * 0.5)
  return {"train": text[:cut], "validation": rest[:half], "test": rest[half:], "val111k": rest}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters as token ids: ``chars[i]`` is token ``i``. Invariant: ``chars`` sorted, unique."""
  chars: str

  def __post_init__(self):
    if not self.chars or list(self.chars) != sorted(set(self.chars)):
      raise invalid("vocabulary", self.chars, "a non-empty string of sorted, distinct characters")

  @classmethod
  def from_text(cls, text: str) -> "Vocabulary":
    """The sorted set of ``text``'s characters."""
    return cls("".join(sorted(set(text))))

  @property
  def size(self) -> int:
    return len(self.chars)

  def encode(self, text: str, *, what: str = "text") -> np.ndarray:
    """int32 ids of ``text``.

    Raises:
      ConfigError: ``text`` holds characters outside the vocabulary; the message opens with
        ``what`` (the config field, or the field and what of it was read).
    """
    table = {c: i for i, c in enumerate(self.chars)}
    unknown = sorted(set(text) - set(table))
    if unknown:
      shown = shortened(unknown, 10, sep="")
      raise ConfigError(f"{what} holds {len(unknown)} character(s) outside the training "
                        f"vocabulary of {self.size}: {shown!r}; use only the training split's "
                        "characters")
    return np.fromiter((table[c] for c in text), np.int32, len(text))

  def decode(self, ids) -> str:
    """The text of integer ids in ``[0, size)``; any other id (a padding label of -1, 1.5) is
    refused."""
    ids = np.asarray(ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= self.size) | (ids != np.floor(ids))]
    if bad.size:
      raise invalid("ids", bad[0].item(), f"integers in [0, {self.size}), ids of this vocabulary",
                    "drop padding positions before decoding")
    return "".join(self.chars[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A text's vocabulary and the ids of each of its splits (``ids[name]``, int32 ``[n]``)."""
  vocab: Vocabulary
  ids: dict

  def fingerprint(self) -> str:
    """``sha256:`` and the first 16 hex digits of the SHA-256 of the vocabulary and every
    split's ids: equal for the same text, whichever path it was read from."""
    h = hashlib.sha256(self.vocab.chars.encode("utf-8"))
    for name in sorted(self.ids):
      h.update(name.encode())
      h.update(np.ascontiguousarray(self.ids[name], np.int32).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _check_count(field: str, value) -> None:
  """One line unless ``value`` is an integer >= 1 (a window or batch of 2.5 is none)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise invalid(field, value, "an integer >= 1")
  if value < 1:
    raise invalid(field, value, ">= 1")


def _check_context(context: int) -> None:
  _check_count("data.context", context)


def _check_windows(n: int, batch_size: int, context: int) -> None:
  """One line unless ``batch_size >= 1`` windows of ``context`` characters and their targets
  fit in a split of ``n`` characters."""
  _check_count("data.batch_size", batch_size)
  _check_context(context)
  if n < context + 1:
    raise invalid("data.context", context, f"at most {n - 1} (the split holds {n} characters "
                  "and a window needs context + 1)")


def load_corpus(path: str, context: int, *, vocab: Vocabulary | None = None,
                field: str = "data.path") -> Corpus:
  """Reads, splits and encodes a text file, checking it fits windows of ``context`` characters.

  Args:
    path: the text file (see :func:`text_path`).
    context: characters the model sees; each split needs ``context + 1`` characters (a window
      and its targets).
    vocab: the vocabulary (default: built from the training split).
    field: config field of ``path`` for messages.

  Raises:
    ConfigError: a missing or empty file, a split shorter than ``context + 1`` characters, or a
      split with characters outside the vocabulary.
  """
  _check_context(context)
  text = read_text(path, field=field)
  splits = split_text(text)
  name = min(SPLITS, key=lambda k: len(splits[k]))  # the bound every split meets
  if len(splits[name]) < 2:
    raise invalid(field, path, "a longer text", f"its {len(text)} characters leave the {name} "
                  f"split {len(splits[name])}, and a window needs 2 (a character and its target)")
  if len(splits[name]) < context + 1:
    raise invalid("data.context", context, f"at most {len(splits[name]) - 1}: the {name} split "
                  f"of {path!r} holds {len(splits[name])} characters and a window needs "
                  "context + 1", "lower data.context or use a longer text")
  vocab = vocab or Vocabulary.from_text(splits["train"])
  ids = {name: vocab.encode(text, what=f"{field}: the {name} split of {path!r}")
         for name, text in splits.items()}
  return Corpus(vocab, ids)


def train_batch(ids: np.ndarray, *, batch_size: int, context: int, seed: int,
                step: int) -> Batch:
  """The training batch of global step ``step``: ``batch_size`` windows at random offsets.

  The offsets depend only on ``(seed, step)``; targets are the inputs shifted by one character.
  """
  _check_windows(len(ids), batch_size, context)
  starts = np.random.default_rng([seed, step]).integers(0, len(ids) - context, size=batch_size)
  rows = starts[:, None] + np.arange(context)[None, :]
  return Batch(ids[rows], ids[rows + 1], np.ones((batch_size, context), np.float32))


@dataclasses.dataclass(frozen=True)
class TrainWindows:
  """Random training windows of a split as a batch source for :func:`jaxcompress.train.fit`.

  An "epoch" is ``steps_per_epoch`` steps (as many windows as the split holds characters, by
  default); step ``k`` of the run is :func:`train_batch` at ``step=k``, whatever the epoch. A
  batch holds at most as many windows as the split has offsets to start one at.
  """
  ids: np.ndarray
  batch_size: int
  context: int

  def __post_init__(self):
    _check_windows(len(self.ids), self.batch_size, self.context)
    windows = len(self.ids) - self.context  # the offsets a window starts at
    if self.batch_size > windows:
      raise invalid("data.batch_size", self.batch_size, f"at most {windows}, the windows of "
                    f"data.context={self.context} characters the train split holds")

  @property
  def steps_per_epoch(self) -> int:
    return max(1, len(self.ids) // (self.batch_size * self.context))

  def batches(self, *, seed: int, epoch: int, start: int = 0) -> Iterator[Batch]:
    """The batches of ``epoch`` from its ``start``-th step on."""
    for i in range(start, self.steps_per_epoch):
      yield train_batch(self.ids, batch_size=self.batch_size, context=self.context, seed=seed,
                        step=epoch * self.steps_per_epoch + i)


def num_eval_windows(n: int, context: int) -> int:
  """Windows :func:`eval_batches` cuts from ``n`` characters (``n - 1`` predicted ones)."""
  return math.ceil((n - 1) / context)


def eval_batches(ids: np.ndarray, *, batch_size: int, context: int) -> Iterator[Batch]:
  """Consecutive non-overlapping windows that predict every character but the first once.

  Window ``w`` reads ``ids[w T : w T + T]`` and predicts ``ids[w T + 1 : w T + T + 1]``; positions
  past the split's end (in the last window, and whole padding windows filling the last batch) are
  zero with weight 0.
  """
  _check_windows(len(ids), batch_size, 1)  # a last window may be short: 2 characters suffice
  _check_context(context)
  n, t = len(ids), context
  windows = num_eval_windows(n, t)
  padded = np.zeros(windows * t + 1, np.int32)
  padded[:n] = ids
  weight = np.zeros(windows * t, np.float32)
  weight[:n - 1] = 1.0
  x, y = padded[:-1].reshape(windows, t), padded[1:].reshape(windows, t)
  w = weight.reshape(windows, t)
  for s in range(0, windows, batch_size):
    bx, by, bw = x[s:s + batch_size], y[s:s + batch_size], w[s:s + batch_size]
    fill = batch_size - len(bx)
    if fill:
      pad = ((0, fill), (0, 0))
      bx, by, bw = np.pad(bx, pad), np.pad(by, pad), np.pad(bw, pad)
    yield Batch(bx, by, bw)


def bits(nats: float) -> float:
  """Nats per character as bits per character."""
  return nats / math.log(2)
