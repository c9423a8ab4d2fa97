"""The optax pruning wrapper: exact zeros after updates, no recompiles, state layout, variants."""

from __future__ import annotations

import warnings

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.pruning import (PruneState, Score, apply_masks, apply_masks_ste, channels,
                                 constant_schedule, current_masks, n_of_m, one_shot_schedule,
                                 polynomial_schedule, prune, unstructured)

X = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
Y = jax.random.normal(jax.random.PRNGKey(1), (32, 4))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


MODEL = MLP()
PARAMS = MODEL.init(jax.random.PRNGKey(2), X)["params"]
KERNELS = ("Dense_0", "Dense_1", "Dense_2")


def loss(params):
  return jnp.mean((MODEL.apply({"params": params}, X) - Y) ** 2)


def make_step(opt, loss_fn=lambda params, opt_state: loss(params)):
  """A jitted train step; ``traces`` counts how often JAX traced it."""
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    grads = jax.grad(loss_fn)(params, state)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step, traces


def run(opt, steps, params=PARAMS, **kw):
  step, traces = make_step(opt, **kw)
  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, traces


def zeros(tree):
  return {k: int(np.sum(np.asarray(tree[k]["kernel"]) == 0)) for k in KERNELS}


def test_pruned_weights_stay_exactly_zero_for_100_steps_and_no_recompile():
  inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
  opt = prune(inner, polynomial_schedule(0.75, 0, 40), update_every=10)
  step, traces = make_step(opt)
  params, state = PARAMS, opt.init(PARAMS)
  for i in range(100):
    params, state = step(params, state)
    masks = state.masks
    for k in KERNELS:  # pruned entries are exactly 0 after every apply_updates
      assert np.all(np.asarray(params[k]["kernel"])[np.asarray(masks[k]["kernel"]) == 0] == 0.0)
  assert len(traces) == 1  # the second and later jitted steps reuse the first compilation
  assert int(state.count) == 100
  sizes = {k: PARAMS[k]["kernel"].size for k in KERNELS}
  assert zeros(params) == {k: round(0.75 * n) for k, n in sizes.items()}  # exact target
  assert float(loss(params)) < float(loss(PARAMS))  # it still trains


@pytest.mark.parametrize("make", [
    lambda s: constant_schedule(s), lambda s: one_shot_schedule(s, 2),
    lambda s: polynomial_schedule(s, 0, 6, power=1)])
@pytest.mark.parametrize("sparsity, n, pruned", [(0.7, 45, 31), (0.3, 95, 28)])
def test_a_run_ends_at_round_sparsity_times_n_where_float32_rounds_across_a_half(
    make, sparsity, n, pruned):
  # By hand: 0.7 * 45 is 31.499999999999996 in Python (round: 31), 31.5 from float32's
  # 0.69999999 (round half to even: 32); 0.3 * 95 is 28.499999999999996 (28), 28.500001 (29).
  assert round(sparsity * n) == pruned
  w = np.random.default_rng(3).permutation(np.arange(1, n + 1)).astype(np.float32)
  params = {"w": {"kernel": jnp.asarray(w.reshape(1, n))}}
  opt = prune(optax.sgd(0.0), make(sparsity), rules=[(".*", True)])
  params, _, _ = run(opt, 8, params, loss_fn=lambda p, s: jnp.sum(p["w"]["kernel"]))
  kept = np.asarray(params["w"]["kernel"]).ravel() != 0
  np.testing.assert_array_equal(kept, w > pruned)  # the `pruned` smallest |w| are 0


def test_masks_refresh_only_every_update_every_steps():
  # Sparsity rises every step, but masks follow it only on steps 0, 5, 10, ...
  opt = prune(optax.sgd(0.01), polynomial_schedule(0.5, 0, 10, power=1), update_every=5)
  step, _ = make_step(opt)
  params, state = PARAMS, opt.init(PARAMS)
  n = PARAMS["Dense_1"]["kernel"].size
  seen = []
  for _ in range(11):
    params, state = step(params, state)
    seen.append(zeros(state.masks)["Dense_1"])
  # schedule(t) = 0.05 t: steps 0-4 use s(0) = 0, steps 5-9 use s(5) = 0.25, step 10 s(10) = 0.5.
  assert seen == [0] * 5 + [round(0.25 * n)] * 5 + [round(0.5 * n)]


