"""TF-free image-classification input pipeline over TFDS ``data_source``.

A split is read by random access (:func:`open_split`): an example is decoded the first time a batch
needs it and kept as uint8, so a process decodes only the examples of its own rows of each batch.
Batches are cut with NumPy: a permutation drawn from ``(seed, epoch)`` for training (so a resumed
run sees exactly the batches it would have seen, and the global batches do not depend on how many
processes share them), 4-pixel zero-pad random crops and horizontal flips (none for the digit
datasets), and normalisation by the configured mean/std. Evaluation batches cover every example
exactly once: the last batch is padded to full size and carries a 0/1 ``weight`` so padded rows
count for nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from jaxcompress.datasets import (check_prepared, dataset_spec, is_prepared,
                                  not_prepared_error, prepare, resolve_data_dir)
from jaxcompress.errors import ConfigError, invalid
from jaxcompress.progress import bar as progress_bar


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which dataset and splits to read, and how to batch, augment and normalise them.

  Validated when built (a known dataset, positive batch sizes, non-negative example counts);
  errors name the field as ``data.<field>``, the config section jobs build it from.

  Attributes:
    name: a key of :data:`jaxcompress.datasets.DATASETS`.
    data_dir: prepared TFDS folder; empty: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
    train_split: TFDS split to train on.
    eval_split: TFDS split to evaluate on.
    val_examples: hold out this many (last) training examples as ``val`` (0: none).
    train_examples: cap on training examples (0: all).
    batch_size: global training batch.
    eval_batch_size: global eval batch; the last batch is padded, never dropped.
    augment: 4-pixel zero-pad random crop (and horizontal flip, see ``flip``) in training.
    flip: whether ``augment`` flips images horizontally; None: the dataset's choice
      (:class:`jaxcompress.datasets.DatasetSpec`: the CIFARs yes, mnist and fashion_mnist no).
    mean: per-channel mean of ``pixel / 255``; None: the dataset's own
      (:class:`jaxcompress.datasets.DatasetSpec`: ImageNet's for the CIFARs, MNIST's for mnist).
    std: per-channel std of ``pixel / 255``; None: the dataset's own, likewise.
  """
  name: str = "cifar10"
  data_dir: str = ""
  train_split: str = "train"
  eval_split: str = "test"
  val_examples: int = 0
  train_examples: int = 0
  batch_size: int = 128
  eval_batch_size: int = 500
  augment: bool = True
  flip: bool | None = None
  mean: tuple | None = (0.0,)
  std: tuple | None = (1.0,)

  def __post_init__(self):
    spec = dataset_spec(self.name)
    for field in ("batch_size", "eval_batch_size"):
      _check_integer(f"data.{field}", getattr(self, field), 1, "an integer > 0")
    for field in ("val_examples", "train_examples"):
      _check_integer(f"data.{field}", getattr(self, field), 0, "an integer >= 0 (0: none)")
    if self.flip is None:
      object.__setattr__(self, "flip", spec.flip)
    if not isinstance(self.flip, (bool, np.bool_)):
      raise invalid("data.flip", self.flip, "True, False or None (the dataset's choice)")
    for field in ("mean", "std"):
      value = getattr(self, field)
      object.__setattr__(self, field, getattr(spec, field) if value is None else tuple(value))
    check_normalization(self.mean, self.std, spec.image_shape[-1])

  @property
  def num_classes(self) -> int:
    return dataset_spec(self.name).num_classes

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "DataSpec":
    """The spec from the fields of ``values`` it names (e.g. a job's ``data`` config section)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


class Batch(NamedTuple):
  """One batch. ``weight`` is 1 for real examples and 0 for eval padding."""
  image: np.ndarray  # float32 [B, H, W, C], normalised
  label: np.ndarray  # int32 [B]
  weight: np.ndarray  # float32 [B]


def _open_source(name: str, split: str, root: str, field: str = "data.split"):
  """``tfds.data_source`` of the split, or the one-line error (naming ``field``) saying why it
  cannot be read."""
  import tensorflow_datasets as tfds  # imported lazily: it is slow to import

  try:
    source = tfds.data_source(name, split=split, data_dir=root, download=False)
    len(source)  # a slice whose end is before its start has a negative length: unreadable
    return source
  except Exception as e:  # TFDS raises many types here; all mean "cannot read this split"
    check_prepared(name, root)
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
      if sum(max(hi - lo, 0) for _, lo, hi in _parts(name, split, root)) == 0:
        why = "it selects no examples"
    except Exception:  # a split spec TFDS cannot parse: its own message says why
      pass
    raise ConfigError(f"{field}: cannot read split {split!r} of {name!r} from {root!r} "
                      f"({why})") from None


class Split(Protocol):
  """Random access to the examples of one split: what the batch iterators below read.

  ``len(split)`` examples; ``split.read(indices)`` returns ``(uint8 images [k, H, W, C], int32
  labels [k])`` of the examples at ``indices`` (a 1-D integer array), in that order.
  :class:`ArraySplit` holds arrays in memory, :class:`SourceSplit` reads a TFDS split on demand;
  an ``(images, labels)`` pair of arrays is accepted wherever a split is (see :func:`as_split`).
  """

  def __len__(self) -> int: ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held in memory: uint8 ``images [N, H, W, C]`` and int ``labels [N]``."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


def as_split(split: Split | tuple[np.ndarray, np.ndarray]) -> Split:
  """``split`` itself, or an :class:`ArraySplit` of an ``(images, labels)`` pair."""
  if isinstance(split, (tuple, list)):
    if len(split) != 2 or len(split[0]) != len(split[1]):
      raise invalid("split", f"{len(split)} arrays" if len(split) != 2 else
                    f"{len(split[0])} images and {len(split[1])} labels",
                    "(images, labels) with one label per image")
    if np.asarray(split[0]).dtype != np.uint8:
      raise invalid("split images", np.asarray(split[0]).dtype, "uint8 pixels (0..255); "
                    "normalisation divides by 255")
    if np.ndim(split[0]) != 4:
      raise invalid("split images", f"shape {np.shape(split[0])}", "[N, H, W, C] (grey images "
                    "too have a channel axis: images[..., None])")
    return ArraySplit(*split)
  return split


class _Decoded:
  """The examples of a TFDS data source decoded so far, kept as uint8 arrays (one per process)."""

  def __init__(self, source, image_shape: tuple[int, ...]):
    self.source = source
    n = len(source)
    self.images = np.empty((n, *image_shape), np.uint8)  # pages are touched only when filled
    self.labels = np.empty((n,), np.int32)
    self.done = np.zeros((n,), bool)

  def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    missing = np.unique(keys[~self.done[keys]])
    if len(missing):
      for k, rec in zip(missing, _read(self.source, missing.tolist())):
        self.images[k] = np.asarray(rec["image"]).reshape(self.images.shape[1:])
        self.labels[k] = rec["label"]
      self.done[missing] = True
    return self.images[keys], self.labels[keys]


@dataclasses.dataclass(frozen=True)
class SourceSplit:
  """Examples ``[start, stop)`` of a TFDS split, read and decoded the first time they are asked for.

  A process that reads only its rows of every batch decodes only those; each example is decoded
  once and kept (uint8), so later epochs cost no decoding. Views made with :meth:`take` share the
  decoded examples. Built by :func:`open_split`.
  """
  decoded: _Decoded
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    if indices.size and not (0 <= indices.min() and indices.max() < len(self)):
      raise IndexError(f"indices outside [0, {len(self)})")
    return self.decoded.read(indices + self.start)

  def take(self, start: int, stop: int) -> "SourceSplit":
    """The examples ``[start, stop)`` of this split, as a split sharing its decoded examples."""
    if not 0 <= start <= stop <= len(self):
      raise IndexError(f"[{start}, {stop}) is not inside [0, {len(self)})")
    return SourceSplit(self.decoded, self.start + start, self.start + stop)


def open_split(name: str, split: str, *, data_dir: str | None = None,
               prepare_missing: bool = True, field: str = "data.split",
               name_field: str = "data.name") -> SourceSplit:
  """Opens a TFDS split for random access, without TensorFlow and without decoding it yet.

  Args:
    name: a key of :data:`jaxcompress.datasets.DATASETS`.
    split: a TFDS split, e.g. ``"train"``, ``"test"``, ``"train[:1000]"``.
    data_dir: folder of prepared TFDS datasets (default: see
      :func:`jaxcompress.datasets.resolve_data_dir`).
    prepare_missing: when the dataset is not prepared in the data folder, download and prepare it
      there with :func:`jaxcompress.datasets.prepare` (needs TensorFlow and internet); ``False``:
      raise instead (for tests and offline runs).
    field: the config field that gave ``split``, for the error of an unreadable split.
    name_field: the config field or flag that gave ``name``, for the error of an unknown or
      unprepared dataset.

  Returns:
    A :class:`SourceSplit` of the whole split, in its record order.

  Raises:
    ConfigError: unknown dataset name, data not prepared (and not preparable: no TensorFlow,
      no internet, ``prepare_missing=False``), or unknown split.
  """
  spec = dataset_spec(name, name_field)
  root = resolve_data_dir(data_dir)
  try:
    source = _open_source(name, split, root, field)
  except ConfigError:
    if is_prepared(name, root):
      raise
    if not prepare_missing:
      raise not_prepared_error(name, root, " and prepare_missing=False", name_field) from None
    prepare(name, root, name_field)
    source = _open_source(name, split, root, field)
  return SourceSplit(_Decoded(source, spec.image_shape), 0, len(source))


def _parts(name: str, split: str, data_dir: str | None) -> list[tuple[str, int, int]]:
  """``[(split name, start, stop)]`` of a TFDS split spec (``train[:80%]+test``), absolute,
  from the prepared dataset's split sizes."""
  import tensorflow_datasets as tfds  # imported lazily: it is slow to import

  splits = tfds.builder(name, data_dir=resolve_data_dir(data_dir)).info.splits
  return [(part.splitname, part.from_ or 0,
           splits[part.splitname].num_examples if part.to is None else part.to)
          for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)]


