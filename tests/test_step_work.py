"""The work compression adds to each train step: each piece done once, not twice.

Each saving is checked two ways: the result equals the straightforward formula it replaced (bit
for bit, and over a few steps of a composed, pruned and quantized model), and the traced program
holds the smaller work (op counts in the jaxpr, which every backend compiles from).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import compose
from jaxcompress.data import Batch
from jaxcompress.models import create_model
from jaxcompress.pruning import masks as masks_mod
from jaxcompress.quantization import layer as layer_mod
from jaxcompress.quantization import model as model_mod
from jaxcompress.quantization import qparams as qparams_mod


# -- the straightforward formulas the step used before --------------------------------------


def reference_ranks(scores, axis=-1):
  order = jnp.argsort(scores, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis)


def reference_minmax_qparams(x, *, bits, axis=None, symmetric=False):
  x = jnp.asarray(x)
  qmin, qmax = qparams_mod.qrange(bits, symmetric)
  axes = qparams_mod.reduce_axes(x.ndim, axis)
  keep = axes is not None
  lo = jnp.min(x, axis=axes, keepdims=keep)
  hi = jnp.max(x, axis=axes, keepdims=keep)
  scale, zero_point = qparams_mod.qparams_from_range(lo, hi, qmin=qmin, qmax=qmax,
                                                     symmetric=symmetric)
  return scale, zero_point, qmin, qmax


def reference_batch_range(x):
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  return jnp.stack([jnp.min(x), jnp.max(x)])


def _bits(a):
  """An array's bytes, NaN payloads and signs aside (equal means the same numbers)."""
  a = np.asarray(a)
  if a.dtype.kind == "f":
    nan = np.isnan(a)
    return a.dtype, a.shape, nan.tobytes(), np.where(nan, 0, a).tobytes()
  return a.dtype, a.shape, a.tobytes()


def _same_tree(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(_bits(x) == _bits(y) for x, y in zip(la, lb))


def _count(jaxpr, inside=False, out=None):
  """``{(inside a cond, primitive): count}`` over a jaxpr and every jaxpr nested in it."""
  out = collections.Counter() if out is None else out
  for eqn in jaxpr.eqns:
    out[(inside, eqn.primitive.name)] += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _count(sub, inside or eqn.primitive.name == "cond", out)
  return out


# -- equal results -------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def _scores(shape, kind):
  s = RNG.normal(size=shape).astype(np.float32)
  if kind == "ties":
    s = RNG.integers(0, 3, size=shape).astype(np.float32)
  elif kind == "pruned":  # the wrapper scores pruned entries -inf
    s = np.where(RNG.random(shape) < 0.4, -np.inf, s).astype(np.float32)
  elif kind == "nan":
    s = np.where(RNG.random(shape) < 0.2, np.nan, s).astype(np.float32)
  return s


@pytest.mark.parametrize("shape,axis", [((37,), -1), ((3, 3, 8, 16), -2), ((5, 8), 0),
                                         ((4, 6, 8), 1), ((1,), 0), ((2, 0, 3), -1)])
@pytest.mark.parametrize("kind", ["normal", "ties", "pruned", "nan"])
def test_ranks_are_the_double_argsort_of_one_sort(shape, axis, kind):
  s = _scores(shape, kind)
  want = np.argsort(np.argsort(s, axis=axis, kind="stable"), axis=axis, kind="stable")
  assert _bits(masks_mod.ranks(jnp.asarray(s), axis)) == _bits(reference_ranks(s, axis))
  got = jax.jit(masks_mod.ranks, static_argnums=1)(jnp.asarray(s), axis)
  if kind != "nan":  # NumPy sorts NaN last too, but compare the NaN-free cases with it
    np.testing.assert_array_equal(got, want)
  assert _bits(got) == _bits(reference_ranks(s, axis))


def test_sorts_per_mask():
  # ranks, N:M groups and a top-k mask under masks.BISECT_FROM entries sort once
  s = jnp.asarray(_scores((3, 3, 8, 16), "normal"))
  for fn, sorts in ((lambda s: masks_mod.topk_mask(s, 100), 1),
                    (lambda s: masks_mod.nm_mask(s, 2, 4), 1), (lambda s: masks_mod.ranks(s), 1)):
    counts = _count(jax.make_jaxpr(fn)(s).jaxpr)
    assert counts[(False, "sort")] == sorts, counts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "zero", "nan", "inf"])
@pytest.mark.parametrize("shape,axis", [((3, 3, 4, 8), -1), ((16, 10), None),
                                         ((4, 5, 6), (1, 2))])
