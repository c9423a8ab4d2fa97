"""docs/autocompress.md against the code: its Python example runs as written and its plan meets
its budget, and the scan's evaluations per layer it states are the ones counted."""

import os
import re

import flax.linen as nn
import jax
import numpy as np

from jaxcompress import budget
from jaxcompress.data import Batch

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "autocompress.md")


def test_doc_example_runs_and_meets_its_budget():
  with open(DOC) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0], "docs/autocompress.md", "exec"), namespace)
  plan, sens = namespace["plan"], namespace["sens"]
  assert sens.compiles == 1
  assert plan.size_bytes == sum(l.bytes for l in plan.layers) <= 6_000
  assert namespace["found"].allocation.gap == 0
  assert [l.path for l in plan.layers] == ["Conv_0", "Conv_1", "Dense_1", "Dense_0"]
  assert namespace["comp"].quantizer is not None


def test_the_stated_evaluations_per_layer_are_the_quick_grids():
  """Counted on a one-layer model with the ``:quick`` grid: pruning and quantization apart take
  6 + 4 evaluations, every (sparsity, bits) pair (sparsity 0 too) 7 x 4."""
  from configs.autocompress import get_config
  scan = get_config("quick").scan
  model = nn.Sequential([nn.Dense(4)])
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  held_out = [Batch(x, np.zeros(8, np.int32), np.ones(8, np.float32))]
  options = {"layers_0": budget.PRESETS["any"].options(
      shape=(16, 4), last=True, sparsities=scan.sparsities, weight_bits=scan.weight_bits,
      act_bits=(8,))}
  counts = [len(budget.scan(model, model.init(jax.random.key(0), x), held_out, options,
                            calibration=[x], joint=joint).measured) - 1  # less the float model
            for joint in (False, True)]
  assert counts == [6 + 4, 7 * 4]
  with open(DOC) as f:
    text = " ".join(f.read().split())
  assert f"({counts[0]} instead of {counts[1]} evaluations per layer in `:quick`'s grid)" in text
