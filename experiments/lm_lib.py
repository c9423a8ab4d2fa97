"""What the character-level language-model jobs share.

Building ``char_gpt`` / ``char_lstm`` from a config's ``model`` section, the optimizer and loop
specs of a ``train`` section counted in steps, evaluation in nats and bits per character over
every position of a split, seeded sampling, and the trained model a workdir keeps
(``weights.msgpack`` + ``vocab.json`` + ``config.json``) so a later job can load it.
"""

from __future__ import annotations

import hashlib
import numbers
import os

import jax
import ml_collections
import numpy as np

from jaxcompress import parallel, progress, text
from jaxcompress.checkpoint import read_json, write_json
from jaxcompress.errors import ConfigError, check_range, invalid, unknown
from jaxcompress.models import get_model
from jaxcompress.models.functional import functional
from jaxcompress.models.weights import load_weights, save_weights
from jaxcompress.optim import OptimizerSpec
from jaxcompress.steps import evaluate
from jaxcompress.train import LoopSpec

# The factory arguments each model takes from the config's ``model`` section (``context`` comes
# from ``data.context``).
MODEL_FIELDS = {"char_gpt": ("width", "depth", "heads", "mlp_ratio", "dropout"),
                "char_lstm": ("width", "layers", "dropout")}
WEIGHTS, VOCAB, CONFIG = "weights.msgpack", "vocab.json", "config.json"


def check_model(model, field: str = "model") -> None:
  """Raises one line for an unknown model name or a bad value of a model field.

  ``width``, ``depth``, ``heads``, ``mlp_ratio`` and ``layers`` must be integers >= 1 and
  ``dropout`` in [0, 1), also those of the other model that the section holds (a config holds
  them all: ``layers=0`` beside a transformer is a mistake, not ignored), a transformer's
  ``width`` a multiple of ``heads``, and the parameters (:func:`min_params`) must fit this
  machine's memory in float32.
  """
  if model.name not in MODEL_FIELDS:
    raise unknown(f"{field}.name", model.name, MODEL_FIELDS)
  others = tuple(name for names in MODEL_FIELDS.values() for name in names if name in model)
  for name in dict.fromkeys(MODEL_FIELDS[model.name] + others):
    value = model[name]
    if name == "dropout":
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(f"{field}.dropout", value, "a number in [0, 1)")
      check_range(f"{field}.dropout", value, 0.0, 1.0)
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise invalid(f"{field}.{name}", value, "an integer >= 1")
  if model.name == "char_gpt" and model.width % model.heads:
    raise invalid(f"{field}.width", model.width, f"a multiple of {field}.heads={model.heads}")
  n, memory = min_params(model), host_memory()
  if n * 4 > memory:  # Python ints: no overflow, however large the fields
    grow = [k for k in MODEL_FIELDS[model.name] if k not in ("heads", "dropout")]
    raise ConfigError(f"{field}: a {model.name} of {', '.join(f'{k}={model[k]}' for k in grow)} "
                      f"has at least {n:.3g} parameters, {n * 4 / 2**30:.3g} GiB in float32, more "
                      f"than this machine's {memory / 2**30:.3g} GiB of memory; lower "
                      + " or ".join(f"{field}.{k}" for k in grow))


def min_params(model) -> int:
  """Parameters of the ``model`` section's model but those of its vocabulary and context (the
  embedding, the position table and the head): a lower bound, exact as a Python int."""
  w = int(model.width)  # a NumPy integer would overflow
  if model.name == "char_gpt":  # a block: attention 4 (w^2 + w), 2 LayerNorms, the MLP
    r = int(model.mlp_ratio)
    return int(model.depth) * ((4 + 2 * r) * w * w + (9 + r) * w) + 2 * w
  return int(model.layers) * (8 * w * w + 4 * w)  # input and recurrent kernels, recurrent bias


