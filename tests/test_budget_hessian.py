"""The Hessian-trace proxy: Hutchinson's estimate against the closed form of a softmax layer."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcompress import budget
from jaxcompress.budget import Option
from jaxcompress.data import Batch


class _Softmax(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc")(x.reshape(len(x), -1))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  batches = [Batch(rng.normal(size=(10, 4)).astype(np.float32),
                   rng.integers(0, 3, 10).astype(np.int32), np.ones(10, np.float32))
             for _ in range(2)]
  batches[1] = batches[1]._replace(weight=np.array([1.0] * 4 + [0.0] * 6, np.float32))
  model = _Softmax()
  return model, model.init(jax.random.key(1), batches[0].image), batches


def test_trace_matches_the_closed_form(setup):
  """For ``z = W^T x + b``, the cross-entropy's Hessian in ``W`` is ``x x^T (x) (diag p - p p^T)``:
  its trace per example is ``|x|^2 (1 - |p|^2)``."""
  model, variables, batches = setup
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  want = []
  for batch in batches:
    x = batch.image.astype(np.float64)
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_example = np.sum(x * x, 1) * (1 - np.sum(p * p, 1))
    want.append(np.sum(per_example * batch.weight) / np.sum(batch.weight))
  n0, n1 = (float(np.sum(bt.weight)) for bt in batches)
  want = (n0 * want[0] + n1 * want[1]) / (n0 + n1) / w.size
  got = budget.hessian_traces(model, variables, batches, ["fc"], samples=400)["fc"]
  assert got == pytest.approx(want, rel=0.1)


def test_proxy_damage_of_pruning_by_hand(setup):
  model, variables, batches = setup
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  dmg = budget.proxy_damage(model, variables, batches[0].image, {"fc": 2.0},
                            {"fc": [Option(0.5, 0, 8), Option(0.0, 8, 8)]})["fc"]
  pruned = np.sort(np.abs(w).ravel())[:6]  # the 6 of 12 smallest magnitudes
  assert dmg[0] == pytest.approx(0.5 * 2.0 * np.sum(pruned ** 2), rel=1e-5)
  scale = np.abs(w).max(0) / 127  # 8-bit symmetric per channel: error at most half a step
  assert 0 < dmg[1] <= 0.5 * 2.0 * w.shape[0] * np.sum((scale / 2) ** 2)


def test_spearman_by_hand():
  assert budget.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert budget.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ranks (0,1,2,3) and (1,0,3,2): d^2 = 4, rho = 1 - 6*4/(4*15) = 0.6
  assert budget.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
