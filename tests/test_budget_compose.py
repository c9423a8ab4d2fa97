"""Per-layer plans reach the composed train step: PruneSpec.layer_sparsity, QuantSpec.layer_bits."""

import numpy as np
import optax
import pytest

from jaxcompress import compose, pruning
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.export import sparse
from jaxcompress.models import create_model

SHAPE = (6, 6, 3)


def _batch(seed):
  rng = np.random.default_rng(seed)
  return Batch(rng.normal(size=(8, *SHAPE)).astype(np.float32),
               rng.integers(0, 4, 8).astype(np.int32), np.ones(8, np.float32))


def test_per_layer_sparsity_and_bits_in_one_jitted_step():
  model, variables = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  x = _batch(0).image
  targets = {"fc1/kernel": 0.5, "fc2/kernel": 0.9, "fc3/kernel": 0.25}
  prune = compose.PruneSpec(sparsity=0.9, schedule="gradual", end=0.5, update_every=2,
                            rules=tuple((w, True) for w in targets) + ((".*", False),),
                            layer_sparsity=tuple(targets.items()))
  quant = compose.QuantSpec(weight_bits=4, act_bits=8,
                            layer_bits=(("fc1", 3, 8), ("fc2", 2, 0), ("fc3", 8, 4)))
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.05), total_steps=10,
                       prune=prune, quant=quant)
  state = comp.init_state(variables, x, calibration=[x])
  step = comp.make_train_step()
  for i in range(10):
    state, _ = step(state, _batch(i))
  assert step._cache_size() == 1
  for path, target in targets.items():
    layer, _ = path.split("/")
    kernel = np.asarray(state.params["model"][layer]["kernel"])
    assert np.sum(kernel == 0) == round(target * kernel.size)  # the count torch would prune
  bits = {l.path: (l.config.weight_bits, l.config.act_bits)
          for l in state.model_state["quant"].layers}
  assert bits == {"fc1": (3, 8), "fc2": (2, None), "fc3": (8, 4)}
  # The masks the job's "before fine-tuning" evaluation computes follow the same targets.
  masks = pruning.compute_masks(state.params, prune.sparsity, structure=prune.masker(),
                                rules=comp.prune_rules)
  kept = np.asarray(masks["model"]["fc2"]["kernel"])
  assert kept.size - kept.sum() == round(0.9 * kept.size)


def test_unmatched_selected_weights_reach_the_spec_sparsity():
  masker = compose.PruneSpec(sparsity=0.5, layer_sparsity=(("a", 0.25),)).masker()
  scores = [np.arange(8.0), np.arange(8.0)]
  keep = masker(["model/a", "model/b"], scores, 0.5)
  assert [int(np.sum(~np.asarray(k))) for k in keep] == [2, 4]
  half = masker(["model/a", "model/b"], scores, 0.25)  # half-way through the ramp
  assert [int(np.sum(~np.asarray(k))) for k in half] == [1, 2]


def _codes(keep, w):
  return sparse.num_gap_codes(sparse.gaps_of(np.asarray(keep).reshape(-1)), w)


def test_gap_code_caps_act_from_the_final_sparsity_on():
  masker = compose.PruneSpec(sparsity=0.8, layer_gap_codes=(("a", 3, 10),)).masker()
  scores = [np.random.default_rng(0).normal(size=(8, 16)) ** 2] * 2
  ramp = masker(["model/a", "model/b"], scores, 0.4)  # mid-ramp: the schedule's counts only
  assert [int(np.sum(~np.asarray(k))) for k in ramp] == [round(0.4 * 128)] * 2
  a, b = (np.asarray(k) for k in masker(["model/a", "model/b"], scores, 0.8))
  assert _codes(b, 3) > 10 and np.sum(~b) == round(0.8 * 128)  # uncapped
  assert _codes(a, 3) <= 10 < _codes(a | b, 3) and not np.any(a & ~b)  # a subset of b that fits


def test_capped_gradual_training_ends_within_the_cap():
  model, variables = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  x = _batch(0).image
  w = np.asarray(variables["params"]["fc2"]["kernel"])
  sized = np.abs(w) > np.quantile(np.abs(w), 0.9)
  limit = int(0.9 * _codes(sized, 4))  # below what the sized pattern needs: the cap must bind
  prune = compose.PruneSpec(sparsity=0.9, schedule="gradual", end=0.5, update_every=2,
                            rules=(("fc2/kernel", True), (".*", False)),
                            layer_gap_codes=(("fc2/kernel", 4, limit),))
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.5), total_steps=12,
                       prune=prune)
  state = comp.init_state(variables, x)
  step = comp.make_train_step()
  for i in range(12):
    state, _ = step(state, _batch(i))
  kept = np.asarray(state.params["model"]["fc2"]["kernel"]) != 0
  assert _codes(kept, 4) <= limit and np.sum(~kept) > round(0.9 * w.size)
  assert step._cache_size() == 1


@pytest.mark.parametrize("kwargs", [
    dict(layer_gap_codes=(("a", 3),)), dict(layer_gap_codes=(("a", 9, 10),)),
    dict(layer_gap_codes=(("a", 3, -1),)), dict(layer_gap_codes=(("a", 3, 1.5),)),
    dict(structure="channel", layer_gap_codes=(("a", 3, 10),))])
def test_bad_gap_code_caps_are_one_line(kwargs):
  with pytest.raises(ConfigError, match="prune.layer_gap_codes"):
    compose.PruneSpec(sparsity=0.5, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(sparsity=0.5, layer_sparsity=(("a", 1.0),)),
    dict(sparsity=0.5, layer_sparsity=(("a",),)),
    dict(sparsity=0.0, layer_sparsity=(("a", 0.3),)),
    dict(sparsity=0.5, scope="global", layer_sparsity=(("a", 0.3),)),
    dict(sparsity=0.5, structure="nm", layer_sparsity=(("a", 0.3),))])
def test_bad_layer_sparsity_is_one_line(kwargs):
  with pytest.raises(ConfigError, match="prune.layer_sparsity"):
    compose.PruneSpec(**kwargs)


def test_a_layer_sparsity_regex_that_matches_no_parameter_is_one_line():
  model, variables = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  prune = compose.PruneSpec(sparsity=0.5, layer_sparsity=(("fc2/kernel", 0.3), ("fc9/.*", 0.5)))
  with pytest.raises(ConfigError, match=r"prune.layer_sparsity\[1\] must be a regex that fully "
                     r"matches a parameter path \(.*fc1/kernel.*\), got 'fc9/\.\*'"):
    compose.build(model, variables, _batch(0).image, optimizer=optax.sgd(0.1), total_steps=4,
                  prune=prune)


@pytest.mark.parametrize("kwargs", [
    dict(layer_bits=(("a", 9, 8),)), dict(layer_bits=(("a", 4),)),
    dict(layer_bits=(("a", 4, 8),), method="kmeans", weight_bits=4)])
def test_bad_layer_bits_is_one_line(kwargs):
  with pytest.raises(ConfigError, match="quant.layer_bits"):
    compose.QuantSpec(**kwargs)