def host_memory() -> int:
  """Bytes of this machine's physical memory."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sample(sample, field: str = "sample") -> None:
  """Raises one line for a negative ``length``, one longer than memory holds (an 8-byte id per
  character) or a ``temperature`` that is not a positive normal float32."""
  if isinstance(sample.length, bool) or not isinstance(sample.length, numbers.Integral) or (
      sample.length < 0):
    raise invalid(f"{field}.length", sample.length, "an integer >= 0")
  memory = host_memory()
  if sample.length * 8 > memory:
    raise invalid(f"{field}.length", sample.length, f"at most {memory // 8}, the characters this "
                  f"machine's {memory / 2**30:.3g} GiB of memory holds (one 8-byte id each)")
  check_temperature(sample.temperature, f"{field}.temperature")


def check_temperature(temperature, field: str = "sample.temperature") -> None:
  """Raises one line unless the sampling ``temperature`` is a positive normal float32 (the
  logits are divided by it in float32: a subnormal one may be flushed to 0, a larger one is
  inf)."""
  lo, hi = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
  if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
      or not lo <= temperature <= hi):
    raise invalid(field, temperature, f"a positive normal float32, in [{lo}, {hi}]")


def build_model(model, vocab_size: int, context: int, seed: int, field: str = "model"):
  """``(module, fresh variables)`` of the ``model`` config section for ``vocab_size`` tokens."""
  check_model(model, field)
  kwargs = {k: model[k] for k in MODEL_FIELDS[model.name]}
  if model.name == "char_gpt":
    kwargs["context"] = context
  module = get_model(model.name, vocab_size, field=f"{field}.name", **kwargs)
  sample = np.zeros((1, context), np.int32)
  variables = jax.jit(functional(module).init)(jax.random.key(seed), sample)
  return module, jax.device_get(variables)


def check_train(train, field: str = "train") -> None:
  """Raises one line, naming the field under ``field``, for negative ``steps``/``warmup_steps``,
  a warmup longer than training or a bad optimizer or loop field (before the text is read)."""
  train_specs(train, 1, field)  # the checks do not depend on the length of an epoch


def train_specs(train, steps_per_epoch: int, field: str = "train") -> tuple[OptimizerSpec,
                                                                          LoopSpec]:
  """The optimizer and loop specs of a ``train`` section whose lengths are in steps; one line
  for a bad field, as :func:`check_train`."""
  for name in ("steps", "warmup_steps"):
    if train[name] < 0:
      raise invalid(f"{field}.{name}", train[name], ">= 0")
  if train.warmup_steps > train.steps:
    raise invalid(f"{field}.warmup_steps", train.warmup_steps, f"<= {field}.steps={train.steps}")
  epochs = train.steps / steps_per_epoch
  opt = OptimizerSpec(epochs=epochs, optimizer=train.optimizer,
                      learning_rate=train.learning_rate, weight_decay=train.weight_decay,
                      schedule=train.schedule, warmup_epochs=train.warmup_steps / steps_per_epoch,
                      section=field)
  loop = LoopSpec(epochs=epochs, log_every_steps=train.log_every_steps,
                  checkpoint_every_steps=train.checkpoint_every_steps,
                  eval_every_epochs=train.eval_every_epochs, section=field)
  return opt, loop


def matrices_only(params):
  """Weight decay on kernels and embeddings (rank >= 2), not on biases and LayerNorm scales."""
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def evaluate_lm(eval_step, variables, ids: np.ndarray, *, batch_size: int, context: int,
                vocab_size: int, mesh=None, desc: str = "eval", predictions: bool = False) -> dict:
  """Mean loss over every predicted position of ``ids`` (:func:`jaxcompress.text.eval_batches`).

  Returns:
    ``{'loss': nats/char, 'bits': bits/char, 'accuracy': % of next characters predicted,
    'chars': positions counted, 'nonfinite': positions whose logits hold NaN or Inf}`` and, with
    ``predictions``, every position's argmax. A position with a non-finite logit predicts no
    character (-1 in ``predictions``): it counts as wrong and in ``nonfinite``, and the loss is
    then nan.
  """
  windows = text.num_eval_windows(len(ids), context)
  batch_size = parallel.eval_batch_size(batch_size, windows, mesh)
  batches = text.eval_batches(ids, batch_size=batch_size, context=context)
  total = -(-windows // batch_size)
  r = evaluate(eval_step, variables, batches, num_classes=vocab_size, mesh=mesh, total=total,
               desc=desc, predictions=predictions)
  out = {"loss": r["loss"], "bits": text.bits(r["loss"]), "accuracy": r["accuracy"],
         "chars": r["examples"], "nonfinite": r["nonfinite"]}
  if predictions:
    out["predictions"] = r["predictions"]
  return out


def real_windows(batches) -> list[np.ndarray]:
  """The input windows of ``text.eval_batches`` batches that predict a character, one array per
  batch: the all-zero windows padding the last batch (weight 0 everywhere) are left out, so that
  calibration measures the text only."""
  return [b.image[b.weight.any(axis=1)] for b in batches]


def sample(logits_fn, variables, vocab: text.Vocabulary, *, prompt: str, length: int,
           context: int, seed: int, temperature: float, desc: str = "sample") -> str:
  """``prompt`` and ``length`` characters drawn one at a time from ``logits_fn``, seeded, under
  a progress bar labelled ``desc`` (characters drawn, characters/s).

  The model sees the last ``context`` characters, right-padded to ``context`` (a causal model's
  output at the last real position does not depend on the padding), so one compiled forward
  serves every step. An empty prompt starts from the vocabulary's first character, which is not
  returned. The logits are shifted so that their largest is 0 before they are divided by
  ``temperature``: a small one then sends the others to -inf, not the largest to inf (a tie).
  """
  check_temperature(temperature)

  @jax.jit
  def draw(v, window, pos, key):
    logits = logits_fn(v, window)[0, pos].astype(np.float32)
    return jax.random.categorical(key, (logits - logits.max()) / temperature)

  given = list(vocab.encode(prompt, what="sample.prompt"))
  ids = given or [0]
  key = jax.random.key(seed)
  for i in progress.bar(range(length), desc=desc, unit="char", leave=False,
                        disable=not parallel.is_main_process()):
    window = ids[-context:]
    x = np.zeros((1, context), np.int32)
    x[0, :len(window)] = window
    ids.append(int(draw(variables, x, len(window) - 1, jax.random.fold_in(key, i))))
  return vocab.decode(ids if given else ids[1:])


def run_record(config, corpus: text.Corpus) -> dict:
  """What ``check_workdir`` records of a text run: the config, and in ``data.text`` the text's
  fingerprint, so a rerun on another text (``data.path`` unset and ``$JAXCOMPRESS_TEXT_DIR``
  changed, or the file edited) is refused instead of resumed."""
  record = config.to_dict()
  record["data"]["text"] = corpus.fingerprint()
  return record


def weights_fingerprint(folder: str) -> str:
  """``sha256:`` and the first 16 hex digits of the SHA-256 of the ``weights.msgpack`` that the
  ``train_lm`` run in ``folder`` keeps: another one once a teacher is retrained there. ``~`` in
  ``folder`` is the home folder, as for :func:`check_trained`."""
  h = hashlib.sha256()
  with open(os.path.join(os.path.expanduser(folder), WEIGHTS), "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return "sha256:" + h.hexdigest()[:16]


def save_trained(workdir: str, variables, vocab: text.Vocabulary) -> None:
  """Writes the trained variables and the vocabulary beside the run's ``config.json``."""
  save_weights(jax.device_get(variables), os.path.splitext(WEIGHTS)[0], workdir,
               field="workdir")
  write_json(os.path.join(workdir, VOCAB), {"chars": vocab.chars})