def test_one_shot_keeps_dense_until_its_step():
  opt = prune(optax.sgd(0.01), one_shot_schedule(0.5, 3))
  params, state, _ = run(opt, 3)
  assert zeros(params)["Dense_1"] == 0
  params, state, _ = run(opt, 4)
  assert zeros(params)["Dense_1"] == 128


def test_composes_with_chain_and_checkpoints():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    prune(optax.adam(1e-2), constant_schedule(0.6),
                          structure=unstructured("global")))
  params, state, _ = run(opt, 3)
  restored = flax.serialization.from_bytes(opt.init(PARAMS), flax.serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  step, _ = make_step(opt)
  for _ in range(3):
    params, restored = step(params, restored)
  masks = current_masks(restored)
  total = sum(PARAMS[k]["kernel"].size for k in KERNELS)
  assert sum(zeros(masks).values()) == round(0.6 * total)
  assert sum(zeros(params).values()) == round(0.6 * total)


def test_state_layout():
  opt = prune(optax.sgd(0.1, momentum=0.9), constant_schedule(0.5), score="movement")
  state = opt.init(PARAMS)
  assert isinstance(state, PruneState)
  assert state.count.dtype == jnp.int32 and int(state.count) == 0
  assert jax.tree.structure(state.masks) == jax.tree.structure(PARAMS)
  assert len(state.score_sums) == 3  # one running sum per selected kernel
  assert isinstance(state.inner_state, tuple)  # sgd's own state, untouched


def test_movement_sums_raw_gradients_before_inner():
  # inner scales updates by 0.5; the score must use the raw gradients: sum_t -w_t * g_t.
  opt = prune(optax.chain(optax.scale(0.5), optax.sgd(0.1)), constant_schedule(0.5),
              score="movement", update_every=1000)
  params, state = PARAMS, opt.init(PARAMS)
  expected = np.zeros(PARAMS["Dense_1"]["kernel"].shape)
  update = jax.jit(opt.update)
  for _ in range(3):
    grads = jax.grad(loss)(params)
    expected += -np.asarray(params["Dense_1"]["kernel"]) * np.asarray(grads["Dense_1"]["kernel"])
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(state.score_sums[1], expected, rtol=1e-5, atol=1e-7)


def test_saliency_masks_from_raw_gradients():
  opt = prune(optax.scale(0.0), constant_schedule(0.5), score="saliency")
  grads = jax.grad(loss)(PARAMS)
  _, state = opt.update(grads, opt.init(PARAMS), PARAMS)
  w, g = np.asarray(PARAMS["Dense_1"]["kernel"]), np.asarray(grads["Dense_1"]["kernel"])
  expected = np.ones(w.size)
  expected[np.argsort(np.abs(w * g).ravel(), kind="stable")[:128]] = 0
  np.testing.assert_array_equal(state.masks["Dense_1"]["kernel"], expected.reshape(w.shape))


@pytest.mark.parametrize("score,structure,grads,pruned", [
    # movement (-sum w g): entry 0 goes first; then entry 1's sum (-6) falls below entry 0's
    # frozen -1, which must not bring entry 0 back
    ("movement", None, [[[1.0, 0.0], [0.0, 0.0]], [[1.0, 6.0], [0.0, 0.0]]], [[0, 1], [1, 1]]),
    # the same by output channel (L1 of the sums): channel 0 first, then channel 1 sums to -6
    ("movement", "channels", [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]],
     [[0, 1], [0, 1]]),
    # saliency |w g|: entry 3 goes first; then entry 0's zero gradient ties its score 0
    ("saliency", None, [[[1.0, 1.0], [1.0, 0.5]], [[0.0, 1.0], [1.0, 1.0]]], [[1, 1], [1, 0]]),
])
def test_a_pruned_weight_stays_pruned_whatever_its_score(score, structure, grads, pruned):
  opt = prune(optax.sgd(0.1), constant_schedule(0.25 if structure is None else 0.5),
              score=score, structure=channels("l1") if structure else None)
  params = {"k": jnp.ones((2, 2))}
  state = opt.init(params)
  for g in grads:
    updates, state = opt.update({"k": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(state.masks["k"], pruned)
  assert np.all(np.asarray(params["k"])[np.asarray(pruned) == 0] == 0)


def test_a_pruned_weight_stays_pruned_when_a_kept_one_reaches_zero():
  # Magnitude: entry 1 (0) is pruned at the first refresh; that step's update moves entry 0 from
  # 0.1 to exactly 0, a tie at |w| = 0 that its lower flat index would win and so free entry 1.
  opt = prune(optax.sgd(1.0), constant_schedule(0.25))
  params = {"k": jnp.asarray([[0.1, 0.0, 0.5, 0.6]])}
  state = opt.init(params)
  for g in ([[0.1, 0.3, 0.0, 0.0]], [[0.0, 0.3, 0.0, 0.0]], [[0.0, 0.3, 0.0, 0.0]]):
    updates, state = opt.update({"k": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(state.masks["k"], [[1, 0, 1, 1]])
  np.testing.assert_array_equal(params["k"], np.float32([[0.0, 0.0, 0.5, 0.6]]))


def test_straight_through_keeps_dense_weights():
  opt = prune(optax.sgd(0.05), constant_schedule(0.5), straight_through=True)
  ste_loss = lambda p, s: loss(apply_masks_ste(p, current_masks(s)))
  params, state, traces = run(opt, 5, loss_fn=ste_loss)
  assert len(traces) == 1
  masks = current_masks(state)
  assert zeros(masks)["Dense_1"] == 128
  assert zeros(params)["Dense_1"] == 0  # dense weights are kept and keep training
  pruned = np.asarray(masks["Dense_1"]["kernel"]) == 0
  moved = np.asarray(params["Dense_1"]["kernel"]) != np.asarray(PARAMS["Dense_1"]["kernel"])
  assert np.any(moved[pruned])  # straight-through gradient reached the pruned entries


def test_nm_structure_and_random_score():
  opt = prune(optax.sgd(0.01), constant_schedule(0.5), structure=n_of_m(2, 4), score="random")
  params, state, _ = run(opt, 2)
  # Groups of 4 consecutive input rows of the [in, out] kernel, per output column.
  mask = np.asarray(state.masks["Dense_1"]["kernel"]).T.reshape(-1, 4)
  assert np.all(mask.sum(-1) == 2)
  assert np.all(np.asarray(params["Dense_1"]["kernel"]).T.reshape(-1, 4)[mask == 0] == 0)


def test_random_score_prunes_the_same_weights_at_every_refresh():
  # lr 0: only pruning changes the weights. A new draw at each refresh would zero another half
  # each time (0.5, 0.75, 0.88, ... of the weights); one draw keeps exactly half.
  opt = prune(optax.sgd(0.0), constant_schedule(0.5), score="random", check_updates=False)
  params, state, _ = run(opt, 5)
  for k in KERNELS:
    kernel = np.asarray(params[k]["kernel"])
    assert np.sum(kernel == 0) == kernel.size // 2, k
  # A growing sparsity prunes a superset: the masks of 30 % lie inside those of 60 %.
  ramp = prune(optax.sgd(0.0), polynomial_schedule(0.6, 0, 4, initial_sparsity=0.3),
               score="random", check_updates=False)
  step, _ = make_step(ramp)
  masks, params, state = [], PARAMS, ramp.init(PARAMS)
  for _ in range(6):
    params, state = step(params, state)
    masks.append(np.asarray(current_masks(state)["Dense_1"]["kernel"]))
  assert (1 - masks[0]).mean() == pytest.approx(0.3, abs=0.01)
  assert (1 - masks[-1]).mean() == pytest.approx(0.6, abs=0.01)
  assert np.all(masks[-1] <= masks[0])
  assert np.sum(np.asarray(params["Dense_1"]["kernel"]) == 0) == np.sum(masks[-1] == 0)


def test_custom_score():
  # Keep the smallest weights instead: a user-defined score, one line.
  opt = prune(optax.sgd(0.0), constant_schedule(0.5), score=Score(lambda w, g, k: -jnp.abs(w)))
  _, state = opt.update(jax.grad(loss)(PARAMS), opt.init(PARAMS), PARAMS)
  w, mask = np.abs(np.asarray(PARAMS["Dense_1"]["kernel"])), state.masks["Dense_1"]["kernel"]
  assert w[np.asarray(mask) == 1].max() <= w[np.asarray(mask) == 0].min()


def test_nnx_state_params():
  graphdef, params = nnx.split(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Param)
  nnx_loss = lambda p, s: jnp.mean((nnx.merge(graphdef, p)(X) - 1.0) ** 2)
  opt = prune(optax.sgd(0.1, momentum=0.9), constant_schedule(0.25))
  params, state, _ = run(opt, 3, params=params, loss_fn=nnx_loss)
  assert isinstance(params, nnx.State) and isinstance(state.masks, nnx.State)
  assert int(np.sum(np.asarray(params["kernel"][...]) == 0)) == 16
  assert np.all(np.asarray(params["bias"][...]) != 0)  # biases are not pruned


def test_nnx_optimizer_straight_through_masks_apply_to_its_params():
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  tx = prune(optax.sgd(0.1, momentum=0.9), constant_schedule(0.5), straight_through=True)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):  # the forward on masked weights, the gradient to the dense ones
      graphdef, params, rest = nnx.split(m, nnx.Param, ...)
      masked = apply_masks_ste(params, current_masks(opt.opt_state))  # nnx's OptVariables
      return jnp.mean((nnx.merge(graphdef, masked, rest)(X) - Y) ** 2)
    opt.update(model, nnx.grad(loss_fn)(model))

  step(model, opt)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  step(model, opt)  # masks from the weights it was given
  params = nnx.state(model, nnx.Param)
  pruned = apply_masks(params, current_masks(opt.opt_state))
  for i, n in ((0, 128), (2, 64)):
    kernel = before["layers"][i]["kernel"]
    oracle = np.argsort(np.abs(kernel).ravel(), kind="stable")[:n // 2]
    assert np.all(np.asarray(params["layers"][i]["kernel"][...]) != 0)  # dense weights train on
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(
        pruned["layers"][i]["kernel"][...]).ravel() == 0), np.sort(oracle))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(schedule=0.5), "prune.schedule must be a step -> sparsity function, got 0.5"),
    (dict(update_every=0), "prune.update_every must be an integer >= 1, got 0"),
    (dict(score="l0"), "prune.score must be one of lamp, magnitude, movement, random, saliency"),
    (dict(rules=[("[", True)]), "prune.rules[0] regex '[' does not compile"),
    (dict(structure="nm"), "prune.structure must be a masker: unstructured(scope), kernels(scope, "
     "norm), channels(norm) or n_of_m(n, m) from jaxcompress.pruning, got 'nm'"),
])
def test_bad_arguments_fail_at_construction(kwargs, needle):
  kwargs = {"schedule": constant_schedule(0.5), **kwargs}
  with pytest.raises(ConfigError) as err:
    prune(optax.sgd(0.1), **kwargs)
  assert needle in str(err.value)


