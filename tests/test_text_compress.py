"""The composed step on sequence models: a tiny char GPT and a tiny char LSTM, random tokens.

2:4 along every attention/MLP/LSTM kernel's reduction axis, 4-bit weights and 8-bit inputs with the
embedding and head at 8 bits, token-level KD, a falling loss, and an export whose logits equal the
fake-quant model's bit for bit; the sequence losses against NumPy.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import compose, export, pruning
from jaxcompress import distillation as kd
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.export import read_spec, sparse
from jaxcompress.models import CharGPT, CharLSTM
from jaxcompress.steps import cross_entropy, weighted_mean

V, T, B = 13, 8, 4
MODELS = {"gpt": CharGPT(vocab_size=V, context=T, width=16, depth=2, heads=2, mlp_ratio=2),
          "lstm": CharLSTM(vocab_size=V, width=8, layers=1)}
# The reduction (contraction) axes of each kernel, written out by layout, not taken from the code
# under test: DenseGeneral q/k/v [in, heads, dim] sum over in; out [heads, dim, out] over
# heads * dim; Dense [in, out] over in.
REDUCTION = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1)}  # else (0,)
STEPS = 5


def _ids(seed, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def _specs(prune=True, quant=True):
  return dict(
      prune=compose.PruneSpec(method="magnitude" if prune else "none", structure="nm", n=2, m=4,
                              sparsity=0.5, schedule="one_shot"),
      quant=compose.QuantSpec(weight_bits=4 if quant else 0, act_bits=8 if quant else 0),
      distill=compose.DistillSpec(alpha=0.5, temperature=2.0))


def _train(name, **spec_kw):
  model = MODELS[name]
  ids = _ids(1)
  svars = model.init(jax.random.key(0), ids)
  tvars = model.init(jax.random.key(7), ids)  # a different float teacher
  comp = compose.build(model, svars, ids, optimizer=optax.adam(1e-2), total_steps=STEPS,
                       teacher=model, **_specs(**spec_kw))
  state = comp.init_state(svars, ids, teacher_vars=tvars, calibration=[ids, _ids(2)])
  step = comp.make_train_step()
  batch = Batch(ids, jnp.roll(ids, -1, axis=1), jnp.ones((B,), jnp.float32))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch, tvars)
    losses.append(float(metrics["loss"]))
  return dict(model=model, comp=comp, state=state, losses=losses, metrics=metrics, ids=ids)


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request):
  return request.param, _train(request.param)


def _inner_kernels(run):
  """``{layer path: kernel}`` of every compressed layer but the first and last (embed, head)."""
  params = run["state"].params["model"]
  out = {}
  for layer in run["comp"].layers.layers:
    if layer.path in ("embed", "head"):
      continue
    node = params
    for key in layer.weight.split("/"):
      node = node[key]
    out[layer.path] = np.asarray(node)
  return out


def _groups_along_reduction(path, w):
  """Rows of 4 consecutive reduction-axis entries, by a NumPy reshape of the known layout."""
  axes = REDUCTION.get(path.rsplit("/", 1)[-1], (0,))
  rest = [a for a in range(w.ndim) if a not in axes]
  moved = np.transpose(w, list(axes) + rest)  # reduction axes first, flattened
  flat = moved.reshape(-1, int(np.prod([w.shape[a] for a in rest])))
  return flat.reshape(flat.shape[0] // 4, 4, -1).transpose(0, 2, 1).reshape(-1, 4)


def test_loss_falls_and_metrics_cover_kd(trained):
  _, run = trained
  assert all(np.isfinite(run["losses"]))
  assert run["losses"][-1] < run["losses"][0], run["losses"]
  assert float(run["metrics"]["sparsity"]) == pytest.approx(0.5)
  assert {"kd_loss", "task_loss", "teacher_agreement"} <= set(run["metrics"])


def test_every_inner_kernel_is_2_of_4_along_its_reduction_axis(trained):
  name, run = trained
  kernels = _inner_kernels(run)
  expected = ({f"block{b}/{k}" for b in range(2) for k in
               ("attn/query", "attn/key", "attn/value", "attn/out", "fc", "proj")}
              if name == "gpt" else {"lstm0/input", "lstm0/cell/recurrent"})
  assert set(kernels) == expected
  assert run["comp"].layers.uncovered == (() if name == "lstm" else ("pos",))
  for path, w in kernels.items():
    groups = _groups_along_reduction(path, w)
    counts = np.count_nonzero(groups, axis=1)
    assert counts.max() <= 2 and counts.min() == 2, path  # exactly 2 of every 4 kept
    assert np.count_nonzero(w) == w.size // 2, path


def test_one_shot_final_masks_are_2_of_4_along_the_reduction_axis(trained):
  """``final_masks`` (the evaluation before fine-tuning) groups like the train step's pruning."""
  _, run = trained
  comp = run["comp"]
  dense = jax.tree.map(lambda w: w + 1.0, run["state"].params)  # no zeros left from training
  pruned = pruning.apply_masks(dense, comp.final_masks(dense))
  for path, w in _inner_kernels({**run, "state": run["state"].replace(params=pruned)}).items():
    counts = np.count_nonzero(_groups_along_reduction(path, w), axis=1)
    assert counts.max() == 2 and counts.min() == 2, path