def last_examples(name: str, split: str, n: int, *, data_dir: str | None = None) -> str | None:
  """The TFDS split spec of the last ``n`` examples of ``split`` (``"train"``, 500:
  ``"train[49500:50000]"``; several parts joined by ``+``), what a hold-out of ``n`` takes;
  ``None`` when the split sizes cannot be read."""
  return _end_examples(name, split, n, data_dir, last=True)


def first_examples(name: str, split: str, n: int, *, data_dir: str | None = None) -> str | None:
  """The TFDS split spec of the first ``n`` examples of ``split`` (``"train"``, 49,500:
  ``"train[0:49500]"``), what training takes when the last examples are held out;
  ``None`` when the split sizes cannot be read."""
  return _end_examples(name, split, n, data_dir, last=False)


def _end_examples(name: str, split: str, n: int, data_dir: str | None, *,
                  last: bool) -> str | None:
  try:
    parts = _parts(name, split, data_dir)
  except Exception:  # TFDS raises many types for an unreadable dataset or split
    return None
  out = []
  for base, lo, hi in reversed(parts) if last else parts:
    take = min(n, max(hi - lo, 0))
    if take:
      out.append(f"{base}[{hi - take}:{hi}]" if last else f"{base}[{lo}:{lo + take}]")
    n -= take
  return "+".join(reversed(out) if last else out) or None


