"""The character-level GPT and LSTM: shapes, causality, dropout, the LSTM equations, registry
names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.models import CharGPT, CharLSTM, get_model

V, T, B = 11, 8, 2
MODELS = {
    "gpt": CharGPT(vocab_size=V, context=T, width=16, depth=2, heads=2, mlp_ratio=2,
                   dropout=0.1),
    "lstm": CharLSTM(vocab_size=V, width=12, layers=2, dropout=0.1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_vars(request):
  model = MODELS[request.param]
  ids = jnp.zeros((B, T), jnp.int32)
  return request.param, model, model.init(jax.random.key(0), ids)


def _ids(seed):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, V, jnp.int32)


def test_logits_shape_and_dtype(model_and_vars):
  _, model, variables = model_and_vars
  logits = jax.jit(model.apply)(variables, _ids(1))
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_causal_future_tokens_do_not_change_past_logits(model_and_vars):
  _, model, variables = model_and_vars
  apply = jax.jit(model.apply)
  ids = _ids(2)
  base = apply(variables, ids)
  for t in range(T - 1):
    # change every token after t to a different one; logits at positions <= t must not move
    changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 1 + t) % V)
    assert bool(jnp.any(changed != ids))
    out = apply(variables, changed)
    assert bool(jnp.array_equal(out[:, :t + 1], base[:, :t + 1])), t
    # and the next position does depend on the changed token (the model is not constant)
    assert not bool(jnp.allclose(out[:, t + 1], base[:, t + 1])), t


def test_dropout_only_in_training(model_and_vars):
  _, model, variables = model_and_vars
  ids = _ids(3)
  a = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply(variables, ids, train=True, rngs={"dropout": jax.random.key(2)})
  assert not bool(jnp.allclose(a, b))
  assert bool(jnp.array_equal(model.apply(variables, ids), model.apply(variables, ids)))


def test_gpt_parameters_and_context():
  model = MODELS["gpt"]
  params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  assert params["embed"]["embedding"].shape == (V, 16)
  assert params["pos"].shape == (T, 16)
  assert params["block0"]["attn"]["query"]["kernel"].shape == (16, 2, 8)
  assert params["block1"]["fc"]["kernel"].shape == (16, 32)
  assert params["head"]["kernel"].shape == (16, V)  # untied head
  with pytest.raises(ValueError, match="exceeds the model's context 8"):
    model.apply({"params": params}, jnp.zeros((1, T + 1), jnp.int32))


def test_lstm_matches_a_numpy_lstm():
  """The LSTM equations (gates i, f, g, o as flax's LSTMCell orders them), computed in NumPy."""
  model = MODELS["lstm"]
  ids = _ids(4)
  variables = model.init(jax.random.key(0), ids)
  p = jax.tree.map(np.asarray, variables["params"])
  sig = lambda z: 1 / (1 + np.exp(-z))
  x = p["embed"]["embedding"][np.asarray(ids)].astype(np.float64)
  for layer in ("lstm0", "lstm1"):
    w_in, rec = p[layer]["input"]["kernel"], p[layer]["cell"]["recurrent"]
    assert w_in.shape == rec["kernel"].shape == (12, 48) and "bias" not in p[layer]["input"]
    h = c = np.zeros((B, 12))
    outs = []
    for t in range(T):
      z = x[:, t] @ w_in + h @ rec["kernel"] + rec["bias"]
      i, f, g, o = np.split(z, 4, axis=-1)
      c = sig(f) * c + sig(i) * np.tanh(g)
      h = sig(o) * np.tanh(c)
      outs.append(h)
    x = np.stack(outs, 1)
  logits = x @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(model.apply(variables, ids), logits, rtol=1e-4, atol=1e-5)
  # the Python loop instead of nn.scan: same parameters, same function
  looped = model.clone(scan=False)
  assert jax.tree.structure(looped.init(jax.random.key(0), ids)) == jax.tree.structure(variables)
  np.testing.assert_allclose(looped.apply(variables, ids), logits, rtol=1e-4, atol=1e-5)


def test_registry_names():
  gpt = get_model("char_gpt", num_classes=V, width=16, heads=2, depth=1)
  lstm = get_model("char_lstm", num_classes=V)
  assert isinstance(gpt, CharGPT) and gpt.vocab_size == V and gpt.depth == 1
  assert isinstance(lstm, CharLSTM) and lstm.vocab_size == V
  assert isinstance(gpt, nn.Module)
