"""The input pipeline on mock TFDS data: coverage, determinism, augmentation, normalisation."""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import requires_cifar10
from jaxcompress import data, datasets
from jaxcompress.errors import ConfigError

MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_load_split_decodes_every_supported_dataset(name):
  with tfds.testing.mock_data(num_examples=12):
    x, y = data.load_split(name, "train", progress=False)
  spec = datasets.dataset_spec(name)
  assert x.shape == (12, *spec.image_shape) and x.dtype == np.uint8
  assert y.shape == (12,) and y.dtype == np.int32
  assert np.all((0 <= y) & (y < spec.num_classes))


def test_eval_batches_cover_every_example_exactly_once():
  x = np.arange(23, dtype=np.uint8)[:, None, None, None].repeat(3, -1)
  y = np.arange(23, dtype=np.int32)
  seen, weights = [], []
  for b in data.eval_batches((x, y), 5, mean=(0, 0, 0), std=(1 / 255,) * 3):
    assert b.image.shape == (5, 1, 1, 3)
    seen.extend(b.label[b.weight > 0].tolist())
    weights.append(b.weight)
  assert seen == list(range(23))
  assert np.concatenate(weights).sum() == 23 and len(weights) == 5


def test_train_batches_are_deterministic_per_seed_and_epoch():
  x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
  y = np.arange(40, dtype=np.int32)
  run = lambda seed, epoch, start=0: list(data.train_batches(
      (x, y), 8, seed=seed, epoch=epoch, mean=MEAN, std=STD, start=start))
  a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
  assert len(a) == 5
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u.image, v.image)
  assert sorted(np.concatenate([u.label for u in a]).tolist()) == list(range(40))
  assert not np.array_equal(a[0].label, c[0].label)
  assert not np.array_equal(a[0].label, d[0].label)
  resumed = run(0, 0, start=3)  # a run resumed at step 3 sees the same batches 3 and 4
  for u, v in zip(a[3:], resumed):
    np.testing.assert_array_equal(u.image, v.image)


def test_train_batches_drop_the_remainder():
  x = np.zeros((21, 4, 4, 3), np.uint8)
  batches = list(data.train_batches((x, np.zeros(21, np.int32)), 8, seed=0, epoch=0,
                                    mean=MEAN, std=STD))
  assert len(batches) == 2 and all(b.image.shape[0] == 8 for b in batches)


