"""Compress a character-level transformer and an LSTM trained on Tiny Shakespeare.

The student is the teacher's architecture initialised from the teacher: 2:4 sparsity along the
reduction axis of every attention and MLP kernel (LSTM: every input and recurrent gate kernel),
4-bit weights and 8-bit inputs, the embedding and the head dense at 8 bits; fine-tuned once with
plain cross-entropy and once with token-level KD from the teacher, then exported.

Quick run (2-core CPU; trains both teachers first unless given, see docs/text.md):

  python -m experiments.shakespeare_distill --config=configs/shakespeare_distill.py:quick \
      --workdir=runs/shakespeare_quick

A teacher already trained by ``experiments.train_lm`` is reused with
``--config.teacher.checkpoint=runs/lm_quick`` (its vocabulary must equal the text's). Measured
with that teacher (docs/text.md, with the command): the KD transformer 1.7213 nats/char on test
(teacher 1.7277, plain fine-tuning 1.7286) at 9.1x fewer bytes than the float32 teacher, the KD
LSTM 1.9347 (teacher 1.9292) at 10.0x; both artifacts agree with their fake-quant models on
every test position. Full run (GPU):
``--config=configs/shakespeare_distill.py``.
"""

import ml_collections

from configs import shakespeare


def _teacher(model_name: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint = ""  # workdir of a finished train_lm run; "" -> train one into WORKDIR/<name>
  c.model = shakespeare.model_config(model_name)  # what is trained when checkpoint is ""
  c.train = shakespeare.train_config()
  return c


def _finetune() -> ml_collections.ConfigDict:
  """A ``train`` section for fine-tuning the compressed student."""
  c = shakespeare.train_config()
  c.steps = 2000  # fine-tuning steps (each run: plain and KD)
  c.learning_rate = 3e-4  # peak learning rate
  c.weight_decay = 0.0  # no decay: the student starts from the teacher's weights
  c.warmup_steps = 0
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None for the GPU-sized run, ``quick`` for the 2-core CPU one."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # initialisation, training-window and sampling seed
  c.data = shakespeare.data_config()
  c.teacher = _teacher("char_gpt")
  c.train = _finetune()
  c.sft = True  # also fine-tune the transformer with plain cross-entropy (no teacher)

  c.prune = ml_collections.ConfigDict()
  c.prune.method = "magnitude"  # none, magnitude, random, saliency, movement, lamp
  c.prune.structure = "nm"  # nm: keep n of every m weights along each kernel's reduction axis
  c.prune.sparsity = 0.5  # nm: any value > 0 switches it on (2:4 is always 50 %)
  c.prune.scope = "layer"  # unstructured only
  c.prune.schedule = "one_shot"  # masks from the first step: the teacher's weights are trained
  c.prune.begin = 0.0  # fraction of training where pruning starts
  c.prune.end = 0.5  # gradual only
  c.prune.update_every = 50  # steps between mask refreshes
  c.prune.n = 2  # N:M: keep n ...
  c.prune.m = 4  # ... of every m consecutive weights
  c.prune.norm = "l1"  # channel pruning only
  c.prune.rules = ()  # () = every kernel but the first and last layer (embedding, head)

  c.quant = ml_collections.ConfigDict()
  c.quant.weight_bits = 4  # bits of attention, MLP and LSTM kernels
  c.quant.act_bits = 8  # bits of each quantized layer's input
  c.quant.first_last_bits = 8  # bits of the embedding and the head
  c.quant.per_channel = True  # one weight scale per output channel
  c.quant.method = "minmax"  # minmax, lsq or kmeans
  c.quant.calibration = "minmax"  # input-range calibration: minmax, ema, percentile, mse
  c.quant.calibration_examples = 256  # training windows used to calibrate input ranges
  c.quant.scale_dtype = "float32"  # stored weight scales and folded BatchNorms: float32, or
  #                                  float16 (2 bytes per channel less, exact; docs/export.md)

  c.distill = ml_collections.ConfigDict()
  c.distill.temperature = 1.0  # KD temperature T at every position
  c.distill.alpha = 0.5  # loss = (1 - alpha) CE + alpha T^2 KL (the plain run uses alpha = 0)
  c.distill.feature_weight = 0.0  # no hint losses
  c.distill.feature_pairs = ()

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = ""  # text the samples start from ("" -> the first vocabulary character)
  c.sample.length = 300  # characters sampled from each model
  c.sample.temperature = 0.8  # softmax temperature of sampling

  c.lstm = ml_collections.ConfigDict()
  c.lstm.enabled = True  # also train, compress, distill and export a char LSTM
  c.lstm.context = 100  # the LSTM's windows (training and evaluation); 0 -> data.context
  c.lstm.teacher = _teacher("char_lstm")
  c.lstm.train = _finetune()  # its KD fine-tuning (same prune, quant and distill sections)

  if arg == "quick":
    shakespeare.apply_quick(c.data, c.teacher.model, c.teacher.train)
    lstm_data = shakespeare.data_config()
    shakespeare.apply_quick(lstm_data, c.lstm.teacher.model, c.lstm.teacher.train)
    c.lstm.context = lstm_data.context
    c.train.steps, c.lstm.train.steps = 600, 300
    for section in (c, c.lstm):
      section.train.learning_rate = 5e-4
      section.train.checkpoint_every_steps = 100
  elif arg:
    raise ValueError(f"configs/shakespeare_distill.py: unknown variant {arg!r}; valid: quick")
  return c
