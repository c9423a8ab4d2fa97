"""Quantization as pure transforms: uniform (min-max, LSQ) and non-uniform (k-means) quantization.

Array math:
  qparams      -- integer ranges and (scale, zero_point) from a real range (PyTorch/ONNX convention)
  fake_quant   -- quantize-dequantize with a straight-through gradient
  lsq          -- learned step size quantization (Esser et al. 2019)
  calibration  -- range estimators (min-max, absmax, percentile, MSE) and moving averages
  kmeans       -- weight sharing with k-means codebooks (Han et al. 2016)
  schedule     -- progressive bit-width schedules

Model plumbing:
  config       -- per-layer settings and the path rules that assign them
  layer        -- the kernel and input quantizers of one layer
  model        -- quantize(model, rules): init / apply / specs of an unmodified Flax model
  ptq          -- calibrate(): post-training input ranges
  spec         -- the per-layer export spec
"""

from jaxcompress.quantization.calibration import RANGE_METHODS, ema_range, tensor_range
from jaxcompress.quantization.config import FIRST, LAST, LayerConfig, default_rules
from jaxcompress.quantization.fake_quant import dequantize, fake_quant, quantize_int
from jaxcompress.quantization.kmeans import (Codebook, assign, cluster_params, codebook_grad,
                                             decode, decode_params, kmeans, kmeans_fake_quant,
                                             stepwise)
from jaxcompress.quantization.layer import QuantLayer, channels_last, half_scaled, scale_axes
from jaxcompress.quantization.lsq import lsq_fake_quant, lsq_grad_scale, lsq_init_step
from jaxcompress.quantization.model import QuantState, Quantizer, quantize
from jaxcompress.quantization.ptq import CALIBRATION_METHODS, calibrate
from jaxcompress.quantization.qparams import minmax_qparams, qparams_from_range, qrange
from jaxcompress.quantization.schedule import bit_schedule, progressive_bits
from jaxcompress.quantization.spec import LayerSpec, layer_specs

__all__ = [
    "CALIBRATION_METHODS", "FIRST", "LAST", "RANGE_METHODS", "assign", "bit_schedule", "calibrate",
    "channels_last", "cluster_params", "Codebook", "codebook_grad", "decode", "decode_params",
    "default_rules", "dequantize", "ema_range", "fake_quant", "half_scaled", "kmeans",
    "kmeans_fake_quant", "stepwise", "layer_specs", "LayerConfig", "LayerSpec", "lsq_fake_quant",
    "lsq_grad_scale", "lsq_init_step", "minmax_qparams", "progressive_bits", "qparams_from_range",
    "qrange", "quantize", "quantize_int", "Quantizer", "QuantLayer", "QuantState", "scale_axes",
    "tensor_range",
]
