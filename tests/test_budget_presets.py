"""Device presets: every option they offer, and so every plan, lies inside their constraints."""

import numpy as np
import pytest

from jaxcompress.budget import PRESETS, allocate, get_preset
from jaxcompress.errors import ConfigError

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
