"""Mixed precision (``train.compute_dtype='bfloat16'``) on CPU: the forward runs in bfloat16, the
loss falls, it stays close to float32 training, and state, ranges and exported codes stay
float32."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import compose
from jaxcompress.data import Batch
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model
from jaxcompress.steps import TrainState, make_train_step, supervised_loss

SHAPE = (6, 6, 3)
STEPS = 30


def _data():
  """64 examples whose labels a random linear map of the image decides (learnable)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, *SHAPE)).astype(np.float32)
  w = rng.normal(size=(int(np.prod(SHAPE)), 4))
  y = np.argmax(x.reshape(64, -1) @ w, -1).astype(np.int32)
  return [Batch(x[i:i + 32], y[i:i + 32], np.ones(32, np.float32)) for i in (0, 32)]


def _compose(dtype):
  student, svars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=1)
  teacher, tvars = create_model("mlp", num_classes=4, image_shape=SHAPE, seed=2)
  x = _data()[0].image
  comp = compose.build(
      student, svars, x, optimizer=optax.sgd(0.1, momentum=0.9), total_steps=STEPS, teacher=teacher,
      prune=compose.PruneSpec(method="magnitude", sparsity=0.5),
      quant=compose.QuantSpec(weight_bits=4, act_bits=8), distill=compose.DistillSpec(alpha=0.5),
      compute_dtype=dtype)
  return comp, comp.init_state(svars, x, teacher_vars=tvars, calibration=[x]), tvars


def _train(step, state, *args):
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, _data()[i % 2], *args)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


def _dtypes(tree):
  return {str(jnp.result_type(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.floating)}


@pytest.fixture(scope="module")
def trained():
  """The composed step (prune + 4/8-bit fake quantization + KD) trained in each dtype."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    comp, state, tvars = _compose(dtype)
    out[dtype] = (comp, state, tvars, *_train(comp.make_train_step(), state, tvars))
  return out


def test_the_compressed_student_trains_in_bfloat16_close_to_float32(trained):
  comp, state0, tvars, state, losses = trained["bfloat16"]
  *_, state32, losses32 = trained["float32"]
  # The forward and backward matrix products run in bfloat16 ...
  jaxpr = str(jax.make_jaxpr(comp.loss_fn)(state0.params, state0.model_state, _data()[0],
                                           jax.random.key(0), tvars))
  assert "dot_general" in jaxpr and "bf16[32,256]" in jaxpr
  # ... while parameters, optimizer state and model state (input ranges) stay float32.
  for tree in (state.params, state.opt_state, state.model_state):
    assert _dtypes(tree) == {"float32"}
  assert losses[-1] < 0.5 * losses[0]
  # bfloat16 keeps 8 mantissa bits: the losses follow the float32 run within 2 %, the kernels
  # within 10 % (relative norm of the difference), and the pruning masks nearly agree.
  np.testing.assert_allclose(losses, losses32, rtol=0.02)
  for a, b in zip(jax.tree.leaves(state.params["model"]), jax.tree.leaves(state32.params["model"])):
    if a.ndim == 2:
      assert np.linalg.norm(a - b) < 0.1 * np.linalg.norm(b)
      assert np.mean((a == 0) != (b == 0)) < 0.01


def test_exported_codes_do_not_depend_on_the_compute_dtype(trained, tmp_path):
  comp16, _, _, state, _ = trained["bfloat16"]
  comp32 = trained["float32"][0]
  for name, comp in (("bf16", comp16), ("f32", comp32)):
    comp.export(str(tmp_path / name), state, input_shape=SHAPE)
  for file in ("arrays.bin", "spec.json.gz"):
    assert (tmp_path / "bf16" / file).read_bytes() == (tmp_path / "f32" / file).read_bytes()
  # Evaluation runs in float32 in both: the same logits, bit for bit.
  variables = comp16.eval_variables(state)
  x = _data()[0].image
  np.testing.assert_array_equal(comp16.logits_fn(variables, x), comp32.logits_fn(variables, x))


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_supervised_loss_runs_in_bfloat16_and_keeps_batch_statistics_float32():
  model = _ConvNet()
  variables = model.init(jax.random.key(0), _data()[0].image)
  opt = optax.sgd(0.05, momentum=0.9)
  states = {}
  for dtype in ("float32", "bfloat16"):
    loss_fn = supervised_loss(model, dtype)
    state = TrainState.create(variables["params"], {"batch_stats": variables["batch_stats"]}, opt)
    if dtype == "bfloat16":
      jaxpr = str(jax.make_jaxpr(loss_fn)(state.params, state.model_state, _data()[0],
                                          jax.random.key(0)))
      assert "conv_general_dilated" in jaxpr and "bf16[32,6,6,8]" in jaxpr
    states[dtype] = _train(make_train_step(loss_fn, opt), state)
  (state, losses), (_, losses32) = states["bfloat16"], states["float32"]
  assert _dtypes(state.model_state) == _dtypes(state.params) == {"float32"}
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_allclose(losses, losses32, rtol=0.05)


def test_an_unknown_compute_dtype_is_one_line():
  with pytest.raises(ConfigError, match="train.compute_dtype must be one of .*bfloat16"):
    supervised_loss(_ConvNet(), "float16")
  with pytest.raises(ConfigError, match="train.compute_dtype"):
    _compose("half")


def test_the_compute_dtype_may_be_given_as_a_dtype():
  # jnp.bfloat16, as Quantizer.apply takes it, names the same dtype as "bfloat16".
  comp = _compose(jnp.bfloat16)[0]
  assert comp.compute_dtype == "bfloat16"
  variables = _ConvNet().init(jax.random.key(0), _data()[0].image)
  jaxpr = str(jax.make_jaxpr(supervised_loss(_ConvNet(), jnp.bfloat16))(
      variables["params"], {"batch_stats": variables["batch_stats"]}, _data()[0],
      jax.random.key(0)))
  assert "bf16[32,6,6,8]" in jaxpr
  with pytest.raises(ConfigError, match="^train.compute_dtype must be one of bfloat16, float32, "
                     "got <class 'jax.numpy.float16'>$"):
    supervised_loss(_ConvNet(), jnp.float16)


class _MLP(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(n, param_dtype=self.param_dtype)
    return dense(4)(nn.relu(dense(8)(nn.relu(dense(8)(x)))))


def test_exporting_variables_cast_away_from_the_declared_dtype_warns(tmp_path):
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  for model, cast, warns in ((_MLP(), True, True), (_MLP(jnp.bfloat16), False, False)):
    variables = model.init(jax.random.key(0), x)
    if cast:
      variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    comp = compose.build(model, variables, x, optimizer=optax.sgd(0.0), total_steps=1,
                         quant=compose.QuantSpec(weight_bits=4, act_bits=8))
    state = comp.init_state(variables, x, calibration=[x])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      comp.export(str(tmp_path / str(cast)), state)
    said = [str(w.message) for w in caught if str(w.message).startswith("export: params")]
    assert said == (["export: params 'Dense_0/bias' are bfloat16 where _MLP declares "
                     "float32; export.load rebuilds them as declared, so its outputs may differ "
                     "from the fake-quant model's in the last bits: declare that dtype in the "
                     "module (param_dtype) instead of casting the variables"] if warns else [])