def test_symmetric_minmax_qparams_are_the_min_max_formula(dtype, kind, shape, axis):
  x = RNG.normal(size=shape) * 3
  x = {"positive": np.abs(x), "negative": -np.abs(x), "zero": np.zeros(shape),
       "nan": np.where(RNG.random(shape) < 0.1, np.nan, x),
       "inf": np.where(RNG.random(shape) < 0.1, -np.inf, x)}.get(kind, x)
  if jnp.issubdtype(dtype, jnp.integer):
    if kind in ("nan", "inf"):
      pytest.skip("no NaN or inf in integers")
    x = np.clip(np.round(x * 40), -128, 127)
  x = jnp.asarray(x.astype(np.float32)).astype(dtype)
  for bits in (4, 8):
    for symmetric in (True, False):
      got = qparams_mod.minmax_qparams(x, bits=bits, axis=axis, symmetric=symmetric)
      want = reference_minmax_qparams(x, bits=bits, axis=axis, symmetric=symmetric)
      assert all(_bits(a) == _bits(b) for a, b in zip(got, want))
      jitted = jax.jit(lambda x: qparams_mod.minmax_qparams(x, bits=bits, axis=axis,
                                                            symmetric=symmetric)[:2])(x)
      assert all(_bits(a) == _bits(b) for a, b in zip(jitted, want[:2]))


def test_symmetric_minmax_qparams_reduce_once():
  x = jnp.asarray(RNG.normal(size=(3, 3, 4, 8)), jnp.float32)
  counts = _count(jax.make_jaxpr(
      lambda x: qparams_mod.minmax_qparams(x, bits=4, axis=-1, symmetric=True))(x).jaxpr)
  assert counts[(False, "reduce_max")] == 1 and counts[(False, "reduce_min")] == 0


@pytest.mark.parametrize("kind", ["normal", "relu", "zero", "negzero", "nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_range_is_min_and_max_in_one_reduction(kind, dtype):
  shape = (4, 5, 5, 3)
  x = RNG.normal(size=shape)
  x = {"relu": np.maximum(x, 0), "zero": np.zeros(shape), "negzero": -np.zeros(shape),
       "nan": np.where(RNG.random(shape) < 0.05, np.nan, x),
       "inf": np.where(RNG.random(shape) < 0.05, np.inf, x),
       "-inf": np.where(RNG.random(shape) < 0.05, -np.inf, x)}.get(kind, x)
  x = jnp.asarray(x.astype(np.float32)).astype(dtype)
  assert _bits(layer_mod.batch_range(x)) == _bits(reference_batch_range(x))
  assert _bits(jax.jit(layer_mod.batch_range)(x)) == _bits(jax.jit(reference_batch_range)(x))
  counts = _count(jax.make_jaxpr(layer_mod.batch_range)(x).jaxpr)
  assert counts[(False, "reduce")] == 1 and not counts[(False, "reduce_min")]
  with pytest.raises(ValueError):  # an empty batch has no range, as before
    layer_mod.batch_range(jnp.zeros((0, 3)))


# -- a composed step, a few steps ----------------------------------------------------------

SHAPE = (8, 8, 1)


def _composed(steps=6):
  student, svars = create_model("cnn_mnist", num_classes=4, image_shape=SHAPE, seed=1)
  rng = np.random.default_rng(3)
  batches = [Batch(rng.normal(size=(8, *SHAPE)).astype(np.float32),
                   rng.integers(0, 4, 8).astype(np.int32), np.ones(8, np.float32))
             for _ in range(3)]
  x = batches[0].image
  comp = compose.build(
      student, svars, x, optimizer=optax.sgd(0.05, momentum=0.9), total_steps=8,
      prune=compose.PruneSpec(method="magnitude", sparsity=0.6, schedule="gradual", begin=0.0,
                              end=0.5, update_every=2),
      quant=compose.QuantSpec(weight_bits=4, act_bits=8, first_last_bits=8))
  state = comp.init_state(svars, x, calibration=[x])
  step = comp.make_train_step()
  out = []
  for i in range(steps):
    state, metrics = step(state, batches[i % 3])
    out.append((state, metrics))
  return out, step, batches[0]


def test_composed_step_equals_the_straightforward_formulas(monkeypatch):
  new, step, batch = _composed()
  with monkeypatch.context() as m:
    m.setattr(masks_mod, "ranks", reference_ranks)
    m.setattr(layer_mod, "minmax_qparams", reference_minmax_qparams)
    m.setattr(model_mod, "batch_range", reference_batch_range)
    old, _, _ = _composed()
  for (s, mt), (t, nt) in zip(new, old):
    assert _same_tree(s, t)
    assert _same_tree(mt, nt)
  assert float(new[-1][1]["sparsity"]) > 0.5
  # no sort outside the mask refresh's conditional; one per pruned weight in each of its
  # two branches (the schedule's value, and its final sparsity), where there were two each
  counts = _count(step.trace(new[0][0], batch).jaxpr.jaxpr)
  assert counts[(False, "sort")] == 0 and counts[(True, "sort")] == 2 * 2
  assert counts[(False, "reduce_min")] == 0  # symmetric weight scales: max|w| alone
