"""Fitting an artifact into a byte budget by zeroing its smallest weights (``export.fit``)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import fit_to_bytes


def _params(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(6, 5)).astype(np.float32)
  a[0, :3] = 0  # already pruned: never counted as zeroed
  return {"dense": {"kernel": a, "bias": rng.normal(size=5).astype(np.float32)},
          "head": {"kernel": rng.normal(size=(5, 3)).astype(np.float32)}}


def _nonzero_writer(per_entry=3, fixed=10):
  """A stand-in artifact: ``fixed + per_entry`` bytes per non-zero entry of every leaf."""
  calls = []

  def write(params):
    calls.append(params)
    n = sum(int(np.count_nonzero(v)) for layer in params.values() for v in layer.values())
    return {"total_bytes": fixed + per_entry * n}
  return write, calls


def test_the_fewest_smallest_entries_are_zeroed_and_the_answer_was_written_last():
  params = _params()
  write, calls = _nonzero_writer()
  nonzero = 27 + 5 + 15  # kernel entries kept (30 - 3), bias, head
  budget = 10 + 3 * (nonzero - 7) + 2  # by hand: 7 entries must go (6 leave 1 byte over)
  out, report, zeroed = fit_to_bytes(write, params, None, budget)
  assert zeroed == 7 and report["total_bytes"] == 10 + 3 * (nonzero - 7) <= budget
  assert calls[-1] is out
  # NumPy oracle: the 7 smallest magnitudes of the non-zero kernel entries (rank >= 2 leaves
  # only: the bias is never zeroed) are the entries that became 0.
  kernels = np.concatenate([params["dense"]["kernel"].ravel(), params["head"]["kernel"].ravel()])
  got = np.concatenate([out["dense"]["kernel"].ravel(), out["head"]["kernel"].ravel()])
  smallest = np.argsort(np.where(kernels != 0, np.abs(kernels), np.inf))[:7]
  np.testing.assert_array_equal(np.flatnonzero((kernels != 0) & (got == 0)), np.sort(smallest))
  np.testing.assert_array_equal(out["dense"]["bias"], params["dense"]["bias"])
  np.testing.assert_array_equal(params["dense"]["kernel"][1:], _params()["dense"]["kernel"][1:])


def test_a_fitting_artifact_is_left_alone_and_rules_limit_what_is_zeroed():
  params = _params()
  write, calls = _nonzero_writer()
  out, report, zeroed = fit_to_bytes(write, params, None, 10 ** 6)
  assert (out, zeroed, len(calls)) == (params, 0, 1)
  # Only the head may be zeroed: 4 of its 15 entries go, the dense kernel keeps every entry.
  budget = 10 + 3 * (47 - 4)
  out, _, zeroed = fit_to_bytes(write, params, [("head/.*", True), (".*", False)], budget)
  assert zeroed == 4 and np.count_nonzero(out["head"]["kernel"]) == 11
  np.testing.assert_array_equal(out["dense"]["kernel"], params["dense"]["kernel"])


def test_without_rules_a_rank_2_bias_is_never_zeroed():
  """``None`` selects as ``select`` does: an attention projection's ``(heads, dim)`` bias stays."""
  params = _params()
  params["head"]["bias"] = np.full((2, 3), 1e-3, np.float32)  # smaller than every kernel entry
  write, _ = _nonzero_writer()
  out, _, zeroed = fit_to_bytes(write, params, None, 10 + 3 * (53 - 6))
  assert zeroed == 6  # the 6 smallest of the 42 kernel entries, none of the bias
  np.testing.assert_array_equal(out["head"]["bias"], params["head"]["bias"])


def test_a_budget_below_the_empty_model_is_one_line_and_leaves_the_untrimmed_artifact():
  write, calls = _nonzero_writer()
  params = _params()
  with pytest.raises(ConfigError, match="with every pruned weight zero") as e:
    fit_to_bytes(write, params, None, 10 + 3 * 4)  # the bias alone takes 10 + 15
  assert "\n" not in str(e.value)
  assert calls[-1] is params  # the folder holds the artifact as given, not an emptied one


@pytest.mark.parametrize("max_bytes", [None, 0, -5, float("nan"), "100"])
def test_a_budget_that_is_not_a_positive_number_is_one_line(max_bytes):
  write, calls = _nonzero_writer()
  with pytest.raises(ConfigError, match=r"^max_bytes must be "):
    fit_to_bytes(write, _params(), None, max_bytes)
  assert not calls  # nothing written


@pytest.mark.parametrize("resolution", [float("nan"), float("inf"), -0.1, "0.01"])
def test_a_resolution_that_is_not_a_finite_fraction_is_one_line(resolution):
  # nan and inf reached int(np.ceil(kept * resolution)): a bare ValueError or OverflowError
  # after the untrimmed artifact was written.
  write, calls = _nonzero_writer()
  with pytest.raises(ConfigError, match=r"^fit_to_bytes resolution must be "):
    fit_to_bytes(write, _params(), None, 10 + 3 * 40, resolution=resolution)
  assert not calls  # nothing written
