"""A character-level LSTM language model.

Token embedding, ``layers`` stacked LSTM layers and a Dense head. Each LSTM layer computes the
cell of flax's ``nn.LSTMCell`` (gates ``i, f, g, o`` in that order, sigmoid/tanh, zero initial
state) with two ``nn.Dense`` layers, so the compression trace finds, prunes and quantizes both:

- ``input``: the input kernel of all four gates, ``[width, 4 width]``, applied once to the whole
  sequence (it does not depend on the recurrence);
- ``cell/recurrent``: the recurrent kernel of all four gates (with the gate biases),
  ``[width, 4 width]``, applied to the hidden state at every step.

By default the time loop is a Python loop over the sequence (one ``cell`` module shared by every
step), not a scan: a layer called inside a lifted ``nn.scan`` cannot hand the quantizer its input
ranges (see :mod:`jaxcompress.quantization.model`), while a Python loop calls it directly. The
compiled program grows with the sequence length, hence the fused gates (``nn.LSTMCell``'s eight
gate Dense layers per step made a 64-step fake-quant training step compile for over 15 minutes on
a 2-core CPU) and the ``scan`` option: ``scan=True`` runs the same cell, with the same
parameters, under ``nn.scan`` (compiled once whatever the length), for the float model's own
training and evaluation; compress the model with ``scan=False``.

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
    scan: run the time loop under ``nn.scan`` (fast to compile, not compressible; same
      parameters) instead of a Python loop.
  """
  vocab_size: int = 65
  width: int = 256
  layers: int = 1
  dropout: float = 0.0
  scan: bool = False

  @nn.compact
  def __call__(self, ids, train: bool = False):
    """Maps ``ids`` int32 ``[B, T]`` to next-token logits ``[B, T, V]``."""
    x = nn.Embed(self.vocab_size, self.width, name="embed")(ids)
    for i in range(self.layers):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = LSTMLayer(self.width, self.scan, name=f"lstm{i}")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.vocab_size, name="head")(x)


class LSTMCell(nn.Module):
  """One step: ``((c, h), input gates [..., 4 width]) -> ((c, h), h)``."""
  width: int

  @nn.compact
  def __call__(self, carry, gates_in):
    c, h = carry
    i, f, g, o = jnp.split(gates_in + nn.Dense(4 * self.width, name="recurrent")(h), 4, axis=-1)
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


class LSTMLayer(nn.Module):
  """One LSTM layer: ``[B, T, D]`` -> hidden states ``[B, T, width]`` (see the module
  docstring)."""
  width: int
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    gates_in = nn.Dense(4 * self.width, use_bias=False, name="input")(x)
    zeros = jnp.zeros((*x.shape[:-2], self.width), x.dtype)
    if self.scan:
      cell = nn.scan(LSTMCell, variable_broadcast="params", split_rngs={"params": False},
                     in_axes=x.ndim - 2, out_axes=x.ndim - 2)(self.width, name="cell")
      return cell((zeros, zeros), gates_in)[1]
    cell = LSTMCell(self.width, name="cell")
    carry, outputs = (zeros, zeros), []
    for t in range(x.shape[-2]):
      carry, h = cell(carry, gates_in[..., t, :])
      outputs.append(h)
    return jnp.stack(outputs, axis=-2)
