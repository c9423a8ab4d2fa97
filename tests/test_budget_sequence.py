"""The sensitivity scan on sequence models (a transformer, an LSTM, an NNX model): logits
``[B, T, V]`` with a weight per token, padded positions left out, against NumPy."""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcompress import budget, text
from jaxcompress.budget import Option
from jaxcompress.data import Batch
from jaxcompress.models.gpt import CharGPT
from jaxcompress.models.functional import variables_of
from jaxcompress.models.lstm import CharLSTM
from jaxcompress.rules import tree_get
from jaxcompress.selection import trace_layers

V, T = 13, 8


def _magnitude_keep(w, sparsity):
  cut = np.sort(np.abs(w).ravel())[round(sparsity * w.size) - 1]
  return np.abs(w) > cut


def _numpy_ce_and_accuracy(model, variables, batches, keeps):
  """Mean cross-entropy and accuracy over the weighted tokens (float64), kernels masked."""
  params = copy.deepcopy(jax.tree_util.tree_map(np.asarray, variables["params"]))
  for path, keep in keeps.items():
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
      node = node[key]
    node[leaf] = np.where(keep, node[leaf], 0)
  total = correct = weight = 0.0
  for b in batches:
    z = np.asarray(model.apply({**variables, "params": params}, b.image), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, b.label[..., None], -1)[..., 0]
    total += float(np.sum(ce * b.weight))
    correct += float(np.sum((z.argmax(-1) == b.label) * b.weight))
    weight += float(np.sum(b.weight))
  return total / weight, correct / weight


@pytest.mark.parametrize("model,pruned", [
    (CharGPT(vocab_size=V, context=T, width=16, depth=1, heads=2), ("block0/fc", "head")),
    (CharLSTM(vocab_size=V, width=16, layers=1), ("lstm0/cell/recurrent", "head")),
], ids=["gpt", "lstm"])
def test_scan_and_evaluator_weigh_tokens_like_numpy(model, pruned):
  ids = np.random.default_rng(0).integers(0, V, 150).astype(np.int32)
  # 149 predicted characters: 19 windows of 8 in 3 batches of 8, the last one mostly padding.
  batches = list(text.eval_batches(ids, batch_size=8, context=T))
  assert len(batches) == 3 and 0 < batches[-1].weight.sum() < batches[-1].weight.size
  variables = model.init(jax.random.key(1), batches[0].image)
  calibration = [b.image for b in batches]
  one, two = pruned
  sens = budget.scan(model, variables, batches,
                     {one: [Option(0.5, 0, 8), Option(0.0, 8, 8)], two: [Option(0.7, 0, 8)]},
                     calibration=calibration, damage="ce")
  assert sens.compiles == 1
  loss, accuracy = _numpy_ce_and_accuracy(model, variables, batches, {})
  assert sens.base_loss == pytest.approx(loss, rel=1e-5)
  assert sens.base_accuracy == pytest.approx(accuracy, abs=1e-9)
  weights = {l.path: l.weight for l in trace_layers(model, variables, batches[0].image).layers}
  kernel = lambda path: np.asarray(tree_get(variables["params"], weights[path]))  # noqa: E731
  keep = {one: _magnitude_keep(kernel(one), 0.5)}
  want, _ = _numpy_ce_and_accuracy(model, variables, batches, {weights[one]: keep[one]})
  assert sens.measured[(one, 0.5, 0, 0)][0] == pytest.approx(want, rel=1e-5)
  # A whole plan, both layers pruned at once.
  keep[two] = _magnitude_keep(kernel(two), 0.7)
  evaluate = budget.Evaluator(model, variables, batches, calibration=calibration)
  got_loss, got_accuracy = evaluate(keep, {}, {})
  want_loss, want_accuracy = _numpy_ce_and_accuracy(
      model, variables, batches, {weights[p]: k for p, k in keep.items()})
  assert got_loss == pytest.approx(want_loss, rel=1e-5)
  assert got_accuracy == pytest.approx(want_accuracy, abs=1e-9)


class _NnxTokenMLP(nnx.Module):
  """An NNX model over token ids: embedding, a hidden layer and a head at every position."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, 16, rngs=rngs)
    self.fc = nnx.Linear(16, 32, rngs=rngs)
    self.head = nnx.Linear(32, V, rngs=rngs)

  def __call__(self, ids):
    return self.head(nnx.relu(self.fc(self.embed(ids))))


def test_nnx_sequence_model_against_a_numpy_forward():
  model = _NnxTokenMLP(nnx.Rngs(0))
  variables = variables_of(model)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  rng = np.random.default_rng(0)
  batches = [Batch(rng.integers(0, V, (4, T)).astype(np.int32),
                   rng.integers(0, V, (4, T)).astype(np.int32),
                   (rng.random((4, T)) < 0.7).astype(np.float32)) for _ in range(2)]
  keep = _magnitude_keep(p["fc"]["kernel"], 0.6)

  def numpy_loss(fc_kernel):
    total = weight = 0.0
    for b in batches:
      h = np.maximum(p["embed"]["embedding"][b.image] @ fc_kernel + p["fc"]["bias"], 0)
      z = h @ p["head"]["kernel"] + p["head"]["bias"]
      z = z - z.max(-1, keepdims=True)
      ce = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, b.label[..., None], -1)[..., 0]
      total += float(np.sum(ce * b.weight))
      weight += float(np.sum(b.weight))
    return total / weight

  sens = budget.scan(model, variables, batches, {"fc": [Option(0.6, 0, 8)]},
                     calibration=[b.image for b in batches], damage="ce")
  assert sens.compiles == 1
  assert sens.base_loss == pytest.approx(numpy_loss(p["fc"]["kernel"]), rel=1e-5)
  assert sens.measured[("fc", 0.6, 0, 0)][0] == pytest.approx(
      numpy_loss(np.where(keep, p["fc"]["kernel"], 0)), rel=1e-5)
