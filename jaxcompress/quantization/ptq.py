"""Post-training quantization: set the input ranges from a few calibration batches, no training.

The float model (in eval mode) runs over the batches; every layer whose input is quantized with a
range gets one from the statistics of the inputs it saw:

- ``minmax``: the overall minimum and maximum;
- ``ema``: a moving average of per-batch min/max (PyTorch's ``MovingAverageMinMaxObserver``);
- ``percentile``: per-batch ``[100 - p, p]`` percentiles, averaged over batches;
- ``mse``: per-batch MSE-optimal clipped ranges at the layer's bits, averaged over batches.

Weights need no calibration: their scales come from the kernels themselves.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
  Inference. CVPR 2018.
  Krishnamoorthi. Quantizing deep convolutional networks for efficient inference: A whitepaper.
  arXiv:1806.08342, 2018.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import parallel, progress
from jaxcompress.errors import (ConfigError, check_finite, check_range, first_line, invalid,
                                unknown)
from jaxcompress.quantization.calibration import (check_finite_range, ema_range, tensor_range,
                                                  union_range)

# The ``method`` values of :func:`calibrate` (``calibration.method``).
CALIBRATION_METHODS = ("minmax", "ema", "percentile", "mse")


def calibrate(qz: Any, variables: Any, qstate: Any, batches: Iterable[Any], *,
              method: str = "minmax", percentile: float = 99.99, momentum: float = 0.9,
              **model_kwargs: Any) -> Any:
  """Calibrates the input ranges of ``qstate`` on ``batches``.

  Args:
    qz: the :class:`~jaxcompress.quantization.model.Quantizer` from ``quantize``.
    variables: the model's variables.
    qstate: its state from ``qz.init``.
    batches: an iterable of model inputs (arrays, e.g. a few hundred normalized training images
      in batches of 64-256); each batch is one compiled call (same shapes reuse it).
    method: one of :data:`CALIBRATION_METHODS`.
    percentile: ``p`` for ``percentile``, in (50, 100].
    momentum: moving-average momentum for ``ema``, in [0, 1).
    **model_kwargs: extra model keyword arguments.

  Returns:
    ``qstate`` with the calibrated ranges (LSQ steps and layers unchanged).

  Raises:
    ConfigError: for an unknown method, a bad ``percentile``/``momentum``, no batches, a batch
      holding NaN/Inf (named by its index), or a calibrated range that is NaN/Inf (e.g. NaN
      weights upstream of the layer named).

  Example:
    >>> from jaxcompress.quantization import quantize
    >>> qz = quantize(model, [(".*", dict(weight_bits=8, act_bits=8))])
    >>> qstate = calibrate(qz, variables, qz.init(variables, x[:8]), [x[i:i + 32] for i in
    ...                    range(0, 128, 32)], method="percentile")
    >>> sorted(qstate.ranges)   # the [lo, hi] input range of each layer
    ['conv1', 'conv2', 'linear']
  """
  if method not in CALIBRATION_METHODS:
    raise unknown("calibration.method", method, CALIBRATION_METHODS)
  check_range("calibration.percentile", percentile, 50, 100, lo_closed=False, hi_closed=True)
  check_range("calibration.momentum", momentum, 0.0, 1.0)

  def stat(layer, x):
    cfg = layer.config
    kind = {"minmax": "minmax", "ema": "minmax"}.get(method, method)
    lo, hi = tensor_range(x, method=kind, percentile=percentile, bits=cfg.act_bits,
                          symmetric=cfg.act_symmetric)
    return jnp.stack([lo, hi])

  if isinstance(batches, (np.ndarray, jax.Array)):
    raise invalid("calibration batches", f"one array of shape {tuple(batches.shape)}",
                  "a sequence of input batches", "pass [x]")
  observe = jax.jit(lambda v, x: qz.observe(v, qstate, x, stat=stat, **model_kwargs))
  acc, count = None, 0
  for batch in progress.bar(batches, desc="calibrate", unit="batch", leave=False,
                            disable=not parallel.is_main_process()):
    check_finite(f"calibration batch {count}", batch,
                 "the calibrated input ranges would be NaN: clean or drop those examples")
    try:
      ranges = observe(variables, batch)
    except ConfigError:
      raise
    except Exception as e:  # a batch the model cannot take is a user mistake: one line
      shapes = jax.tree.map(lambda a: tuple(np.shape(a)), batch)
      raise ConfigError(f"calibration batch {count}: the model fails on inputs of shape "
                        f"{shapes} ({first_line(e)})"
                        "; give batches shaped like init's sample") from None
    if set(ranges) != set(qstate.ranges):  # layers under nn.remat: seen only when run eagerly
      observe = lambda v, x: qz.observe(v, qstate, x, stat=stat, **model_kwargs)  # noqa: E731
      ranges = observe(variables, batch)  # and the batches after it
    if acc is None:
      acc = ranges
    elif method == "minmax":
      acc = jax.tree.map(union_range, acc, ranges)
    elif method == "ema":
      acc = jax.tree.map(lambda a, r: ema_range(a, r, momentum), acc, ranges)
    else:
      acc = jax.tree.map(jnp.add, acc, ranges)
    count += 1
  if count == 0:
    raise ConfigError("calibration batches must hold at least one batch, got none; "
                      "pass e.g. a list of image arrays")
  if method in ("percentile", "mse"):
    acc = jax.tree.map(lambda a: a / count, acc)
  for path, r in acc.items():
    check_finite_range(f"calibrated activation range of {path}", r[0], r[1])
  return qstate.replace(ranges={**qstate.ranges, **acc})
