"""The image datasets the pipeline reads, and their one-time preparation.

:data:`DATASETS` holds each supported dataset's image shape, class count, label names, default
normalisation and whether its training images are flipped (:func:`dataset_spec`). The pipeline
(:mod:`jaxcompress.data`) reads datasets prepared as TFDS ``array_record`` files under one folder
(:func:`resolve_data_dir`); :func:`prepare` downloads and prepares a missing one there once, with
TensorFlow (the ``prepare`` extra), which reading never needs.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import sys
import time

from jaxcompress.errors import ConfigError, first_line, unknown

_PREPARE_EXTRA = "pip install -e '.[prepare]'"
_DATA_HELP = (
    "set TFDS_DATA_DIR{data_dir} to a folder holding the prepared dataset, e.g. "
    "TFDS_DATA_DIR=../shared/tensorflow_datasets; or, on a machine with internet, install "
    f"TensorFlow with `{_PREPARE_EXTRA}` and load again (the dataset is then downloaded and "
    "prepared there once, automatically; or run `tfds build {name} --file_format=array_record`)")
# Approximate one-time download of each dataset (TFDS ``info.download_size``), for the progress
# line of :func:`prepare`.
_DOWNLOAD_MB = {"cifar10": 163, "cifar100": 161, "mnist": 11, "fashion_mnist": 30}
# TFDS prepares into ``<name>/incomplete.XXXXXX_<version>/`` and renames it when done; a run killed
# hard can leave one behind, which must not count as prepared.
_INCOMPLETE_PREFIX = "incomplete."


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a supported dataset.

  Attributes:
    image_shape: ``(H, W, C)`` of one image.
    num_classes: number of labels.
    label_names: the TFDS label names, ``label_names[i]`` for label ``i`` (``num_classes`` of
      them).
    mean: per-channel mean of ``pixel / 255`` the images are normalised with where none is given.
    std: per-channel std of ``pixel / 255``, likewise.
    flip: whether training augmentation flips the images horizontally where not told: a mirrored
      photo shows the same class, a mirrored digit or garment another symbol (or none).
  """
  image_shape: tuple[int, int, int]
  num_classes: int
  label_names: tuple[str, ...] = ()
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  flip: bool = True


CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")
CIFAR100_LABELS = (  # the fine labels, as in the dataset's fine_label_names.txt
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab",
    "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree",
    "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")
MNIST_LABELS = tuple(str(i) for i in range(10))
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot")

# The CIFARs are normalised with the ImageNet statistics, as the pretrained CIFAR ResNets were
# trained; the grey datasets with their own (pixel / 255 over the training split).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = {
    "cifar10": DatasetSpec((32, 32, 3), 10, CIFAR10_LABELS, IMAGENET_MEAN, IMAGENET_STD),
    "cifar100": DatasetSpec((32, 32, 3), 100, CIFAR100_LABELS, IMAGENET_MEAN, IMAGENET_STD),
    "mnist": DatasetSpec((28, 28, 1), 10, MNIST_LABELS, (0.1307,), (0.3081,), flip=False),
    "fashion_mnist": DatasetSpec((28, 28, 1), 10, FASHION_MNIST_LABELS, (0.2860,), (0.3530,),
                                 flip=False),
}


def dataset_spec(name: str, field: str = "data.name") -> DatasetSpec:
  """Returns the :class:`DatasetSpec` of ``name`` or raises a one-line :class:`ConfigError` that
  names ``field``."""
  if name not in DATASETS:
    raise unknown(field, name, DATASETS)
  return DATASETS[name]


def resolve_data_dir(data_dir: str | None) -> str:
  """The folder TFDS reads: ``data_dir``, else ``$TFDS_DATA_DIR``, else
  ``~/tensorflow_datasets``."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")


def is_prepared(name: str, data_dir: str) -> bool:
  """Whether ``data_dir`` holds a finished ``name/[config/]version/dataset_info.json``."""
  infos = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json"))
  infos += glob.glob(os.path.join(data_dir, name, "*", "*", "dataset_info.json"))
  for info in infos:
    parts = os.path.relpath(info, os.path.join(data_dir, name)).split(os.sep)
    if not any(part.startswith(_INCOMPLETE_PREFIX) for part in parts):
      return True
  return False


def not_prepared_error(name: str, data_dir: str, why: str = "", field: str = "data.name"
                       ) -> ConfigError:
  """The one-line error for a dataset missing from ``data_dir``; ``why`` ends its cause, and
  ``field`` is what gave ``name``."""
  return ConfigError(f"{field}: dataset {name!r} is not prepared under {data_dir!r} "
                     f"(looked for {name}/<version>/dataset_info.json){why}; "
                     + _data_help(name, field))


def _data_help(name: str, field: str) -> str:
  """How to make dataset ``name`` readable; the config's ``data.data_dir`` only where the config
  gave the name (a flag such as ``--dataset`` comes with no such field)."""
  return _DATA_HELP.format(name=name, data_dir=" (or data.data_dir)" if field == "data.name"
                           else "")


def check_prepared(name: str, data_dir: str) -> None:
  """Raises :func:`not_prepared_error` unless ``data_dir`` holds dataset ``name`` prepared."""
  if not is_prepared(name, data_dir):
    raise not_prepared_error(name, data_dir)


def _tensorflow_available() -> bool:
  """Whether TensorFlow (needed to prepare, never to read) is importable; does not import it."""
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):  # a broken install or a half-imported module
    return False


def prepare(name: str, data_dir: str | None = None, field: str = "data.name") -> str:
  """Downloads and prepares dataset ``name`` once, as array_record files TFDS reads without TF.

  Needs TensorFlow (the ``prepare`` extra: ``pip install -e '.[prepare]'``) and internet; only
  TensorFlow Datasets' builder is run, which writes into a temporary folder and renames it when
  done. Does nothing when the dataset is already prepared there. Prints one line to stderr before
  and one after.

  Args:
    name: a key of :data:`DATASETS`.
    data_dir: folder of prepared TFDS datasets (default: see :func:`resolve_data_dir`).
    field: the config field or flag that gave ``name``, for messages.

  Returns:
    The resolved data folder, which now holds the prepared dataset.

  Raises:
    ConfigError: unknown dataset name, TensorFlow not installed, or preparation failed (no
      internet, disk full, ...) or left no finished dataset behind.
  """
  dataset_spec(name, field)
  root = resolve_data_dir(data_dir)
  if is_prepared(name, root):
    return root
  if not _tensorflow_available():
    raise not_prepared_error(name, root, " and TensorFlow, which prepares it, is not installed",
                             field)
  import tensorflow_datasets as tfds  # imported lazily: it is slow to import

  size = f"about {_DOWNLOAD_MB[name]} MB" if name in _DOWNLOAD_MB else "it"
  print(f"preparing {name} into {root} with TFDS (downloads {size} once) ...", file=sys.stderr,
        flush=True)
  start = time.monotonic()
  try:
    tfds.builder(name, data_dir=root).download_and_prepare(file_format="array_record")
  except Exception as e:  # no internet, disk full, a TFDS or TensorFlow error: all user-fixable
    raise ConfigError(f"{field}: preparing dataset {name!r} into {root!r} failed "
                      f"({first_line(e)}); check the internet connection and free disk space "
                      "and retry, or " + _data_help(name, field)) from None
  if not is_prepared(name, root):
    raise not_prepared_error(name, root, " even after TFDS download_and_prepare returned; "
                             f"delete {os.path.join(root, name)!r} and retry", field)
  print(f"prepared {name} into {root} in {time.monotonic() - start:.0f} s", file=sys.stderr,
        flush=True)
  return root
