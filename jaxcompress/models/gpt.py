"""A character-level decoder-only transformer (GPT): the text teacher and student.

Pre-LayerNorm blocks of causal multi-head self-attention (flax's
``nn.MultiHeadDotProductAttention``: DenseGeneral query, key, value and output projections) and a
GELU MLP, learned token and position embeddings, a final LayerNorm and an untied Dense head. The
compressible layers are the token embedding (first), every attention and MLP kernel, and the head
(last); the position table is a plain parameter that stays float.

References:
  Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (GPT-2 layout);
  Karpathy, nanoGPT (https://github.com/karpathy/nanoGPT), the character-level Shakespeare setup.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)


class Block(nn.Module):
  """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; ``mask`` is the causal ``[B, 1, T, T]``."""
  width: int
  heads: int
  mlp_ratio: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    h = nn.LayerNorm(name="ln1")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dropout_rate=self.dropout, deterministic=not train,
        kernel_init=_INIT, name="attn")(h, h, mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.width, kernel_init=_INIT, name="fc")(h))
    h = nn.Dense(self.width, kernel_init=_INIT, name="proj")(h)
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class CharGPT(nn.Module):
  """Decoder-only transformer over token ids.

  Attributes:
    vocab_size: number of distinct tokens (the head's width).
    context: the longest sequence it takes (rows of the position table).
    width: model width (embedding size); a multiple of ``heads``.
    depth: number of blocks.
    heads: attention heads per block.
    mlp_ratio: hidden width of the MLP as a multiple of ``width``.
    dropout: dropout rate on embeddings, attention weights and residual branches, active only
      with ``train=True`` (it draws from the ``'dropout'`` rng).
  """
  vocab_size: int = 65
  context: int = 64
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, ids, train: bool = False):
    """Maps ``ids`` int32 ``[B, T]`` (``T <= context``) to next-token logits ``[B, T, V]``."""
    if ids.shape[-1] > self.context:
      raise ValueError(f"sequence length {ids.shape[-1]} exceeds the model's context "
                       f"{self.context}")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=_INIT, name="embed")(ids)
    pos = self.param("pos", _INIT, (self.context, self.width))
    x = nn.Dropout(self.dropout, deterministic=not train)(x + pos[:ids.shape[-1]])
    mask = nn.make_causal_mask(jnp.ones(ids.shape, jnp.int32))
    for i in range(self.depth):
      x = Block(self.width, self.heads, self.mlp_ratio, self.dropout, name=f"block{i}")(
          x, mask, train)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab_size, kernel_init=_INIT, name="head")(x)
