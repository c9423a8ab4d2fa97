"""A character-level LSTM language model.

Token embedding, ``layers`` stacked LSTM layers and a Dense head. Each LSTM layer computes the
cell of flax's ``nn.LSTMCell`` (gates ``i, f, g, o`` in that order, sigmoid/tanh, zero initial
state) with two ``nn.Dense`` layers, so the compression trace finds, prunes and quantizes both:

- ``input``: the input kernel of all four gates, ``[width, 4 width]``, applied once to the whole
  sequence (it does not depend on the recurrence);
- ``recurrent``: the recurrent kernel of all four gates (with the gate biases),
  ``[width, 4 width]``, applied to the hidden state at every step.

The time loop is a Python loop over the sequence (one ``recurrent`` module shared by every step),
not ``nn.RNN``: a layer called inside a lifted ``nn.scan`` cannot hand the quantizer its input
ranges (see :mod:`jaxcompress.quantization.model`), while a Python loop calls it directly. The
compiled program grows with the sequence length, so the gates are fused into one Dense per step:
``nn.LSTMCell``'s eight gate Dense layers per step, each with a fake-quantized input, made the
compile of a 64-step training step take over 15 minutes on a 2-core CPU.

References:
  Hochreiter & Schmidhuber, "Long Short-Term Memory", 1997; Karpathy, char-rnn, 2015.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class CharLSTM(nn.Module):
  """LSTM over token ids.

  Attributes:
    vocab_size: number of distinct tokens.
    width: embedding size and hidden size of every LSTM layer.
    layers: number of stacked LSTM layers.
    dropout: dropout rate between layers (after the embedding, between LSTMs, before the head),
      active only with ``train=True`` (``'dropout'`` rng).
  """
  vocab_size: int = 65
  width: int = 256
  layers: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, ids, train: bool = False):
    """Maps ``ids`` int32 ``[B, T]`` to next-token logits ``[B, T, V]``."""
    x = nn.Embed(self.vocab_size, self.width, name="embed")(ids)
    for i in range(self.layers):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = LSTMLayer(self.width, name=f"lstm{i}")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.vocab_size, name="head")(x)


class LSTMLayer(nn.Module):
  """One LSTM layer: ``[..., T, D]`` -> hidden states ``[..., T, width]`` (see the module
  docstring)."""
  width: int

  @nn.compact
  def __call__(self, x):
    gates_in = nn.Dense(4 * self.width, use_bias=False, name="input")(x)
    recurrent = nn.Dense(4 * self.width, name="recurrent")
    c = h = jnp.zeros((*x.shape[:-2], self.width), x.dtype)
    outputs = []
    for t in range(x.shape[-2]):
      i, f, g, o = jnp.split(gates_in[..., t, :] + recurrent(h), 4, axis=-1)
      c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
      h = nn.sigmoid(o) * jnp.tanh(c)
      outputs.append(h)
    return jnp.stack(outputs, axis=-2)
