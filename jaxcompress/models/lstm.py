"""A character-level LSTM language model.

Token embedding, ``layers`` stacked flax ``nn.LSTMCell`` s and a Dense head. Each cell's input and
recurrent gate kernels are ``nn.Dense`` layers (``ii, if, ig, io`` on the input, ``hi, hf, hg, ho``
on the hidden state), so the compression trace finds, prunes and quantizes each of them.

The time loop is a Python loop over the sequence (the cell's modules are shared by every step),
not ``nn.RNN``: a layer called inside a lifted ``nn.scan`` cannot hand the quantizer its input
ranges (see :mod:`jaxcompress.quantization.model`), while a Python loop calls every gate directly.
The price is a compile time that grows with the sequence length.

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
    """Maps ``ids`` int32 ``[B, T]`` to next-token logits ``[B, T, V]`` (zero initial state)."""
    x = nn.Embed(self.vocab_size, self.width, name="embed")(ids)
    for i in range(self.layers):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      cell = nn.LSTMCell(self.width, name=f"lstm{i}")
      zeros = jnp.zeros((*x.shape[:-2], self.width), x.dtype)
      carry, outputs = (zeros, zeros), []
      for t in range(x.shape[-2]):
        carry, h = cell(carry, x[..., t, :])
        outputs.append(h)
      x = jnp.stack(outputs, axis=-2)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.vocab_size, name="head")(x)
