"""Classification metrics computed on the host from predictions: accuracy, per-class precision
and recall, and the confusion matrix they come from."""

from __future__ import annotations

import numpy as np

from jaxcompress.errors import ConfigError, invalid


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """``cm[i, j]`` = number of examples of true class ``i`` predicted as class ``j``.

  Raises:
    ConfigError: ``num_classes`` is not an integer >= 1, or ``labels`` and ``preds`` are not
      integer arrays of one length with values in ``[0, num_classes)``.
  """
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise invalid("confusion matrix num_classes", num_classes, "an integer >= 1")
  labels, preds = np.asarray(labels), np.asarray(preds)
  for name, ids in (("labels", labels), ("predictions", preds)):
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
      raise ConfigError(f"confusion matrix: {name} must be a 1-D array of integer class ids, "
                        f"got {ids.dtype} of shape {ids.shape}")
    bad = np.flatnonzero((ids < 0) | (ids >= num_classes))
    if bad.size:
      raise ConfigError(f"confusion matrix: {name} must be class ids in [0, {num_classes}), got "
                        f"{ids[bad[0]]} at position {bad[0]} ({bad.size} outside)")
  if labels.shape != preds.shape:
    raise ConfigError(f"confusion matrix: {labels.size} labels for {preds.size} predictions; "
                      "give one prediction per label")
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  return cm


def classification_report(cm: np.ndarray, missed: np.ndarray | None = None) -> dict:
  """Accuracy (percent) and per-class precision and recall (fractions) from a confusion matrix.

  A class never predicted has precision 0; a class with no examples has recall 0. ``missed[i]``
  (optional) counts examples of class ``i`` with no prediction (NaN/Inf logits): they are
  examples, counted wrong (in ``accuracy`` and their class's recall), and ``nonfinite`` in the
  result.

  Raises:
    ConfigError: ``cm`` is not a square matrix (:func:`confusion_matrix`).
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ConfigError(f"classification report: the confusion matrix must be square "
                      f"(classes x classes), got shape {cm.shape}")
  tp = np.diag(cm).astype(np.float64)
  missed = np.zeros(len(cm), np.int64) if missed is None else np.asarray(missed)
  predicted = cm.sum(axis=0)
  actual = cm.sum(axis=1) + missed
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  total = actual.sum()
  return {
      "accuracy": float(100.0 * tp.sum() / total) if total else 0.0,
      "examples": int(total),
      "nonfinite": int(missed.sum()),
      "precision": [round(float(p), 6) for p in precision],
      "recall": [round(float(r), 6) for r in recall],
  }


def prediction_agreement(preds: np.ndarray, other: np.ndarray) -> float:
  """The fraction of positions where two models predict the same class; a position where
  either has no prediction (-1: NaN/Inf logits, :func:`jaxcompress.steps.predict`) never
  agrees, whatever the other predicts.

  Raises:
    ConfigError: the two do not hold one prediction per position each (same shape).
  """
  preds, other = np.asarray(preds), np.asarray(other)
  if preds.shape != other.shape:
    raise ConfigError(f"prediction agreement: predictions of shape {preds.shape} against "
                      f"{other.shape}; give one prediction per example to each")
  return float(np.mean((preds == other) & (preds >= 0))) if preds.size else 0.0
