"""A character-level LSTM language model.

Token embedding, ``layers`` stacked LSTM layers and a Dense head. Each LSTM layer computes the
cell of flax's ``nn.LSTMCell`` (gates ``i, f, g, o`` in that order, sigmoid/tanh, zero initial
state) with two ``nn.Dense`` layers, so the compression trace finds, prunes and quantizes both:

- ``input``: the input kernel of all four gates, ``[width, 4 width]``, applied once to the whole
  sequence (it does not depend on the recurrence);
- ``cell/recurrent``: the recurrent kernel of all four gates (with the gate biases),
  ``[width, 4 width]``, applied to the hidden state at every step.

The time loop runs the cell under ``nn.scan`` (``scan=True``, the default: compiled once
whatever the sequence length) or as a Python loop (``scan=False``: one ``cell`` module called at
every step, so every call reaches the compression hooks directly, at a compile time that grows
with the length); both have the same parameters and compute the same function. Compressed under
``nn.scan``, the recurrent kernel is pruned and quantized like the others, but its input range is
the calibrated one throughout training, as no value leaves the scan through the hooks (see
:mod:`jaxcompress.quantization.model`). The gates are fused, two Dense layers instead of
``nn.LSTMCell``'s eight, so the unrolled loop stays compilable: with eight per step, a 64-step
fake-quant training step compiled for over 15 minutes on a 2-core CPU.

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
    scan: run the time loop under ``nn.scan`` (default) instead of a Python loop (same
      parameters, same function; see the module docstring).
  """
  vocab_size: int = 65
  width: int = 256
  layers: int = 1
  dropout: float = 0.0
  scan: bool = True

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
  scan: bool = True

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