def check_splits(data: Any, trained: int) -> None:
  """Raises one line if ``data.eval_split`` shares examples with the ``trained`` examples a job
  trains on (the first of ``data.train_split``) or with the held-out slice (its last
  ``data.val_examples``), counted from the prepared dataset's split sizes
  (:func:`shared_examples`): accuracy reported on them would not be a test accuracy; or if
  the held-out slice shares examples with those trained on (a ``data.train_split`` of
  overlapping parts)."""
  used = first_examples(data.name, data.train_split, trained, data_dir=data.data_dir)
  shared = shared_examples(data.name, used or data.train_split, data.eval_split,
                           data_dir=data.data_dir)
  if shared:
    common = (f"shares {shared:,} examples with the {trained:,} examples trained on ({used}, of "
              f"data.train_split={data.train_split!r})" if used else
              "is data.train_split, the examples trained on")
    raise ConfigError(f"data.eval_split={data.eval_split!r} {common}; evaluate on examples the "
                      "model does not train on (another split, or a disjoint slice)")
  if not data.val_examples:
    return
  held = last_examples(data.name, data.train_split, data.val_examples, data_dir=data.data_dir)
  shared = shared_examples(data.name, held or data.train_split, data.eval_split,
                           data_dir=data.data_dir)
  if shared:
    common = f" ({held}: {shared:,} examples in common)" if held else ""
    raise ConfigError(f"data.val_examples={data.val_examples}: the held-out slice (the last "
                      f"examples of data.train_split={data.train_split!r}) overlaps "
                      f"data.eval_split={data.eval_split!r}{common}; evaluate on another split, "
                      "or make the two splits disjoint slices")
  both = shared_examples(data.name, used, held, data_dir=data.data_dir) if used and held else 0
  if both:  # parts of the training split that overlap: the slice held out is trained on too
    raise ConfigError(f"data.train_split={data.train_split!r}: its parts overlap, so the held-out "
                      f"slice ({held}, the last data.val_examples={data.val_examples}) shares "
                      f"{both:,} examples with the {trained:,} trained on ({used}); give parts "
                      "that do not overlap")