def test_bits_inner_4_8_and_embedding_and_head_8(trained):
  _, run = trained
  layers = {l.path: l.config for l in run["state"].model_state["quant"].layers}
  assert (layers["embed"].weight_bits, layers["embed"].act_bits) == (8, None)  # ids: no input
  assert (layers["head"].weight_bits, layers["head"].act_bits) == (8, 8)
  inner = _inner_kernels(run)
  assert all((layers[p].weight_bits, layers[p].act_bits) == (4, 8) for p in inner)
  table = run["comp"].describe(run["state"])
  assert table.count("pruned, 4-bit weights, 8-bit inputs") == len(inner)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  name, run = trained
  out = str(tmp_path_factory.mktemp(f"export_{name}"))
  report = run["comp"].export(out, run["state"], input_shape=(T,), input_dtype="int32")
  return name, run, out, report


def test_export_round_trip_is_bit_identical(exported):
  _, run, out, _ = exported
  comp, model = run["comp"], run["model"]
  loaded = export.load(out, model)
  variables = comp.eval_variables(run["state"])
  for ids in (run["ids"], _ids(5), _ids(6, (3, T - 3))):
    fake = np.asarray(comp.logits_fn(variables, ids))
    served = np.asarray(loaded.logits(ids))
    assert served.shape == ids.shape + (V,)
    assert np.array_equal(fake, served)


def test_2_of_4_weights_are_stored_packed(exported):
  _, run, out, report = exported
  metas = {m["path"]: m for m in read_spec(out)["layers"]}
  for path, w in _inner_kernels(run).items():
    meta = metas[f"params/{path}/kernel"]
    assert meta["kind"] == "int" and meta["bits"] == 4
    assert meta["encoding"] in ("nm", "bitmap")
    stored = meta["segments"]["positions"] + meta["segments"]["values"]
    # 2 values of 4 bits + 2 positions of 2 bits per group of 4: 3 bits per weight
    assert stored <= w.size * 3 // 8, (path, stored)
  assert report["arrays_raw_bytes"] < report["float32_bytes"]