def check_trained(folder: str, field: str, *, can_train: bool = False) -> list[str]:
  """The weights, vocabulary and config paths of a finished ``train_lm`` run in ``folder``;
  one line where one is missing (``can_train`` as for :func:`load_trained`). ``~`` in ``folder`` is
  the home folder, as in the ``--workdir`` that wrote it."""
  paths = [os.path.join(os.path.expanduser(folder), name) for name in (WEIGHTS, VOCAB, CONFIG)]
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise ConfigError(f"{field}: {folder!r} holds no trained model (missing "
                      f"{', '.join(missing)}); give the --workdir of a finished "
                      "`python -m experiments.train_lm` run"
                      + (", or leave it empty to train one" if can_train else ""))
  return paths


def load_trained(folder: str, field: str, *, can_train: bool = False):
  """``(module, variables, vocab, model section, context)`` of a model trained by ``train_lm``;
  ``can_train``: the caller trains one when ``field`` is left empty (said in the message).

  Raises:
    ConfigError: ``folder`` does not hold a finished ``train_lm`` run.
  """
  paths = check_trained(folder, field, can_train=can_train)
  config = read_json(paths[2])
  try:
    model, context = config["model"], int(config["data"]["context"])
    vocab = text.Vocabulary(read_json(paths[1])["chars"])
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{field}: {folder!r} has a malformed {CONFIG} or {VOCAB} "
                      f"({type(e).__name__}: {e})") from None
  section = ml_collections.ConfigDict(model)
  module, reference = build_model(section, vocab.size, context, 0, field=field)
  variables = load_weights(paths[0], reference, field=field)
  return module, variables, vocab, section, context