def shared_examples(name: str, a: str, b: str, *, data_dir: str | None = None) -> int:
  """How many examples the TFDS splits ``a`` and ``b`` of dataset ``name`` have in common
  (``"test[:5000]"`` and ``"test"``: 5,000), from the prepared dataset's split sizes; when those
  cannot be read, ``a == b`` decides (the reads that follow say what is wrong)."""
  try:
    parts_a, parts_b = _parts(name, a, data_dir), _parts(name, b, data_dir)
  except Exception:  # TFDS raises many types for an unreadable dataset or split
    return 1 if a == b else 0
  return sum(max(0, min(hi, hi2) - max(lo, lo2)) for s, lo, hi in parts_a
             for s2, lo2, hi2 in parts_b if s == s2)


def load_split(name: str, split: str, *, data_dir: str | None = None, progress: bool = True,
               prepare_missing: bool = True, field: str = "data.split",
               name_field: str = "data.name") -> tuple[np.ndarray, np.ndarray]:
  """Decodes a whole TFDS split into memory, without TensorFlow.

  Args:
    name, split, data_dir, prepare_missing, field, name_field: as for :func:`open_split`.
    progress: show a progress bar while decoding.

  Returns:
    ``(images, labels)``: uint8 ``[N, H, W, C]`` and int32 ``[N]``, in the split's record order.

  Raises:
    ConfigError: as :func:`open_split`.
  """
  source = open_split(name, split, data_dir=data_dir, prepare_missing=prepare_missing,
                      field=field, name_field=name_field)
  n, chunk = len(source), 1000
  parts = []
  with progress_bar(total=n, desc=f"decode {name}/{split}", unit="img", disable=not progress,
                    leave=False) as bar:
    for start in range(0, n, chunk):
      parts.append(source.read(np.arange(start, min(start + chunk, n))))
      bar.update(len(parts[-1][1]))
  spec = dataset_spec(name)
  if not parts:
    return np.empty((0, *spec.image_shape), np.uint8), np.empty((0,), np.int32)
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read(source, keys: list[int]) -> list[dict]:
  """Reads records in one batched call; one by one where the source has no batched read (the
  mock source of ``tfds.testing.mock_data``)."""
  try:
    return source.__getitems__(keys)
  except TypeError:
    return [source[k] for k in keys]