def test_nm_encoding_when_every_group_holds_two(tmp_path):
  """Float 2:4 weights (no quantization): nm ties bitmap and wins; the groups lie along the
  reduction axes, stored as 2 values plus 2-bit positions per group."""
  run = _train("gpt", quant=False)
  report = run["comp"].export(str(tmp_path), run["state"], input_shape=(T,),
                              input_dtype="int32")
  metas = {m["path"]: m for m in read_spec(str(tmp_path))["layers"]}
  for path, w in _inner_kernels(run).items():
    meta = metas[f"params/{path}/kernel"]
    assert meta["encoding"] == "nm" and meta["group_n"] == 2, path
    assert tuple(meta["group_axes"]) == REDUCTION.get(path.rsplit("/", 1)[-1], (0,))
    assert meta["segments"] == {"positions": w.size // 4 * 2 * 2 // 8, "values": w.size // 2 * 4}
  assert any(l["encoding"] == "nm 2:4" for l in report["layers"])
  loaded = export.load(str(tmp_path), run["model"])
  fake = run["comp"].logits_fn(run["comp"].eval_variables(run["state"]), run["ids"])
  assert np.array_equal(np.asarray(fake), np.asarray(loaded.logits(run["ids"])))


def test_nm_encoding_by_hand():
  # A [8, 2] kernel whose reduction axis is 0: groups are rows 0-3 and 4-7 of each column.
  w = np.zeros((8, 2), np.uint8)
  w[[1, 3, 4, 6], 0] = [5, 6, 7, 8]
  w[[0, 3, 5], 1] = [1, 2, 3]  # the last group of column 1 holds one non-zero entry
  enc = sparse.encode(w, w != 0, 4, group_axes=(0,))
  assert enc.encoding == "nm" and enc.group_n == 2 and enc.nnz == 8
  # groups in order: col 0 rows 0-3, col 0 rows 4-7, col 1 rows 0-3, col 1 rows 4-7 (the filler
  # is the first zero, position 0 of that group)
  positions = [1, 3, 0, 2, 0, 3, 0, 1]
  assert list(sparse.unpack_bits(enc.positions, 2, 8)) == positions
  assert list(sparse.unpack_bits(enc.values, 4, 8)) == [5, 6, 7, 8, 1, 2, 0, 3]
  nonzero, values = sparse.decode(enc, w.size, 4, shape=w.shape)
  out = np.zeros(w.size, np.uint8)
  out[nonzero] = values
  assert np.array_equal(out.reshape(w.shape), w)
  # a corrupted stream or a spec that does not fit the shape is one error line
  swapped = enc._replace(positions=sparse.pack_bits([3, 1] + positions[2:], 2))
  for bad in (swapped, enc._replace(group_axes=(2,)), enc._replace(nnz=6),
              enc._replace(group_n=4)):
    with pytest.raises(ConfigError, match="corrupted|does not"):
      sparse.decode(bad, w.size, 4, shape=w.shape)
  assert "nm" not in sparse.sizes(w != 0, 4)  # no reduction axes, no nm
  w[2, 0] = 1  # 3 non-zero entries in a group: 3 slots per group, 3 + 6 bytes
  size = sparse.sizes(w != 0, 4, group_axes=(0,))
  assert (size["nm"], size["dense"], size["bitmap"]) == (3 + 6, 8, 2 + 4)
  assert sparse.encode(w, w != 0, 4, group_axes=(0,)).encoding == "bitmap"


def test_lstm_gates_in_a_scan_calibrate_like_the_python_loop():
  """The recurrent kernel's input range covers the hidden states of every step, whether the
  cell runs under nn.scan or in a Python loop (the first step alone sees only zeros)."""
  ids = _ids(4)
  ranges = []
  for scan in (True, False):
    model = MODELS["lstm"].clone(scan=scan)
    variables = model.init(jax.random.key(0), ids)
    comp = compose.build(model, variables, ids, optimizer=optax.sgd(0.1), total_steps=1,
                         **{**_specs(prune=False), "distill": compose.DistillSpec()})
    ranges.append(comp.init_state(variables, ids).model_state["quant"].ranges)
  lo, hi = np.asarray(ranges[0]["lstm0/cell/recurrent"])
  assert lo < -1e-3 and hi > 1e-3
  assert set(ranges[0]) == set(ranges[1]) == {"lstm0/input", "lstm0/cell/recurrent", "head"}
  for path in ranges[0]:
    np.testing.assert_allclose(ranges[0][path], ranges[1][path], rtol=1e-5, atol=1e-7)


def test_sequence_losses_against_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, B, T, V)).astype(np.float32) * 3
  labels = rng.integers(0, V, (B, T))
  temp = 2.0

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1)[..., 0]
  lt, ls = log_softmax(t / temp), log_softmax(s / temp)
  kl = temp ** 2 * (np.exp(lt) * (lt - ls)).sum(-1)
  np.testing.assert_allclose(cross_entropy(jnp.asarray(s), jnp.asarray(labels)), ce, rtol=1e-5)
  np.testing.assert_allclose(kd.kd_loss(jnp.asarray(s), jnp.asarray(t), temp), kl, rtol=1e-4,
                             atol=1e-6)
  w_ex = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
  w_tok = rng.integers(0, 2, (B, T)).astype(np.float32)
  np.testing.assert_allclose(weighted_mean(jnp.asarray(kl), jnp.asarray(w_ex)),
                             (kl.mean(1) * w_ex).sum() / w_ex.sum(), rtol=1e-5)
  np.testing.assert_allclose(weighted_mean(jnp.asarray(kl), jnp.asarray(w_tok)),
                             (kl * w_tok).sum() / w_tok.sum(), rtol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
def test_composed_kd_loss_on_sequences_against_numpy(per_token):
  """compose.loss_fn: (1 - alpha) CE + alpha T^2 KL at every position, weighted mean."""
  model = MODELS["gpt"]
  ids = _ids(3)
  svars, tvars = model.init(jax.random.key(0), ids), model.init(jax.random.key(1), ids)
  comp = compose.build(model, svars, ids, optimizer=optax.sgd(0.1), total_steps=1,
                       teacher=model, distill=compose.DistillSpec(alpha=0.3, temperature=3.0))
  state = comp.init_state(svars, ids, teacher_vars=tvars)
  labels = np.asarray(jnp.roll(ids, -1, axis=1))
  weight = (np.random.default_rng(1).integers(0, 2, (B, T)) if per_token
            else np.array([1, 0, 1, 1])).astype(np.float32)
  loss, (_, metrics) = comp.loss_fn(state.params, state.model_state,
                                    Batch(ids, jnp.asarray(labels), jnp.asarray(weight)),
                                    jax.random.key(0), tvars)
  s = np.asarray(model.apply(svars, ids), np.float64)
  t = np.asarray(model.apply(tvars, ids), np.float64)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1)[..., 0]
  lt, ls = log_softmax(t / 3.0), log_softmax(s / 3.0)
  kl = 9.0 * (np.exp(lt) * (lt - ls)).sum(-1)
  w = np.broadcast_to(weight if per_token else weight[:, None], (B, T))
  mean = lambda v: (v * w).sum() / w.sum()
  np.testing.assert_allclose(float(loss), mean(0.7 * ce + 0.3 * kl), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kd_loss"]), mean(kl), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["task_loss"]), mean(ce), rtol=1e-5)
