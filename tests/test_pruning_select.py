"""Leaf selection: default rules on a CIFAR ResNet, user rules, nnx paths, bad rules."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import select


def resnet_like():
  """The parameter paths and shapes of a CIFAR ResNet (first conv, one block, BN, linear)."""
  conv = lambda i, o: np.zeros((3, 3, i, o), np.float32)
  bn = {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}
  return {"conv1": {"kernel": conv(3, 16)}, "bn1": bn,
          "layer1_0": {"conv1": {"kernel": conv(16, 16)}, "bn1": bn,
                       "conv2": {"kernel": conv(16, 16)}, "bn2": bn},
          "linear": {"kernel": np.zeros((16, 10), np.float32), "bias": np.zeros(10, np.float32)}}


def chosen(sel):
  return {p for p, s in zip(sel.paths, sel.selected) if s}


KERNELS = {"conv1/kernel", "layer1_0/conv1/kernel", "layer1_0/conv2/kernel", "linear/kernel"}


def test_default_rules_take_every_float_weight_whatever_its_name():
  # No name is special: the first and last layers are found from a model's forward, not here.
  assert chosen(select(resnet_like())) == KERNELS


def test_default_rules_on_a_whole_variables_dict():
  sel = select({"params": resnet_like(), "batch_stats": {"bn1": {"mean": np.zeros(16)}}})
  assert chosen(sel) == {f"params/{k}" for k in KERNELS}


def test_default_rules_take_a_leaf_not_named_kernel_and_skip_integers():
  sel = select({"w": np.ones((3, 3), np.float32), "ids": np.ones((3, 3), np.int32)})
  assert chosen(sel) == {"w"}


def test_a_selection_of_nothing_warns():
  with pytest.warns(UserWarning, match="no leaf"):
    select({"b": np.ones(3, np.float32)})


def test_default_rules_need_ndim_above_1():
  sel = select({"odd": {"kernel": np.zeros(4)}, "dense": {"kernel": np.zeros((4, 4))}})
  assert chosen(sel) == {"dense/kernel"}


def test_default_rules_leave_a_bias_or_scale_of_any_rank_dense():
  attention = nnx.MultiHeadAttention(2, 8, qkv_features=8, rngs=nnx.Rngs(0), decode=False)
  sel = select(nnx.state(attention, nnx.Param))
  assert nnx.state(attention, nnx.Param)["query"]["bias"].value.shape == (2, 4)  # (heads, dim)
  assert chosen(sel) == {f"{p}/kernel" for p in ("query", "key", "value", "out")}
  assert chosen(select({"norm": {"scale": np.ones((4, 4))}, "w": np.ones((4, 4))})) == {"w"}


def test_nnx_paths_drop_the_value_attribute():
  sel = select(nnx.state(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Param))
  assert sel.paths == ("bias", "kernel") and chosen(sel) == {"kernel"}


def test_user_rules_first_match_wins_and_unused_are_reported():
  rules = [("layer1_0/conv2/kernel", False), (".*conv.*/kernel", True), ("lienar/kernel", True)]
  with pytest.warns(UserWarning, match="lienar/kernel"):
    sel = select(resnet_like(), rules)
  assert chosen(sel) == {"conv1/kernel", "layer1_0/conv1/kernel"}


def test_default_rules_do_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    select({"Dense_0": {"kernel": np.zeros((2, 2))}})


def test_masks_tree_keeps_structure_and_dtype():
  params = resnet_like()
  sel = select(params)
  keep = [np.zeros(leaf.shape, bool) for leaf in sel.pick(sel.leaves)]
  masks = sel.masks_tree(keep)
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  assert masks["layer1_0"]["conv2"]["kernel"].dtype == np.float32
  assert float(masks["layer1_0"]["conv2"]["kernel"].sum()) == 0.0
  assert float(masks["bn1"]["scale"].min()) == 1.0  # unselected leaves: all ones


@pytest.mark.parametrize("rules, needle", [
    ([("conv(", True)], "prune.rules[0] regex 'conv(' does not compile"),
    ([(".*", "yes")], "prune.rules[0] value must be True (prune), False or None (keep dense), "
                      "got 'yes'"),
    ([(".*",)], "prune.rules[0] must be a (regex, value) pair"),
    # one pair where a list of pairs belongs, and one regex
    ((".*/kernel", True), "prune.rules[0] must be a (regex, value) pair, got '.*/kernel'; rules "
                          "is a list of pairs, e.g. [('head/.*', False), ('.*', True)]"),
    (".*/kernel", "prune.rules must be a list of (regex, value) pairs, got '.*/kernel'; e.g. "
                  "[('.*/kernel', True)]"),
    (True, "prune.rules must be a list of (regex, value) pairs, got True"),
])
def test_bad_rules(rules, needle):
  with pytest.raises(ConfigError) as err:
    select(resnet_like(), rules)
  assert needle in str(err.value) and "\n" not in str(err.value)
