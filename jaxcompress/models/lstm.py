"""A character-level LSTM language model.

Token embedding, ``layers`` stacked ``nn.RNN`` over flax's ``nn.LSTMCell`` (whose input and
recurrent gate kernels are ``nn.Dense`` layers, so the compression trace finds and compresses
each of them), and a Dense head.

References:
  Hochreiter & Schmidhuber, "Long Short-Term Memory", 1997; Karpathy, char-rnn, 2015.
"""

from __future__ import annotations

import flax.linen as nn


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
      x = nn.RNN(nn.LSTMCell(self.width, name=f"lstm{i}"))(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.vocab_size, name="head")(x)