def check_normalization(mean: Sequence[float], std: Sequence[float], channels: int | None = None,
                        field: str = "data") -> None:
  """Raises :class:`ConfigError` unless ``std`` holds finite values > 0 and ``mean`` values in
  [0, 1], one per channel (or one for all); the error names ``{field}.mean`` (or ``.std``), or
  ``field`` formatted with ``mean`` (``std``) where it holds ``{}``."""
  def name_of(name: str) -> str:
    return field.format(name) if "{}" in field else f"{field}.{name}"
  for name, v in (("mean", mean), ("std", std)):
    try:
      np.asarray(v, np.float64)
    except (TypeError, ValueError):
      raise invalid(name_of(name), v, "numbers, one per channel or one for all (pixel / 255 "
                    "units)") from None
  mean, std = np.asarray(mean, np.float64).reshape(-1), np.asarray(std, np.float64).reshape(-1)
  if not (np.all(np.isfinite(std)) and np.all(std > 0)):
    raise invalid(name_of("std"), tuple(std.tolist()), "finite values > 0 (pixel / 255 units)")
  if not np.all((mean >= 0) & (mean <= 1)):  # NaN too: the mean of pixels in [0, 1]
    raise invalid(name_of("mean"), tuple(mean.tolist()), "values in [0, 1] (pixel / 255 units)",
                  "a mean of 0-255 pixels is that / 255")
  for name, v in (("mean", mean), ("std", std)):
    if channels is not None and v.size not in (1, channels):
      raise invalid(name_of(name), tuple(v.tolist()), "one value per channel of the "
                    f"{channels}-channel images, or one for all")


def _check_integer(field: str, value: Any, least: int, valid: str) -> None:
  """Raises one line (``field must be {valid}``) unless ``value`` is an integer >= ``least``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
    raise invalid(field, value, valid)


def _check_batch_size(batch_size: int) -> None:
  _check_integer("batch_size", batch_size, 1, "an integer >= 1")


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 pixels -> float32 ``(pixel / 255 - mean) / std`` per channel."""
  check_normalization(mean, std, np.shape(images)[-1] if np.ndim(images) else None)
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return images.astype(np.float32) * scale - shift


def calibration_batches(images: np.ndarray, mean: Sequence[float], std: Sequence[float], *,
                        batch_size: int = 256) -> list[np.ndarray]:
  """``images`` normalised, in batches of at most ``batch_size``: calibration reads no weights,
  so the last batch is shorter rather than padded (padding would add black images)."""
  return [normalize(images[i:i + batch_size], mean, std)
          for i in range(0, len(images), batch_size)]


