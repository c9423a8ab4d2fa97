"""Costs: kept entries, MACs and BOPs by hand; bytes against a real export."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxcompress import budget, compose, export
from jaxcompress.budget import Option
from jaxcompress.data import Batch
from jaxcompress.models import create_model
from jaxcompress.selection import Layer, trace_layers


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv")(x))  # 8x8x3 -> 4x4x8
    return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_macs_by_hand():
  model = TinyCNN()
  x = np.zeros((2, 8, 8, 3), np.float32)
  variables = model.init(jax.random.key(0), x)
  macs = budget.layer_macs(model, variables, x)
  assert macs == {"conv": 4 * 4 * (3 * 3 * 3 * 8), "head": 128 * 10}
  assert budget.option_bops(macs["head"], Option(0.5, 4, 8), 0.5) == 640 * 4 * 8


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: [B, T=6, 16]
    q = nn.DenseGeneral((4, 8), name="q")(x)  # [B, 6, 4, 8]
    o = nn.DenseGeneral(12, axis=(-2, -1), name="out")(q)  # [B, 6, 12]
    e = nn.Einsum((5, 12), "btd,fd->btf", name="mix")(o)  # kernel [out 5, in 12]
    return nn.Dense(3, name="head")(e.mean(1))


def test_macs_of_multi_axis_projections_by_hand():
  model = Attention()
  x = np.zeros((2, 6, 16), np.float32)
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  assert macs == {"q": 6 * 16 * 4 * 8, "out": 6 * 4 * 8 * 12, "mix": 6 * 12 * 5, "head": 5 * 3}


def test_macs_of_a_transposed_kernel_by_hand():
  class Up(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 4, 4, 8] -> [B, 4, 4, 6] both ways
      a = nn.ConvTranspose(6, (3, 3), name="plain")(x)  # kernel [3, 3, 8, 6]
      b = nn.ConvTranspose(6, (3, 3), transpose_kernel=True, name="flipped")(x)  # [3, 3, 6, 8]
      c = nn.ConvTranspose(6, (3, 3), strides=(2, 2), name="up")(x)  # [B, 8, 8, 6]
      return (a + b).mean((1, 2)) + c.mean((1, 2))

  x = np.zeros((2, 4, 4, 8), np.float32)
  model = Up()
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  # each of the 4 x 4 input positions meets every kernel entry; strided: not the 8 x 8 outputs'
  assert macs == {"plain": 4 * 4 * 3 * 3 * 8 * 6, "flipped": 4 * 4 * 3 * 3 * 8 * 6,
                  "up": 4 * 4 * 3 * 3 * 8 * 6}


def test_macs_of_a_strided_conv_on_a_dilated_input_by_hand():
  class Strided(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 4, 4, 2] dilated to 7 x 7, padded, 3x3 windows at stride 2
      y = nn.Conv(3, (3, 3), input_dilation=2, strides=2, padding=((1, 2), (2, 2)), name="c")(x)
      return y.mean((1, 2))  # [B, 4, 5, 3]

  x = np.zeros((2, 4, 4, 2), np.float32)
  model = Strided()
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  # Rows: the inputs sit at padded rows 1, 3, 5, 7 and windows start at 0, 2, 4, 6: each input
  # meets 1 of the 3 kernel rows. Columns: inputs at 2, 4, 6, 8, windows at 0, 2, 4, 6, 8: each
  # input meets 2 kernel columns. 4 x 1 rows times 4 x 2 columns, times 2 inputs x 3 outputs.
  assert macs == {"c": (4 * 1) * (4 * 2) * 2 * 3}


class Tied(nn.Module):
  """An embedding whose matrix is also the output head (``attend``)."""

  @nn.compact
  def __call__(self, tokens):  # [B, T=6] -> [B, 6, vocab 50]
    embed = nn.Embed(50, 16, name="emb")
    h = nn.Dense(16, name="mid")(embed(tokens))
    return embed.attend(h)


def test_macs_of_a_tied_output_head_by_hand():
  x = np.zeros((2, 6), np.int32)
  model = Tied()
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  assert macs == {"emb": 6 * 16 * 50, "mid": 6 * 16 * 16}  # the lookup is free, the head is not


class GRU(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, T=12, 16] -> [B, 5]
    return nn.Dense(5, name="head")(nn.RNN(nn.GRUCell(24))(x)[:, -1])


class Tower(nn.Module):
  """Three steps of ``nn.scan`` with a weight per step, each step calling its layer twice."""

  @nn.compact
  def __call__(self, x):  # [B, 8]
    class Step(nn.Module):
      @nn.compact
      def __call__(self, c, _):
        d = nn.Dense(8, name="d")
        return d(nn.relu(d(c))), None

    steps = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return steps(name="steps")(x, None)[0]


def test_macs_count_every_step_of_a_scan_by_hand():
  x = np.zeros((2, 12, 16), np.float32)
  model = GRU()
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  # a cell shared by the steps (nn.RNN): every step counts, input gates [16, 24], hidden [24, 24]
  assert macs == {**{f"GRUCell_0/i{g}": 12 * 16 * 24 for g in "rzn"},
                  **{f"GRUCell_0/h{g}": 12 * 24 * 24 for g in "rzn"}, "head": 24 * 5}
  x = np.zeros((2, 8), np.float32)
  model = Tower()
  assert budget.layer_macs(model, model.init(jax.random.key(0), x), x) == {"steps/d": 3 * 2 * 64}


def test_macs_of_a_while_loop_count_one_iteration_and_warn():
  class Loop(nn.Module):
    def setup(self):
      self.d, self.halt = nn.Dense(4), nn.Dense(1)

    def __call__(self, x):  # d once before the loop; d and the halting head once per iteration
      if self.is_initializing():
        self.halt(x)
      cond = lambda mdl, c: (c[0] < 5) & (mdl.halt(c[1]).sum() < 5)
      body = lambda mdl, c: (c[0] + 1, mdl.d(c[1]))
      return nn.while_loop(cond, body, self, (0, self.d(x)), broadcast_variables="params")[1]

  x = np.zeros((2, 4), np.float32)
  model = Loop()
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match="d, halt run inside a while loop"):
    assert budget.layer_macs(model, variables, x) == {"d": 2 * 16, "halt": 4}


def test_macs_of_a_cond_are_its_costliest_branch():
  class Branches(nn.Module):
    def setup(self):
      self.small, self.big = nn.Dense(8), nn.Dense(24)

    def __call__(self, x):  # [B, 8]: small twice (2 x 64 MACs) or big once (192)
      if self.is_initializing():  # both layers' parameters before the branches
        self.big(self.small(x))
      twice = lambda mdl, x: mdl.small(mdl.small(x))
      once = lambda mdl, x: mdl.big(x)[:, :8]
      return nn.cond(x.sum() > 0, twice, once, self, x)

  x = np.zeros((2, 8), np.float32)
  model = Branches()
  macs = budget.layer_macs(model, model.init(jax.random.key(0), x), x)
  assert macs == {"small": 0, "big": 8 * 24}


def test_keep_masks_prune_the_smallest_magnitudes():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  keep = budget.keep_mask(w, 0.7)
  order = np.argsort(np.abs(w).ravel(), kind="stable")
  want = np.ones(w.size, bool)
  want[order[:round(0.7 * w.size)]] = False
  np.testing.assert_array_equal(keep.ravel(), want)
  channel = budget.keep_mask(w, 0.5, "channel")
  l1 = np.abs(w).reshape(-1, 6).sum(0)
  dropped = set(np.argsort(l1, kind="stable")[:3])
  assert all(not channel[..., c].any() if c in dropped else channel[..., c].all()
             for c in range(6))
  assert budget.density(channel, "channel") == 0.5
  nm = budget.keep_mask(w, 0.5, "nm")  # 2 of every 4 input channels (axis -2)
  assert np.all(nm.sum(axis=-2) == 2)


def test_keep_masks_follow_each_layers_own_axes():
  # An Einsum [out 5, in 12] and a DenseGeneral [in 16, heads 4, dim 8], as the trace sees them.
  model = Attention()
  x = np.zeros((2, 6, 16), np.float32)
  variables = model.init(jax.random.key(0), x)
  layers = {l.path: l for l in trace_layers(model, variables, x).layers}
  mix = np.abs(np.asarray(variables["params"]["mix"]["kernel"]))
  channel = budget.keep_mask(mix, 0.4, "channel", layers["mix"])  # 2 of 5 output rows go
  dropped = set(np.argsort(mix.sum(1), kind="stable")[:2])
  assert all(not channel[f].any() if f in dropped else channel[f].all() for f in range(5))
  assert budget.density(channel, "channel", layers["mix"].out_axis) == 0.6
  nm = budget.keep_mask(mix, 0.5, "nm", layers["mix"])  # 2 of every 4 of the 12 inputs, per row
  assert np.all(nm.reshape(5, 3, 4).sum(-1) == 2)
  q = np.asarray(variables["params"]["q"]["kernel"])
  nm_q = budget.keep_mask(q, 0.5, "nm", layers["q"])  # groups along the 16 inputs (axis 0)
  assert np.all(nm_q.reshape(4, 4, 4, 8).sum(1) == 2)
  # 2:4 is offered only where the reduction length divides by 4: not over 6 inputs.
  sparse = budget.PRESETS["gpu-sparse"]
  grid = dict(last=False, sparsities=(0.5,), weight_bits=(4, 8), act_bits=(8,))
  assert {o.sparsity for o in sparse.options(shape=(8, 6), reduce_axes=(1,), **grid)} == {0.0}
  assert {o.sparsity for o in sparse.options(shape=(6, 8), reduce_axes=(0,), **grid)} == {0.0}
  assert {o.sparsity for o in sparse.options(shape=(8, 12), reduce_axes=(1,), **grid)} == {
      0.0, 0.5}


def _kernels_by_hand(weights, sparsity):
  """Global kernel masks: the round(sparsity * K) kernels of lowest RMS over their window pruned
  (weights with no window of more than one entry kept whole)."""
  grid = [i for i, w in enumerate(weights) if w.ndim >= 3 and np.prod(w.shape[:-2]) > 1]
  rms = [np.sqrt(np.mean(np.square(weights[i]), axis=tuple(range(weights[i].ndim - 2))))
         for i in grid]
  flat = np.concatenate([r.ravel() for r in rms])
  cut = round(sparsity * flat.size)
  dropped = np.zeros(flat.size, bool)
  dropped[np.argsort(flat, kind="stable")[:cut]] = True
  keeps, at = [np.ones(w.shape, bool) for w in weights], 0
  for i, r in zip(grid, rms):
    keeps[i] = np.broadcast_to(~dropped[at:at + r.size].reshape(r.shape), weights[i].shape)
    at += r.size
  return keeps


def test_kernel_keeps_prune_whole_kernels_across_layers():
  rng = np.random.default_rng(4)
  weights = [rng.normal(size=(3, 3, 4, 6)), 0.5 * rng.normal(size=(5, 5, 2, 3)),
             rng.normal(size=(1, 1, 6, 6)), rng.normal(size=(12, 5))]
  layers = [_layer(w.shape) for w in weights]
  for sparsity in (0.0, 0.3, 0.75):
    got = budget.kernel_keep(weights, sparsity, layers)
    want = _kernels_by_hand(weights, sparsity)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  # A 1x1 conv and a Dense have no kernels to drop: they stay whole.
  assert [budget.has_kernels(l) for l in layers] == [True, True, False, False]
  assert [budget.kernel_size(l) for l in layers] == [9, 25, 1, 1]
  assert got[2].all() and got[3].all()
  # One layer on its own: keep_mask(..., "kernel") ranks its kernels the same way.
  np.testing.assert_array_equal(budget.keep_mask(weights[0], 0.5, "kernel"),
                                _kernels_by_hand(weights[:1], 0.5)[0])


def _layer(shape):
  """A traced layer of this weight shape by hand: a conv's window is every axis but the last
  two, a Dense has none."""
  return Layer("w", "linear", "Conv" if len(shape) > 2 else "Dense", "w/kernel", tuple(shape),
               (), window_axes=tuple(range(len(shape) - 2)))


def test_shared_kernel_bytes_bound_every_split_of_the_kept_kernels():
  """By hand: one bit per kernel, the kept kernels at the largest window, one byte of rounding;
  summed over weights sharing a threshold, at least the blocks bytes of any split of the same
  number of kept kernels, as training may end with."""
  keep = np.zeros((3, 3, 16, 8), bool)
  keep[:, :, :5, :] = True  # 40 of 128 kernels
  assert budget.shared_kernel_bytes(keep, 3, 9) == 128 // 8 + -(-40 * 9 * 3 // 8) + 1
  assert budget.shared_kernel_bytes(keep, 3, 25) == 128 // 8 + -(-40 * 25 * 3 // 8) + 1
  rng = np.random.default_rng(0)
  shapes = [(3, 3, 16, 8), (5, 5, 4, 6), (3, 3, 8, 8)]
  kernels = [s[2] * s[3] for s in shapes]
  for bits in (2, 3, 4, 8):
    kept = [int(rng.integers(1, k)) for k in kernels]
    planned = sum(budget.shared_kernel_bytes(_some_kernels(s, k, rng), bits, 25)
                  for s, k in zip(shapes, kept))
    for _ in range(20):  # another split of the same total
      split = rng.multinomial(sum(kept) - len(kept), np.ones(3) / 3) + 1
      split = np.minimum(split, kernels)
      blocks = sum(export.sparse.sizes(_some_kernels(s, k, rng), bits)["blocks"]
                   for s, k in zip(shapes, split))
      assert blocks <= planned


def _some_kernels(shape, kept, rng):
  """A kernel mask of ``shape`` keeping ``kept`` random kernels."""
  flat = np.zeros(shape[2] * shape[3], bool)
  flat[rng.choice(flat.size, kept, replace=False)] = True
  return np.broadcast_to(flat.reshape(shape[2:]), shape)


def test_unstructured_bytes_never_count_on_blocks():
  keep = np.zeros((3, 3, 16, 8), bool)
  keep[:, :, :5, :] = True  # whole kernels, where blocks would be smallest
  for bits in (2, 3, 8):
    found = export.sparse.sizes(keep, bits)
    assert min(found, key=found.get) == "blocks"
    assert budget.weight_bytes(keep, bits) == min(v for k, v in found.items() if k != "blocks")


@pytest.mark.parametrize("sparsity,bits", [(0.0, 8), (0.5, 4), (0.9, 2), (0.97, 3)])
def test_planned_bytes_bound_the_exported_bytes(sparsity, bits, tmp_path):
  model, variables = create_model("mlp", num_classes=10, image_shape=(8, 8, 1), seed=0)
  x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
  w = np.asarray(variables["params"]["fc2"]["kernel"])
  keep = budget.keep_mask(w, sparsity)
  # Export the same pattern at `bits` bits (fc1, fc3 at 8) and read fc2's codes from the spec.
  params = jax.tree.map(np.asarray, variables["params"])
  params["fc2"]["kernel"] = np.where(keep, w, 0).astype(np.float32)
  quant = compose.QuantSpec(layer_bits=(("fc1", 8, 8), ("fc2", bits, 8), ("fc3", 8, 8)))
  comp = compose.build(model, {"params": params}, x, optimizer=optax.sgd(0.0), total_steps=1,
                       quant=quant)
  state = comp.init_state({"params": params}, x, calibration=[x])
  out = str(tmp_path / "export")
  comp.export(out, state, input_shape=(8, 8, 1))
  spec = export.read_spec(out)
  meta = next(m for m in spec["layers"] if m["path"] == "params/fc2/kernel")
  codes = meta["segments"].get("positions", 0) + meta["segments"]["values"]
  planned = budget.weight_bytes(keep, bits)
  assert codes <= planned
  # By hand, the dense and bitmap forms bound it too: values at `bits` bits, one bit per entry.
  n, nnz = w.size, int(keep.sum())
  assert planned <= min(-(-n * bits // 8), -(-n // 8) + -(-nnz * bits // 8))


def _export_plan(model, variables, x, plan, out, scale_dtype="float32"):
  """Exports ``{layer: (sparsity, weight bits, input bits)}`` one-shot; returns the weights'
  keeps."""
  params = jax.tree.map(np.asarray, variables["params"])
  keeps = {}
  for layer, (sparsity, _, _) in plan.items():
    w = params[layer]["kernel"]
    keeps[layer] = budget.keep_mask(w, sparsity)
    params[layer]["kernel"] = np.where(keeps[layer], w, 0).astype(np.float32)
  quant = compose.QuantSpec(layer_bits=tuple((l, b, a) for l, (_, b, a) in plan.items()),
                            scale_dtype=scale_dtype)
  comp = compose.build(model, {"params": params}, x, optimizer=optax.sgd(0.0), total_steps=1,
                       quant=quant)
  state = comp.init_state({"params": params}, x, calibration=[x])
  return keeps, comp.export(out, state, input_shape=x.shape[1:])


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_overhead_and_weight_bytes_bound_every_plan_on_disk(scale_dtype, tmp_path):
  """Random plans: the artifact (gzipped spec included) never outgrows the planned bytes, with
  the scales stored in either precision (the reference export uses the plans' own)."""
  model, variables = create_model("mlp", num_classes=10, image_shape=(8, 8, 1), seed=0)
  x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
  layers = ("fc1", "fc2", "fc3")
  _, ref = _export_plan(model, variables, x, {l: (0.0, 8, 8) for l in layers},
                        str(tmp_path / "ref"), scale_dtype)
  spec = export.read_spec(str(tmp_path / "ref"))
  overhead = budget.overhead_bytes(spec, [f"{l}/kernel" for l in layers])
  codes = sum(m["segments"].get("positions", 0) + m["segments"]["values"]
              for m in spec["layers"] if m["path"].endswith("/kernel"))
  biases = 4 * (256 + 128 + 10)  # 0 in the reference (stored as no entries), float32 when trained
  sized_spec = overhead - (ref["arrays_raw_bytes"] - codes) - biases  # the spec's share
  plain = len(export.files.spec_bytes(spec, compress=False))
  assert ref["spec_bytes"] < sized_spec < plain  # above the reference's, below plain JSON
  rng = np.random.default_rng(2)
  for i in range(6):
    plan = {l: (float(rng.choice([0.0, 0.3, 0.8, 0.97])), int(rng.choice([2, 3, 4, 8])),
                int(rng.choice([4, 8]))) for l in layers}
    keeps, report = _export_plan(model, variables, x, plan, str(tmp_path / f"p{i}"),
                                 scale_dtype)
    planned = overhead + sum(budget.weight_bytes(keeps[l], plan[l][1]) for l in layers)
    assert report["total_bytes"] <= planned, plan
    assert report["spec_file"] == "spec.json.gz"


def test_gradual_training_of_a_plan_exports_within_its_planned_bytes(tmp_path):
  """The mask follows training (a gradual schedule, a large step), yet the artifact stays within
  the bytes the plan's one-shot patterns were sized at: the gap-code caps hold it there."""
  model, variables = create_model("mlp", num_classes=10, image_shape=(8, 8, 1), seed=0)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  layers = ("fc1", "fc2", "fc3")
  _, ref = _export_plan(model, variables, x, {l: (0.0, 8, 8) for l in layers},
                        str(tmp_path / "ref"))
  overhead = budget.overhead_bytes(export.read_spec(str(tmp_path / "ref")),
                                   [f"{l}/kernel" for l in layers])
  plan = {"fc1": (0.95, 3, 8), "fc2": (0.9, 4, 8), "fc3": (0.0, 8, 8)}
  params = variables["params"]
  keeps = {f"{l}/kernel": budget.keep_mask(params[l]["kernel"], s) for l, (s, _, _) in
           plan.items()}
  bits = {f"{l}/kernel": b for l, (_, b, _) in plan.items()}
  planned = overhead + sum(budget.weight_bytes(keeps[w], bits[w]) for w in keeps)
  one_shot = {"method": "magnitude", "structure": "unstructured", "scope": "global",
              "schedule": "one_shot", "begin": 0.0, "sparsity": 0.95, "rules": (),
              "layer_sparsity": ()}
  prune = compose.PruneSpec(**budget.scheduled(
      one_shot, keeps, {"schedule": "gradual", "begin": 0.0, "end": 0.5, "update_every": 2},
      bits=bits))
  quant = compose.QuantSpec(layer_bits=tuple((l, b, a) for l, (_, b, a) in plan.items()))
  comp = compose.build(model, variables, x, optimizer=optax.sgd(1.0), total_steps=16,
                       prune=prune, quant=quant)
  state = comp.init_state(variables, x, calibration=[x])
  step = comp.make_train_step()
  for i in range(16):
    labels = rng.integers(0, 10, 16).astype(np.int32)
    state, _ = step(state, Batch(rng.normal(size=x.shape).astype(np.float32), labels,
                                 np.ones(16, np.float32)))
  trained = {f"{l}/kernel": np.asarray(state.params["model"][l]["kernel"]) != 0 for l in layers}
  assert any(np.any(trained[w] & ~keeps[w]) for w in keeps)  # the pattern did move
  report = comp.export(str(tmp_path / "trained"), state, input_shape=(8, 8, 1))
  assert report["total_bytes"] <= planned


def test_coded_ratio_by_hand():
  # 64 equal entries at 4 bits: codes all 7 (symbol 15), 32 bytes fixed-width; Huffman-coded a
  # 1 + 8 byte table (16 symbols) and one bit each (8 bytes): 32 / 17.
  ones = np.ones((64, 1), np.float32)
  assert budget.coded_ratio({"w": ones}, {}, {"w": 4}) == pytest.approx(32 / 17)
  # Every other entry kept: 2 of every 4 along the reduction axis, stored as 2:4 groups: 32
  # 2-bit positions (8 bytes; Huffman-coded, only 0 and 2 occur: a 1 + 2 byte table and one bit
  # each, 7 bytes) and 32 values (16 bytes, or 9 + 4 coded): 24 / 20.
  keep = np.zeros((64, 1), bool)
  keep[::2] = True
  assert budget.coded_ratio({"w": ones}, {"w": keep}, {"w": 4}) == pytest.approx(24 / 20)


def test_coded_ratio_of_an_einsum_follows_its_own_axes_by_hand():
  # 'btd,fd->btf': kernel [out 5, in 12], one scale per row, 2:4 groups along the rows. With
  # the output channels taken as the last axis, row 3 (0.01 against a column maximum of 2)
  # quantized to 0 and the groups ran down the 5 rows, where none fit.
  model = Attention()
  x = np.zeros((2, 6, 16), np.float32)
  layers = {l.path: l for l in trace_layers(model, model.init(jax.random.key(0), x), x).layers}
  rows = np.repeat(np.array([1.0, 0.5, 0.25, 0.01, 2.0], np.float32)[:, None], 12, axis=1)
  scale = np.abs(rows).max(axis=1, keepdims=True) / 7  # the export's per-row scales
  assert np.all(np.round(rows / scale) == 7)  # NumPy: every code is 7
  # 60 equal 4-bit codes, dense: 30 bytes fixed-width; Huffman-coded a 1 + 8 byte table (16
  # symbols) and one bit each (8 bytes): 30 / 17.
  assert budget.coded_ratio({"mix": rows}, {}, {"mix": 4}, layers) == pytest.approx(30 / 17)
  # Every other input kept: 2 of every 4 along each row, stored as 2:4 groups: 30 2-bit
  # positions (8 bytes; Huffman-coded, only 0 and 2 occur: a 1 + 2 byte table and one bit each,
  # 7 bytes) and 30 values (15 bytes, or 9 + 4 coded): 23 / 20.
  keep = np.zeros((5, 12), bool)
  keep[:, ::2] = True
  ones = np.ones((5, 12), np.float32)
  assert budget.coded_ratio({"mix": ones}, {"mix": keep}, {"mix": 4}, layers) == pytest.approx(
      23 / 20)


def test_a_tied_embedding_head_is_costed_with_float_inputs_under_a_compute_budget():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 50, (8, 6)).astype(np.int32)
  model = Tied()
  variables = model.init(jax.random.key(0), x)
  held_out = [Batch(x, rng.integers(0, 50, (8, 6)).astype(np.int32), np.ones(8, np.float32))]
  found = budget.find_plan(model, variables, held_out, bops=1e7, sparsities=(0.5,),
                           weight_bits=(4, 8), act_bits=(4, 8))
  rows = {l.path: l for l in found.plan.layers}
  # The export never quantizes an Embed's inputs: its head's one option is float inputs, 32 bits.
  assert rows["emb"].act_bits == 0 and rows["mid"].act_bits in (4, 8)
  density = 1 - rows["emb"].sparsity
  assert rows["emb"].bops == (int(np.ceil(6 * 16 * 50 * density - 1e-9))
                              * rows["emb"].weight_bits * 32)
  # Per-example weights [B] over per-token losses [B, T]: the scan's float loss is the mean
  # over tokens (NumPy), its accuracy a fraction of tokens.
  logits = np.asarray(model.apply(variables, x), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp, held_out[0].label[..., None], -1).mean()
  assert found.sensitivity.base_loss == pytest.approx(want, rel=1e-5)
  assert 0 <= found.sensitivity.base_accuracy <= 1
