"""Classification metrics computed on the host from predictions: accuracy, per-class precision
and recall, and the confusion matrix they come from."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """``cm[i, j]`` = number of examples of true class ``i`` predicted as class ``j``."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
  return cm


def classification_report(cm: np.ndarray) -> dict:
  """Accuracy (percent) and per-class precision and recall (fractions) from a confusion matrix.

  A class never predicted has precision 0; a class with no examples has recall 0.
  """
  tp = np.diag(cm).astype(np.float64)
  predicted = cm.sum(axis=0)
  actual = cm.sum(axis=1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
  total = cm.sum()
  return {
      "accuracy": float(100.0 * tp.sum() / total) if total else 0.0,
      "examples": int(total),
      "precision": [round(float(p), 6) for p in precision],
      "recall": [round(float(r), 6) for r in recall],
  }
