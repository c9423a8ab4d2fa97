"""A character-level language model trained from scratch on Tiny Shakespeare.

Quick run (2-core CPU): a 4-layer, 128-wide transformer (nanoGPT's CPU model, 0.8M parameters)
on windows of 64 characters; 2,000 steps of 32 windows (nanoGPT: 2,000 of 12, 1.88 nats/char on
val111k). Measured: 1.6790 nats/char on val111k, 1.7277 on test (docs/text.md).

  python -m experiments.train_lm --config=configs/shakespeare.py:quick --workdir=runs/lm_quick

Full run (GPU): nanoGPT's ``shakespeare_char`` model, 6 layers, 6 heads, 384 wide, context 256,
dropout 0.2, 5,000 steps of 64 windows (nanoGPT reports 1.4697 on its validation split).

  python -m experiments.train_lm --config=configs/shakespeare.py --workdir=runs/lm

The LSTM: ``:lstm`` (GPU: 2 layers, 512 wide, windows of 100 characters) or ``:lstm,quick`` (CPU:
1 layer, 256 wide, windows of 16) selects ``model.name=char_lstm``. The text is ``data.path``,
else ``$JAXCOMPRESS_TEXT_DIR/tiny_shakespeare/input.txt``.
"""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """The ``data`` section."""
  c = ml_collections.ConfigDict()
  c.path = ""  # the text file; "" -> $JAXCOMPRESS_TEXT_DIR/tiny_shakespeare/input.txt, else
  #              ~/.cache/jaxcompress/text/tiny_shakespeare/input.txt
  c.context = 256  # characters the model sees (transformer: its position table)
  c.batch_size = 64  # training windows per step, at random offsets of the train split
  c.eval_batch_size = 64  # evaluation windows per batch (consecutive, non-overlapping)
  return c


def model_config(name: str = "char_gpt") -> ml_collections.ConfigDict:
  """The ``model`` section: the transformer's fields and the LSTM's (each reads its own)."""
  c = ml_collections.ConfigDict()
  c.name = name  # char_gpt (decoder-only transformer) or char_lstm
  c.width = 384  # embedding width (transformer) / embedding and hidden size (LSTM)
  c.depth = 6  # transformer blocks
  c.heads = 6  # attention heads per block (divides width)
  c.mlp_ratio = 4  # transformer MLP hidden width as a multiple of width
  c.layers = 2  # stacked LSTM layers
  c.dropout = 0.2  # dropout rate while training
  if name == "char_lstm":
    c.width = 512
  return c


def train_config() -> ml_collections.ConfigDict:
  """The ``train`` section: AdamW, warmup then cosine decay, lengths in steps."""
  c = ml_collections.ConfigDict()
  c.steps = 5000  # optimizer steps
  c.optimizer = "adamw"  # adamw or sgd
  c.learning_rate = 1e-3  # peak learning rate
  c.weight_decay = 0.1  # decoupled weight decay on kernels and embeddings only
  c.schedule = "cosine"  # cosine, step or constant
  c.warmup_steps = 100  # linear warmup from 0
  c.log_every_steps = 50  # metrics.jsonl and progress-bar interval
  c.checkpoint_every_steps = 500  # checkpoint interval (and always at the end)
  c.eval_every_epochs = 1  # validation loss every this many epochs (len(train) / (batch x context)
  #                          steps) into metrics.jsonl
  return c


def apply_quick(data, model, train) -> None:
  """Shrinks the ``data``, ``model`` and ``train`` sections in place to the 2-core CPU runs.

  The LSTM (its cell under ``nn.scan``) trains on windows of 16 characters, where its step takes
  about as long as the transformer's on 64.
  """
  data.batch_size = 32
  model.dropout = 0.0
  if model.name == "char_lstm":
    data.context = 16
    model.width, model.layers = 256, 1
    train.steps = 1000
    train.learning_rate = 3e-3
  else:
    data.context = 64
    model.width, model.depth, model.heads = 128, 4, 4
    train.steps = 2000
  train.warmup_steps = 100
  train.checkpoint_every_steps = 250


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (GPU transformer), ``quick``, ``lstm``, ``lstm,quick``."""
  variants = set(arg.split(",")) if arg else set()
  if variants - {"quick", "lstm"}:
    raise ValueError(f"configs/shakespeare.py: unknown variant {arg!r}; valid: quick, lstm, "
                     "lstm,quick")
  c = ml_collections.ConfigDict()
  c.seed = 0  # initialisation and training-window seed
  c.data = data_config()
  c.model = model_config("char_lstm" if "lstm" in variants else "char_gpt")
  c.train = train_config()
  if "lstm" in variants:
    c.data.context = 100  # the LSTM's time loop is unrolled: shorter windows compile faster
  if "quick" in variants:
    apply_quick(c.data, c.model, c.train)
  return c
