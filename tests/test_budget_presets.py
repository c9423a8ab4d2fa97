"""Device presets: every option they offer, and so every plan, lies inside their constraints."""

import numpy as np
import pytest

from jaxcompress.budget import PRESETS, allocate, get_preset
from jaxcompress.errors import ConfigError
from jaxcompress.selection import Layer

GRID = dict(sparsities=(0.3, 0.5, 0.9), weight_bits=(2, 3, 4, 8), act_bits=(4, 8))
SHAPES = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 30, 8), (64, 10)]


def _constraints(name, option, shape, last):
  """What each preset's hardware accepts, written out by hand."""
  s, w, a = option
  if name == "any":
    return s in (0, 0.3, 0.5, 0.9) and w in (2, 3, 4, 8) and a in (4, 8)
  if name == "mcu":
    return s in (0, 0.3, 0.5, 0.9) and w in (2, 3, 4, 8) and a == 8
  if name == "gpu-sparse":
    return (s == 0 or (s == 0.5 and shape[-2] % 4 == 0)) and w in (4, 8) and a == 8
  if name == "int8-npu":
    return (s == 0 or (s in (0.3, 0.5, 0.9) and not last)) and w == 8 and a == 8
  raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("kind", ["size", "bops"])
def test_random_plans_never_leave_the_preset(name, kind):
  preset = get_preset(name)
  if kind not in preset.budgets:
    return
  rng = np.random.default_rng(0)
  layer_options = [preset.options(shape=sh, last=i == len(SHAPES) - 1, kind=kind, **GRID)
                   for i, sh in enumerate(SHAPES)]
  for opts, sh in zip(layer_options, SHAPES):
    assert opts and all(_constraints(name, o, sh, sh == SHAPES[-1]) for o in opts)
  for _ in range(20):  # whatever the damages and the budget, the plan picks allowed options
    costs = [rng.integers(1, 100, len(o)) for o in layer_options]
    damages = [rng.normal(size=len(o)) for o in layer_options]
    plan = allocate(costs, damages, int(rng.integers(sum(map(min, costs)), 400)))
    for k, opts, sh in zip(plan.choice, layer_options, SHAPES):
      assert _constraints(name, opts[k], sh, sh == SHAPES[-1])


def test_input_bits_are_searched_only_where_they_change_the_cost():
  size = get_preset("any").options(shape=(8, 8), last=False, kind="size", **GRID)
  assert {o.act_bits for o in size} == {8}


def test_unknown_device_is_one_line():
  with pytest.raises(ConfigError, match="budget.device must be one of any, gpu-sparse"):
    get_preset("tpu")


def _layer(shape, kind="linear", stacked=0, reduce_axes=()):
  return Layer(path="l", kind=kind, type_name="Dense", weight="l/kernel", shape=shape,
               input_shape=(1, shape[-2]), reduce_axes=reduce_axes, stacked=stacked)


def test_no_option_prunes_every_weight_of_a_layer():
  grid = dict(GRID, sparsities=(0.5, 0.9))
  # 4 weights: 0.9 prunes round(3.6) = 4 of them (cut), 0.5 prunes 2
  opts = get_preset("any").layer_options(_layer((4, 1)), last=False, **grid)
  assert {o.sparsity for o in opts} == {0.0, 0.5}
  # 3 steps of 2 weights, pruned step by step: 0.9 prunes round(1.8) = 2 of each step
  opts = get_preset("any").layer_options(_layer((3, 2, 1), stacked=1), last=False, **grid)
  assert {o.sparsity for o in opts} == {0.0, 0.5}
  big = get_preset("mcu").layer_options(_layer((64, 10)), last=False, **grid)
  assert {o.sparsity for o in big} == {0.0, 0.5, 0.9}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_an_embedding_keeps_float_inputs_and_no_two_of_four(name):
  # A [vocab 16, features 8] table: a lookup sums over nothing, attend over the features
  for kind in get_preset(name).budgets:
    opts = get_preset(name).layer_options(_layer((16, 8), kind="embed", reduce_axes=(0,)),
                                          last=True, kind=kind, **GRID)
    assert opts and {o.act_bits for o in opts} == {0}
    if name == "gpu-sparse":
      assert {o.sparsity for o in opts} == {0.0}
