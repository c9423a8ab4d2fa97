"""Knowledge-distillation losses: pure, per-example functions of arrays.

The train step reduces and weights them; the teacher's outputs come in already computed (under
``stop_gradient``) on the same augmented batch as the student's ("consistent teaching").

References:
  Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015.
  Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015.
  Beyer et al. Knowledge distillation: A good teacher is patient and consistent. CVPR 2022.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.errors import invalid


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """Hinton's distillation loss per example: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

  The ``T^2`` factor keeps the gradient scale independent of ``T``. Zero when the student's
  logits equal the teacher's. For sequences (logits ``[B, T, C]``) it is the token-level loss,
  one KL over the vocabulary at every position; the train step averages the positions.

  Args:
    student_logits: ``[B, C]``, or ``[B, ..., C]`` (one distribution per position).
    teacher_logits: the same shape (treated as constants: wrap in ``stop_gradient`` upstream or
      not).
    temperature: finite ``T > 0``. A Python, NumPy or JAX scalar is checked here, at call (or
      trace) time; a traced ``T`` (a jitted argument) has no value to check, and ``T <= 0`` or
      ``T = inf`` then gives NaN or a meaningless number, so validate it before tracing.

  Returns:
    float32 losses of the logits' shape without the class axis (``[B]``, ``[B, T]``).

  Raises:
    ConfigError: if ``temperature`` is a number that is not ``> 0`` (NaN included) or is
      infinite, or the two logits differ in shape (another number of classes, or a batch that
      would broadcast).
  """
  # A concrete 0-d array (np.array(0.0), jnp.float32(-2.0)) has a value to check as a number has.
  if isinstance(temperature, numbers.Real) or (
      hasattr(temperature, "dtype") and jnp.ndim(temperature) == 0
      and not isinstance(temperature, jax.core.Tracer)):
    value = float(temperature)
    if not value > 0:
      raise invalid("distill.temperature", value, "> 0")
    if value == math.inf:
      raise invalid("distill.temperature", value, "a finite number > 0",
                    "an infinite T makes the loss inf * 0 = nan")
  if jnp.shape(student_logits) != jnp.shape(teacher_logits):
    raise invalid("teacher_logits", f"shape {tuple(jnp.shape(teacher_logits))}",
                  f"the student logits' shape {tuple(jnp.shape(student_logits))}",
                  "distillation compares the two distributions position by position")
  if hasattr(temperature, "dtype"):  # a NumPy or JAX T: float32 (a float64 T made float64 losses)
    temperature = jnp.asarray(temperature, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature
  s = jnp.asarray(student_logits, jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  p_t = jnp.exp(log_p_t)
  # A class the teacher rules out (logit -inf, a masked vocabulary) adds 0 * log 0 = 0.
  kl = jnp.sum(jnp.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0), axis=-1)
  return temperature ** 2 * kl


def feature_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
  """Hint loss per example: mean squared error between (adapted) student and teacher features.

  Args:
    student_feat: ``[B, ...]`` student activations, already mapped to the teacher's width.
    teacher_feat: ``[B, ...]`` teacher activations of the same shape (constants).

  Returns:
    ``[B]`` float32 losses (mean over all non-batch axes).

  Raises:
    ConfigError: if the two features differ in shape.
  """
  if jnp.shape(student_feat) != jnp.shape(teacher_feat):
    raise invalid("teacher_feat", f"shape {jnp.shape(teacher_feat)}", "the student feature's "
                  f"shape {jnp.shape(student_feat)}", "add an adapter or pick matching layers")
  diff = (jnp.asarray(student_feat, jnp.float32)
          - jax.lax.stop_gradient(jnp.asarray(teacher_feat, jnp.float32)))
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Per example (or position), 1.0 where the student's top-1 class equals the teacher's."""
  return (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)


class Adapter(nn.Module):
  """A learned 1x1 conv (or dense, for ``[B, C]`` inputs) from student width to teacher width."""
  features: int

  @nn.compact
  def __call__(self, x):
    if x.ndim == 2:
      return nn.Dense(self.features, use_bias=False)(x)
    return nn.Conv(self.features, (1, 1), use_bias=False)(x)


def init_adapters(pairs: Sequence[tuple[str, str]], student_feats: dict[str, jax.Array],
                  teacher_feats: dict[str, jax.Array], key: jax.Array) -> dict[str, Any]:
  """Parameters of one :class:`Adapter` per feature pair whose widths differ.

  Args:
    pairs: ``(student_path, teacher_path)`` module paths.
    student_feats: student activations by path (shapes only matter).
    teacher_feats: teacher activations by path.
    key: PRNG key.

  Returns:
    ``{adapter_key(student_path, teacher_path): adapter params}`` for the pairs that need one
    (others map 1:1); one student layer hinted by two teacher layers gets one adapter for each.
  """
  out = {}
  for i, (s, t) in enumerate(pairs):
    fs, ft = student_feats[s], teacher_feats[t]
    if fs.shape[:-1] != ft.shape[:-1]:
      raise invalid("distill.feature_pairs", (s, t), "layers whose outputs share batch and "
                    f"spatial shape (got {fs.shape} vs {ft.shape})")
    if fs.shape[-1] != ft.shape[-1]:
      out[adapter_key(s, t)] = Adapter(ft.shape[-1]).init(jax.random.fold_in(key, i),
                                                           fs)["params"]
  return out


def adapter_key(student_path: str, teacher_path: str) -> str:
  """The name of a feature pair's adapter in the parameters: ``'student_path->teacher_path'``."""
  return f"{student_path}->{teacher_path}"


def adapt(adapters: dict[str, Any], pair: tuple[str, str], feat: jax.Array,
          width: int) -> jax.Array:
  """Maps the student feature of ``pair`` (``(student_path, teacher_path)``) to the teacher's
  width with the pair's adapter (identity if it has none)."""
  key = adapter_key(*pair)
  if key not in adapters:
    return feat
  return Adapter(width).apply({"params": adapters[key]}, feat)

