"""Shared fixtures: paths to the shared data and weights, and the real-data skip marker."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PRETRAINED = os.path.join(SHARED, "pretrained")


def has_real_cifar10() -> bool:
  """True when $TFDS_DATA_DIR holds the prepared CIFAR-10."""
  root = os.environ.get("TFDS_DATA_DIR", "")
  return bool(root) and os.path.isdir(os.path.join(root, "cifar10"))


requires_cifar10 = pytest.mark.skipif(
    not has_real_cifar10(), reason="TFDS_DATA_DIR does not hold cifar10")


def weights_folder() -> str:
  """The pretrained CIFAR ResNets: ``$JAXCOMPRESS_WEIGHTS_DIR``, else ``../shared/pretrained``."""
  return os.environ.get("JAXCOMPRESS_WEIGHTS_DIR") or PRETRAINED


def pretrained(name: str) -> str:
  """Path of a pretrained ``{name}_cifar10.npz``; skips the test when it is absent."""
  path = os.path.join(weights_folder(), f"{name}_cifar10.npz")
  if not os.path.isfile(path):
    pytest.skip(f"{path} not present")
  return path
