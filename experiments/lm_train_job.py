"""Training a character-level language model from a ``configs/shakespeare.py`` config.

``experiments/train_lm.py`` runs :func:`train_and_evaluate`; the distillation job trains its
teachers with :func:`train_lm`. A finished run leaves ``weights.msgpack``, ``vocab.json``,
``config.json``, ``metrics.jsonl`` and ``results.json`` in its workdir; an interrupted one resumes
from ``checkpoints/``.
"""

from __future__ import annotations

import os

from experiments import lm_lib
from experiments.pipeline import FLOAT32_BYTES, param_count
from jaxcompress import parallel, text
from jaxcompress.checkpoint import MetricsLog, check_workdir, read_json, write_json
from jaxcompress.errors import check_counts
from jaxcompress.models.functional import functional
from jaxcompress.optim import make_optimizer
from jaxcompress.steps import TrainState, make_eval_step, make_train_step, supervised_loss
from jaxcompress.train import fit

EVAL_SPLITS = ("validation", "test", "val111k")


def check_data(data) -> None:
  """One line for a batch size below 1 (the text and the context are checked when read)."""
  check_counts({f"data.{field}": data[field] for field in ("batch_size", "eval_batch_size")})


def validate_config(config) -> None:
  """The checks that need no text: the model, the batch sizes and the train lengths (the text
  and the context are checked when read, before anything is written)."""
  lm_lib.check_model(config.model)
  check_data(config.data)
  lm_lib.check_train(config.train)


def load_corpus(data, vocab: text.Vocabulary | None = None) -> text.Corpus:
  """The ``data`` section's text, split and encoded (``vocab``: a teacher's, else the train
  split's)."""
  check_data(data)
  return text.load_corpus(text.text_path(data.path), data.context, vocab=vocab)


def train_lm(config, corpus: text.Corpus, workdir: str, *, mesh, desc: str = "train") -> tuple:
  """Trains ``config.model`` from scratch on ``corpus`` (resumable in ``workdir``), evaluates it.

  Args:
    config: sections ``seed``, ``data``, ``model``, ``train`` (``configs/shakespeare.py``).
    corpus: the encoded text (:func:`load_corpus` of ``config.data``).
    workdir: the run's folder; claimed (``check_workdir``) only after every check passed.
    mesh: data-parallel mesh.
    desc: progress-bar label.

  Returns:
    ``(module, variables, results)``; ``results`` is what ``results.json`` holds (a finished
    run's, read back with its weights: nothing is trained or evaluated again).
  """
  data = config.data
  module, variables = lm_lib.build_model(config.model, corpus.vocab.size, data.context,
                                         config.seed)
  source = text.TrainWindows(corpus.ids["train"], data.batch_size, data.context)
  opt_spec, loop = lm_lib.train_specs(config.train, source.steps_per_epoch)
  for field in ("batch_size", "eval_batch_size"):
    parallel.check_batch_size(data[field], mesh, f"data.{field}")
  check_workdir(lm_lib.run_record(config, corpus), workdir)
  done = read_json(os.path.join(workdir, "results.json"))
  if done:  # a finished run: its weights and results, nothing trained or evaluated again
    return module, lm_lib.load_trained(workdir, "--workdir")[1], done
  optimizer = make_optimizer(opt_spec, source.steps_per_epoch, decay_mask=lm_lib.matrices_only)
  variables = dict(variables)
  state = TrainState.create(variables.pop("params"), variables, optimizer)
  step = make_train_step(supervised_loss(module), optimizer, mesh=mesh, seed=config.seed)
  eval_step = make_eval_step(lambda v, x, fm=functional(module): fm.apply(v, x)[0], mesh=mesh)
  as_vars = lambda s: {"params": s.params, **s.model_state}
  evaluate = lambda s, split: lm_lib.evaluate_lm(
      eval_step, as_vars(s), corpus.ids[split], batch_size=data.eval_batch_size,
      context=data.context, vocab_size=corpus.vocab.size, mesh=mesh, desc=f"eval {split}")
  state, info = fit(state, step, source, None, loop, workdir, seed=config.seed, mesh=mesh,
                    eval_fn=lambda s: evaluate(s, "validation"), desc=desc)
  trained = as_vars(state)
  results = {"model": config.model.name, "params": param_count(trained["params"]),
             "size_bytes": param_count(trained["params"]) * FLOAT32_BYTES,
             "vocab_size": corpus.vocab.size, "context": data.context, "steps": info["steps"],
             "train_seconds": info["seconds"]}
  for split in EVAL_SPLITS:
    r = evaluate(state, split)
    results.update({f"loss_{split}": r["loss"], f"bits_{split}": r["bits"],
                    f"accuracy_{split}": r["accuracy"], f"nonfinite_{split}": r["nonfinite"]})
  MetricsLog(os.path.join(workdir, "metrics.jsonl")).write_final(
      info["steps"], {k: v for k, v in results.items() if k.startswith(("loss_", "bits_"))})
  lm_lib.save_trained(workdir, trained, corpus.vocab)
  write_json(os.path.join(workdir, "results.json"), results)
  return module, trained, results


def train_and_evaluate(config, workdir: str) -> dict:
  """``python -m experiments.train_lm``: trains, evaluates, writes ``results.json``."""
  validate_config(config)
  corpus = load_corpus(config.data)
  mesh = parallel.make_mesh()
  return train_lm(config, corpus, workdir, mesh=mesh)[2]
