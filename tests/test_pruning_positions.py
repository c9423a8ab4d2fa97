"""Gap codes counted in jit against a hand count and the export's NumPy code; the cap's bisection
against brute force."""

import jax
import numpy as np
import pytest

from jaxcompress.export import sparse
from jaxcompress.pruning import positions

count = jax.jit(positions.gap_code_count, static_argnums=1)
cap = jax.jit(positions.cap_codes, static_argnums=2)


def _numpy_codes(keep, w):
  return sparse.num_gap_codes(sparse.gaps_of(np.asarray(keep).reshape(-1)), w)


def test_count_by_hand():
  # w = 2: a code says 0, 1 or 2 zeros; 3 is a filler for 3 zeros.
  keep = np.zeros(12, bool)
  keep[[1, 9, 10]] = True  # gaps 1, 7 (= 3 + 3 + 1: two fillers), 0; trailing zeros are free
  assert int(count(keep, 2)) == 3 + 2
  assert int(count(keep, 3)) == 3 + 1  # 7 zeros: one filler of 7, then the code 0
  assert int(count(np.zeros((2, 3), bool), 2)) == 0


@pytest.mark.parametrize("w", [2, 3, 5, 8])
def test_count_matches_the_export(w):
  rng = np.random.default_rng(w)
  for density in (0.02, 0.2, 0.7):
    keep = rng.uniform(size=(3, 3, 5, 7)) < density
    assert int(count(keep, w)) == _numpy_codes(keep, w)


def test_cap_is_the_least_pruning_that_fits():
  rng = np.random.default_rng(0)
  for _ in range(30):
    keep = rng.uniform(size=(6, 10)) < 0.3
    scores = rng.normal(size=(6, 10))
    limit = int(rng.integers(0, _numpy_codes(keep, 3) + 2))
    got = np.asarray(cap(keep, scores, 3, limit))
    rank = np.argsort(np.argsort(scores.ravel(), kind="stable"), kind="stable").reshape(6, 10)
    for k in range(keep.size + 1):  # brute force: prune the lowest-scored entries one by one
      want = keep & (rank >= k)
      if _numpy_codes(want, 3) <= limit:
        break
    np.testing.assert_array_equal(got, want)
  assert cap._cache_size() == 1  # the cap is traced: one program for every limit


def test_a_pattern_within_its_cap_is_kept_whole():
  rng = np.random.default_rng(1)
  keep = rng.uniform(size=(40,)) < 0.1
  np.testing.assert_array_equal(cap(keep, rng.normal(size=40), 2, _numpy_codes(keep, 2)), keep)