def augment(images: np.ndarray, rng: np.random.Generator, *, pad: int = 4,
            rows: tuple[int, int] | None = None, batch_size: int | None = None,
            flip: bool = True) -> np.ndarray:
  """Random ``pad``-pixel zero-pad crop and random horizontal flip, per image.

  Args:
    images: uint8 ``[B, H, W, C]``.
    rng: NumPy generator; decides the crop offsets and flips.
    pad: zero padding on each side before cropping back to ``H x W``.
    rows: ``images`` are rows ``[lo, hi)`` of a batch of ``batch_size`` (default: the whole
      batch). The draws are made for the whole batch, so an image's crop and flip do not depend on
      how its batch is split over processes.
    batch_size: size of that whole batch (default ``len(images)``).
    flip: ``False``: no image is flipped (the crops are those of ``True``).

  Returns:
    Augmented uint8 images of the same shape.
  """
  b, h, w, _ = images.shape
  total = b if batch_size is None else batch_size
  lo, hi = (0, total) if rows is None else rows
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=total)[lo:hi]
  dx = rng.integers(0, 2 * pad + 1, size=total)[lo:hi]
  rows_ = dy[:, None] + np.arange(h)[None, :]  # [B, H]
  cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
  if flip:
    flips = (rng.random(total) < 0.5)[lo:hi]
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows_[:, :, None], cols[:, None, :]]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps in one epoch (the remainder that does not fill a batch is dropped)."""
  return num_examples // batch_size


def check_batch_fits(num_examples: int, batch_size: int) -> None:
  """Raises one line (naming ``data.batch_size``) if ``num_examples`` training examples do not
  fill one batch: an epoch of no step."""
  if num_examples < batch_size:
    raise invalid("data.batch_size", batch_size, f"at most the {num_examples} training examples "
                  "given (one batch per step; the last partial batch is dropped)")


def train_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The epoch's example order: a permutation that depends only on ``(seed, epoch)``.

  Global batch ``i`` is ``order[i * B:(i + 1) * B]``, whatever the number of processes.
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(split: Split | tuple[np.ndarray, np.ndarray], batch_size: int, *, seed: int,
                  epoch: int, mean: Sequence[float], std: Sequence[float],
                  augment_images: bool = True, flip: bool = True, start: int = 0,
                  rows: tuple[int, int] | None = None) -> Iterator[Batch]:
  """Yields one epoch of shuffled, augmented, normalised training batches.

  The order depends only on ``(seed, epoch)`` (:func:`train_order`) and each batch's augmentation
  only on ``(seed, epoch, step)``; ``start`` skips the first batches, so a run resumed mid-epoch
  continues exactly where it stopped. The remainder is dropped.

  Args:
    split: a :class:`Split` or ``(uint8 images, int labels)``.
    batch_size: the global batch size.
    seed, epoch: decide the order and the augmentation.
    mean, std: per channel, of pixel / 255; the images become ``(pixel / 255 - mean) / std``
      (:func:`normalize`).
    augment_images: random crop and flip (:func:`augment`); ``False``: the images as stored.
    flip: with ``augment_images``, flip images horizontally too (``False``: crops only).
    start: the first batch yielded (the ones before it are skipped, not read).
    rows: yield only rows ``[lo, hi)`` of every global batch, and read only their examples (this
      process's part, :func:`jaxcompress.parallel.local_rows`); default: whole batches.
  """
  _check_batch_size(batch_size)
  split = as_split(split)
  order = train_order(len(split), seed=seed, epoch=epoch)
  lo, hi = (0, batch_size) if rows is None else rows
  ones = np.ones((hi - lo,), np.float32)
  for step in range(start, steps_per_epoch(len(split), batch_size)):
    x, y = split.read(order[step * batch_size:(step + 1) * batch_size][lo:hi])
    if augment_images:
      x = augment(x, np.random.default_rng([seed, epoch, step]), rows=(lo, hi),
                  batch_size=batch_size, flip=flip)
    yield Batch(normalize(x, mean, std), y, ones)


def eval_batches(split: Split | tuple[np.ndarray, np.ndarray], batch_size: int, *,
                 mean: Sequence[float], std: Sequence[float],
                 rows: tuple[int, int] | None = None) -> Iterator[Batch]:
  """Yields every example exactly once, in order; the last batch is zero-padded with weight 0.

  Args:
    split: a :class:`Split` or ``(uint8 images, int labels)``.
    batch_size: the global batch size; global batch ``i`` holds examples ``[i * B, (i + 1) * B)``.
    mean, std: per channel, of pixel / 255, as for :func:`train_batches`.
    rows: yield only rows ``[lo, hi)`` of every global batch, and read only their examples; every
      process yields the same number of batches (rows past the end are padding of weight 0).
  """
  _check_batch_size(batch_size)
  split = as_split(split)
  n = len(split)
  lo, hi = (0, batch_size) if rows is None else rows
  for start in range(0, n, batch_size):
    keys = np.arange(start + lo, min(start + hi, n))
    x, y = split.read(keys)
    weight = np.zeros((hi - lo,), np.float32)
    weight[:len(keys)] = 1.0
    if len(keys) < hi - lo:
      fill = hi - lo - len(keys)
      x = np.concatenate([x, np.zeros((fill, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((fill,), y.dtype)])
    yield Batch(normalize(x, mean, std), y, weight)
