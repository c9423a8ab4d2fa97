"""Gap codes counted in jit against a hand count and the export's NumPy code; the cap's bisection
against brute force."""

import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
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


@pytest.mark.parametrize("gap_bits", [0, 1, 9, 40, 2.5, True])
def test_a_code_width_the_export_never_writes_is_one_line(gap_bits):
  # 8 kept entries need at least 8 codes, but width 0 counted 0 (a division by 2^0 - 1 = 0);
  # 40 overflowed int32 (a traceback) and 2.5 could not shift (another).
  with pytest.raises(ConfigError, match=r"^gap_bits must be an integer in \[2, 8\] \(the "
                                        r"export's gap code widths\), got "):
    positions.gap_code_count(np.ones(8, bool), gap_bits)
  with pytest.raises(ConfigError, match=r"^gap_bits must be an integer in \[2, 8\]"):
    positions.cap_codes(np.ones(8, bool), np.ones(8), gap_bits, 4)


def test_a_negative_cap_is_one_line():
  # No pattern has fewer than 0 codes: the cap pruned every entry, silently.
  with pytest.raises(ConfigError, match=r"^max_codes must be >= 0 \(no pattern needs fewer "
                                        r"codes\), got -1$"):
    positions.cap_codes(np.ones(8, bool), np.ones(8), 2, -1)


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