def test_rows_of_each_batch_put_together_are_the_whole_batch():
  """What each of 2 or 4 processes builds: its rows of every global batch, crop and flip
  included; together exactly the one-process batches."""
  x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
  y = np.arange(40, dtype=np.int32)
  whole = list(data.train_batches((x, y), 8, seed=5, epoch=1, mean=MEAN, std=STD))
  evals = list(data.eval_batches((x[:19], y[:19]), 8, mean=MEAN, std=STD))
  for parts in (2, 4):
    rows = [(p * 8 // parts, (p + 1) * 8 // parts) for p in range(parts)]
    shards = [list(data.train_batches((x, y), 8, seed=5, epoch=1, mean=MEAN, std=STD, rows=r))
              for r in rows]
    for i, batch in enumerate(whole):
      for field in ("image", "label", "weight"):
        np.testing.assert_array_equal(
            np.concatenate([getattr(s[i], field) for s in shards]), getattr(batch, field))
    eval_shards = [list(data.eval_batches((x[:19], y[:19]), 8, mean=MEAN, std=STD, rows=r))
                   for r in rows]
    assert all(len(s) == len(evals) == 3 for s in eval_shards)  # padding-only parts count too
    for i, batch in enumerate(evals):
      for field in ("image", "label", "weight"):
        np.testing.assert_array_equal(
            np.concatenate([getattr(s[i], field) for s in eval_shards]), getattr(batch, field))
  assert np.concatenate([b.weight for b in evals]).sum() == 19


def test_open_split_decodes_only_the_examples_read():
  with tfds.testing.mock_data(num_examples=12):
    whole = data.load_split("mnist", "train", progress=False)
    split = data.open_split("mnist", "train")
    assert len(split) == 12 and not split.decoded.done.any()
    x, y = split.read(np.array([7, 2, 7]))
    np.testing.assert_array_equal(x, whole[0][[7, 2, 7]])
    np.testing.assert_array_equal(y, whole[1][[7, 2, 7]])
    assert np.flatnonzero(split.decoded.done).tolist() == [2, 7]
    view = split.take(4, 10)  # shares what is decoded; index 0 is example 4
    assert len(view) == 6
    np.testing.assert_array_equal(view.read(np.array([0, 3]))[0], whole[0][[4, 7]])
    assert np.flatnonzero(split.decoded.done).tolist() == [2, 4, 7]
    with pytest.raises(IndexError):
      view.read(np.array([6]))


def _crops(img, pad):
  """All pad-crops of the zero-padded image, and their mirror images (the oracle)."""
  h, w, _ = img.shape
  p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
  out = []
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = p[dy:dy + h, dx:dx + w]
      out += [crop, crop[:, ::-1]]
  return out


def test_augmentation_is_a_padded_crop_or_its_flip():
  rng = np.random.default_rng(0)
  x = rng.integers(1, 255, (64, 6, 6, 3), dtype=np.uint8)
  out = data.augment(x, np.random.default_rng(1), pad=2)
  assert out.shape == x.shape and out.dtype == np.uint8
  flipped = shifted = 0
  for src, aug in zip(x, out):
    candidates = _crops(src, 2)
    match = [i for i, c in enumerate(candidates) if np.array_equal(c, aug)]
    assert match, "augmented image is not a crop of the padded original"
    flipped += match[0] % 2
    shifted += match[0] // 2 != 2 * 2 + 2  # not the centre crop
  assert 10 < flipped < 54 and shifted > 40  # both kinds of augmentation actually happen


def test_normalize_matches_hand_computation():
  x = np.array([[[[0, 128, 255]]]], np.uint8)
  out = data.normalize(x, MEAN, STD)
  expected = [(0 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.5, (255 / 255 - 0.125) / 0.25]
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  assert out.dtype == np.float32


def test_missing_dataset_says_where_it_looked(tmp_path):
  with pytest.raises(ConfigError, match=f"not prepared under '{tmp_path}'.*TFDS_DATA_DIR"):
    data.load_split("cifar10", "test", data_dir=str(tmp_path), progress=False,
                    prepare_missing=False)


def test_unknown_dataset_name():
  with pytest.raises(ConfigError, match="data.name must be one of cifar10, cifar100, "
                                        "fashion_mnist, mnist, got 'imagenet'"):
    data.load_split("imagenet", "test")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_label_names_are_the_tfds_names(name):
  # These two builders declare their names in code: TFDS itself is the oracle.
  assert list(datasets.dataset_spec(name).label_names) == tfds.builder(name).info.features[
      "label"].names


def test_label_names_count_and_order():
  for name, spec in datasets.DATASETS.items():
    assert len(spec.label_names) == len(set(spec.label_names)) == spec.num_classes, name
  assert datasets.dataset_spec("cifar10").label_names[:3] == ("airplane", "automobile", "bird")
  assert datasets.dataset_spec("cifar10").label_names[-1] == "truck"
  names = datasets.dataset_spec("cifar100").label_names  # fine_label_names.txt is alphabetical
  assert list(names) == sorted(names) and names[0] == "apple" and names[-1] == "worm"


@requires_cifar10
def test_cifar10_label_names_match_the_prepared_dataset():
  info = tfds.builder("cifar10", data_dir=os.environ["TFDS_DATA_DIR"]).info
  assert list(datasets.dataset_spec("cifar10").label_names) == info.features["label"].names


@requires_cifar10
def test_held_out_examples_of_a_sliced_split_are_a_spec_tfds_reads():
  folder = os.environ["TFDS_DATA_DIR"]
  assert data.last_examples("cifar10", "train[:2000]", 256, data_dir=folder) == "train[1744:2000]"
  assert data.first_examples("cifar10", "train[:2000]", 1744, data_dir=folder) == "train[0:1744]"
  assert data.last_examples("cifar10", "train[:10]+test[:10]", 15,
                            data_dir=folder) == "train[5:10]+test[0:10]"
  ids = tfds.data_source("cifar10", split="train[1744:2000]", data_dir=folder)
  assert len(ids) == 256


@pytest.mark.parametrize("name, flips", [("mnist", False), ("fashion_mnist", False),
                                         ("cifar10", True)])
def test_training_batches_flip_only_images_whose_mirror_keeps_their_label(name, flips):
  """A mirrored digit or garment is another symbol: the digit datasets are cropped, never
  flipped; the CIFARs flip exactly the images the generator picked before flips had a setting."""
  from jaxcompress import train as train_lib
  spec = data.DataSpec(name=name, batch_size=16, mean=(0.0,), std=(1 / 255,))  # pixels, as float
  assert spec.flip is flips
  with tfds.testing.mock_data(num_examples=48):
    split = train_lib.load_data(spec)["train"]
    steps, _, batches = train_lib._batch_source(split, spec, 7, None)  # what fit trains on
    out = [np.rint(b.image).astype(np.uint8) for b in batches(2, 0)]
    order = data.train_order(len(split), seed=7, epoch=2)
    sources = [split.read(order[i * 16:(i + 1) * 16])[0] for i in range(steps)]
  assert steps == 3
  flipped, picked = [], []
  for step, (source, images) in enumerate(zip(sources, out)):
    for src, aug in zip(source, images):
      match = [i for i, c in enumerate(_crops(src, 4)) if np.array_equal(c, aug)]
      assert match, "a training image is not a crop (or flipped crop) of its example"
      flipped.append(match[0] % 2)
    # The stream as drawn before: 16 row offsets, 16 column offsets, then 16 uniforms (< 0.5 flips).
    rng = np.random.default_rng([7, 2, step])
    rng.integers(0, 9, 16), rng.integers(0, 9, 16)
    picked += (rng.random(16) < 0.5).astype(int).tolist()
  assert sum(flipped) == (sum(picked) if flips else 0) and 0 < sum(picked) < 48
  assert flipped == (picked if flips else [0] * 48)


def test_data_spec_is_validated_when_built_and_read_from_a_section():
  from configs import common
  spec = data.DataSpec.from_mapping(common.data_config("cifar10"))
  assert spec.name == "cifar10" and spec.num_classes == 10 and spec.batch_size == 128
  assert spec.mean == common.IMAGENET_MEAN and isinstance(spec.mean, tuple)
  # MNIST's one channel: three means would broadcast every image to three channels.
  with pytest.raises(ConfigError, match=r"^data.mean must be one value per channel of the "
                     r"1-channel images, or one for all, got \(0.485, 0.456, 0.406\)$"):
    data.DataSpec(name="mnist", mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
  with pytest.raises(ConfigError, match=r"^data.std must be finite values > 0"):
    data.DataSpec(std=(0.2, 0.0, 0.3))
  with pytest.raises(ConfigError, match=r"data.eval_batch_size must be an integer > 0, got 0"):
    data.DataSpec(eval_batch_size=0)
  with pytest.raises(ConfigError, match=r"data.batch_size must be an integer > 0, got 12.5"):
    data.DataSpec(batch_size=12.5)
  with pytest.raises(ConfigError, match=r"data.val_examples must be an integer >= 0"):
    data.DataSpec(val_examples=-5)
  with pytest.raises(ConfigError, match=r"data.val_examples must be an integer >= 0 .*got 0.1"):
    data.DataSpec(val_examples=0.1)
  with pytest.raises(ConfigError, match=r"^data.mean must be numbers, one per channel"):
    data.DataSpec(mean=("a", "b", "c"))
  # a mean in 0-255 pixel units would shift every input far off what the model was trained on
  for mean in ((125.3, 123.0, 113.9), (-0.5,), (float("nan"),)):
    with pytest.raises(ConfigError, match=r"^data.mean must be values in \[0, 1\] \(pixel / 255 "
                       rf"units\), got \({re.escape(str(mean[0]))},.*; a mean of 0-255 pixels"):
      data.DataSpec(mean=mean)
  with pytest.raises(ConfigError, match=r"data.name must be one of .*got 'svhn'"):
    data.DataSpec(name="svhn")
  with pytest.raises(ConfigError, match=r"^data.flip must be True, False or None \(the dataset's "
                     r"choice\), got 'no'$"):
    data.DataSpec(flip="no")


def test_a_section_without_mean_or_std_normalises_with_the_dataset_s_own():
  from configs import common
  section = common.data_config()
  assert section.mean is None and section.std is None  # the user gave none
  # The CIFARs: the ImageNet statistics the pretrained CIFAR ResNets were trained with (torchvision
  # docs), exactly the values the jobs used before None meant "the dataset's".
  imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  # MNIST: mean 0.1307, std 0.3081 of pixel / 255 (PyTorch's MNIST example); Fashion-MNIST:
  # 0.2860, 0.3530 (its training split's published statistics).
  published = {"cifar10": imagenet, "cifar100": imagenet, "mnist": ((0.1307,), (0.3081,)),
               "fashion_mnist": ((0.2860,), (0.3530,))}
  for name, (mean, std) in published.items():
    section.name = name
    spec = data.DataSpec.from_mapping(section)
    assert (spec.mean, spec.std) == (mean, std), name
    assert common.normalization(name) == (mean, std), name
  spec = data.DataSpec(name="mnist", mean=None, std=None)
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1), np.uint8)
  want = (images.astype(np.float64) / 255 - 0.1307) / 0.3081  # by hand, in float64
  np.testing.assert_allclose(data.normalize(images, spec.mean, spec.std), want, atol=1e-5)
  section.name, section.mean, section.std = "mnist", (0.5,), (0.25,)  # a given pair is kept
  assert data.DataSpec.from_mapping(section).mean == (0.5,)
  assert data.DataSpec.from_mapping(section).std == (0.25,)


def test_bad_batches_are_one_line():
  images = np.zeros((6, 4, 4, 3), np.uint8)
  labels = np.zeros(6, np.int32)
  norm = dict(mean=(0.5,), std=(0.25,))
  with pytest.raises(ConfigError, match=r"^batch_size must be an integer >= 1, got 0$"):
    next(data.train_batches((images, labels), 0, seed=0, epoch=0, **norm))
  with pytest.raises(ConfigError, match=r"^split must be \(images, labels\) with one label per "
                                        r"image, got '6 images and 5 labels'$"):
    next(data.eval_batches((images, labels[:5]), 2, **norm))
  with pytest.raises(ConfigError, match=r"^split images must be uint8 pixels"):
    next(data.eval_batches((images.astype(np.float32), labels), 2, **norm))
  with pytest.raises(ConfigError, match=r"^data.std must be finite values > 0"):
    next(data.eval_batches((images, labels), 2, mean=(0.5,), std=(0.0,)))
  grey = np.zeros((6, 4, 4), np.uint8)  # no channel axis: train crops, eval passes [B, H, W] on
  for batches in (data.train_batches((grey, labels), 2, seed=0, epoch=0, **norm),
                  data.eval_batches((grey, labels), 2, **norm)):
    with pytest.raises(ConfigError, match=r"^split images must be \[N, H, W, C\] \(grey images "
                                          r"too have a channel axis: images\[\.\.\., None\]\), "
                                          r"got 'shape \(6, 4, 4\)'$"):
      next(batches)
  assert next(data.eval_batches((grey[..., None], labels), 2, **norm)).image.shape == (2, 4, 4, 1)
  with pytest.raises(ConfigError, match=r"^data.mean must be one value per channel of the "
                                        r"3-channel images, or one for all, got \(0.5, 0.5\)$"):
    next(data.eval_batches((images, labels), 2, mean=(0.5, 0.5), std=(0.25,)))


@requires_cifar10
@pytest.mark.parametrize("split", ["test[6000:5000]", "test[5:5]", "train[:0]"])
def test_a_slice_of_no_examples_is_one_line(split):
  message = (rf"^data.eval_split: cannot read split '{re.escape(split)}' of 'cifar10' from '.*' "
             r"\(it selects no examples\)$")
  with pytest.raises(ConfigError, match=message):
    data.open_split("cifar10", split, field="data.eval_split")


@requires_cifar10
@pytest.mark.parametrize("a,b,shared", [
    ("test[:5000]", "test", 5000), ("test[:200]", "test[0:200]", 200),
    ("test[:5000]", "test[5000:]", 0), ("test[:50%]", "test[40%:60%]", 1000),
    ("train[:10]", "test[:10]", 0), ("train+test[:10]", "test[5:]", 5)])
def test_shared_examples_of_two_splits_by_hand(a, b, shared):
  assert data.shared_examples("cifar10", a, b) == shared  # CIFAR-10 test: 10,000 examples


@requires_cifar10
def test_eval_split_against_the_training_and_held_out_examples_by_hand():
  class Data:  # CIFAR-10: train 50,000 examples, test 10,000
    name, data_dir, val_examples = "cifar10", "", 100
    train_split, eval_split = "train[:1000]", "train[1000:]"
  data.check_splits(Data, 900)  # trained on [0, 900), held out [900, 1000): disjoint
  for train, test in (("train[:1000]", "train[950:2000]"), ("train[:80%]", "train[39950:]"),
                      ("train", "train[49950:]"), ("train", "train[-50:]")):
    Data.train_split, Data.eval_split = train, test
    with pytest.raises(ConfigError, match=r"overlaps data.eval_split=.* \(train\[\d+:\d+\]: "
                                          r"50 examples in common\)"):
      data.check_splits(Data, 900)  # the 900 trained on are far from the end
  for train, test, trained, shared in (("train", "train[:49900]", 49900, 49900),
                                       ("train", "train[500:1500]", 1000, 500),
                                       ("train[10:]", "train[:15]", 1000, 5),
                                       ("train[:10]+train[20:30]", "train[25:]", 20, 5)):
    Data.train_split, Data.eval_split = train, test
    with pytest.raises(ConfigError, match=rf"^data.eval_split='{re.escape(test)}' shares "
                                          rf"{shared:,} examples with the {trained:,} examples "
                                          "trained on"):
      data.check_splits(Data, trained)
  for train, test, trained in (("train[:80%]", "test", 100), ("train", "test[:50%]", 100),
                               ("train[:80%]", "train[80%:]", 100),
                               ("train[:90%]", "train[95%:]", 100),
                               ("train", "train[1000:1100]", 1000)):
    Data.train_split, Data.eval_split = train, test
    data.check_splits(Data, trained)  # nothing in common
  Data.train_split, Data.eval_split = "train[:1000]+train[900:1000]", "test"
  with pytest.raises(ConfigError, match=r"^data.train_split='train\[:1000\]\+train\[900:1000\]': "
                                        r"its parts overlap, so the held-out slice "
                                        r"\(train\[900:1000\], the last data.val_examples=100\) "
                                        r"shares 100 examples with the 1,000 trained on"):
    data.check_splits(Data, 1000)  # trained on [0, 1000), held out the second [900, 1000)
  Data.train_split = "train[:1000]+train[2000:2100]"
  data.check_splits(Data, 1000)  # held out [2000, 2100): disjoint parts