def test_update_without_params():
  opt = prune(optax.sgd(0.1), constant_schedule(0.5))
  with pytest.raises(ConfigError, match="update needs params"):
    opt.update(PARAMS, opt.init(PARAMS))


def test_updates_not_like_params_are_one_line():
  opt = prune(optax.sgd(0.1), constant_schedule(0.5), score="saliency")
  with pytest.raises(ConfigError, match=r"^updates must be a tree like params \(jax.grad of the "
                     r"loss with respect to params\), got another: ValueError: Dict key mismatch"):
    opt.update({"params": PARAMS}, opt.init(PARAMS), PARAMS)  # grads of the whole variables


def _updates_warnings(opt, steps=3):
  """Runs ``steps`` jitted updates; returns the params and the pruning-order warnings raised."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    params, state, _ = run(opt, steps)
    jax.effects_barrier()  # host callbacks of the jitted steps have run
  return params, state, [w for w in caught if "prune:" in str(w.message)]


def test_transform_after_prune_in_a_chain_warns_one_line():
  # scale(0.5) halves the wrapper's "-p" for pruned weights: they end at p / 2, not 0.
  opt = optax.chain(prune(optax.adam(1e-3), constant_schedule(0.5)), optax.scale(0.5))
  params, _, caught = _updates_warnings(opt)
  assert zeros(params)["Dense_1"] == 0  # the guarantee is broken here ...
  assert caught, "a transform after prune() went unnoticed"  # ... and the user is told so
  msg = str(caught[0].message)
  assert "\n" not in msg and "last" in msg and "optax.chain" in msg


def test_without_the_check_misuse_is_silent_and_the_step_has_no_host_callback():
  opt = optax.chain(prune(optax.adam(1e-3), constant_schedule(0.5), check_updates=False),
                    optax.scale(0.5))
  params, _, caught = _updates_warnings(opt)
  assert zeros(params)["Dense_1"] == 0 and not caught  # the same breakage, not reported
  for check in (True, False):
    opt = prune(optax.adam(1e-3), constant_schedule(0.5), check_updates=check)
    step, _ = make_step(opt)
    text = step.lower(PARAMS, opt.init(PARAMS)).as_text()
    assert ("callback" in text) == check


@pytest.mark.parametrize("make", [
    # prune last in a chain: the transform before it only changes the gradients it receives
    lambda s: optax.chain(optax.scale(0.5), prune(optax.adam(1e-2), s)),
    # chain / masked / multi_transform inside the wrapper
    lambda s: prune(optax.chain(
        optax.masked(optax.add_decayed_weights(1e-2),
                     lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.sgd(0.05, momentum=0.9)), s),
    lambda s: prune(optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.sgd(0.05)},
        lambda p: {k: jax.tree.map(lambda _: "a" if k == "Dense_0" else "b", v)
                   for k, v in p.items()}), s),
    # the wrapper inside optax.masked (outermost for the leaves it sees)
    lambda s: optax.masked(prune(optax.adam(1e-2), s),
                           lambda p: jax.tree.map(lambda _: True, p)),
])
def test_outermost_wrapper_composes_with_chain_masked_multi_transform(make):
  params, _, caught = _updates_warnings(make(constant_schedule(0.5)), steps=4)
  assert not caught
  sizes = {k: PARAMS[k]["kernel"].size for k in KERNELS}
  assert zeros(params) == {k: n // 2 for k, n in sizes.items()}  # exactly 0, exact count
  moved = np.asarray(params["Dense_1"]["kernel"]) != np.asarray(PARAMS["Dense_1"]["kernel"])
  assert moved.sum() == sizes["Dense_1"]  # kept weights trained, pruned ones set to 0


def test_schedule_free_eval_params_need_the_masks_as_documented():
  # The wrapper zeroes the iterate it updates (y); the evaluation point mixes in the inner
  # optimizer's own z, which it does not mask (docs/pruning.md gives the recipe).
  params, state, _ = run(prune(optax.contrib.schedule_free_adamw(1e-2, weight_decay=0.1),
                               constant_schedule(0.5)), 4)
  assert zeros(params) == {k: PARAMS[k]["kernel"].size // 2 for k in KERNELS}
  raw = optax.contrib.schedule_free_eval_params(state.inner_state, params)
  assert all(v == 0 for v in zeros(raw).values())
  masked = apply_masks(raw, current_masks(state))
  assert zeros(masked) == zeros(params)


def test_multisteps_and_apply_if_finite_around_it_count_applied_updates():
  # 3 micro-steps per update; the non-finite one is skipped whole, so MultiSteps sees 8 of the 9
  # and applies 2 updates: the schedule and the movement score's sums count those 2, not 9.
  opt = optax.apply_if_finite(optax.MultiSteps(
      prune(optax.adam(1e-2), polynomial_schedule(0.5, 0, 4), score="movement"), 3), 5)
  state, params = opt.init(PARAMS), PARAMS
  for i in range(9):
    grads = jax.grad(loss)(params)
    if i == 3:
      grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  inner = state.inner_state.inner_opt_state
  assert int(inner.count) == 2
  assert all(np.isfinite(np.asarray(s)).all() for s in inner.score_sums)
  # Zhu & Gupta at count 1 (the last refresh): 0.5 - 0.5 * (1 - 1/4)^3 = 0.2890625 of each layer.
  assert zeros(params) == {k: round(0.2890625 * PARAMS[k]["kernel"].size) for k in KERNELS}
