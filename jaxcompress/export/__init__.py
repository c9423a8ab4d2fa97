"""Export: genuinely smaller models (packed low-bit weights, sparse storage, channel surgery).

Data flow: ``finalize`` (bake masks, integer weights, fold BatchNorm) -> ``surgery`` (remove pruned
inner channels) -> ``codec`` (one layer's bytes: ``packing`` of sub-byte codes, ``sparse`` bitmap
or gap-coded positions) -> ``artifact`` (``DIR/export``: ``arrays.bin`` + ``spec.json``, checked
on load) -> ``runtime`` (the rebuilt folded model with input fake-quant) ; ``size`` reports bytes on
disk against float32, ``serving`` writes a ``jax.export`` function beside the artifact.

Example:
  >>> report = export_model("run/export", model_name="resnet20", variables=variables,
  ...                       masks=masks, specs=qz.specs(masked_variables, qstate))
  >>> model, variables, apply_fn = loaded = load("run/export", expect_model="resnet20")
  >>> save_serving("run/serving", loaded, mean=IMAGENET_MEAN, std=IMAGENET_STD)
"""

from jaxcompress.export.artifact import export_model, load, read_spec
from jaxcompress.export.codec import LayerTensor, decode_layer, encode_layer
from jaxcompress.export.finalize import finalize
from jaxcompress.export.fold import bn_multiplier, fold_bn
from jaxcompress.export.packing import pack_bits, packed_size, unpack_bits
from jaxcompress.export.runtime import LoadedModel
from jaxcompress.export.serving import load_serving, save_serving
from jaxcompress.export.size import format_report, size_report
from jaxcompress.export.sparse import Sparse
from jaxcompress.export.surgery import inner_channel_masks, shrink_channels, shrink_layers

__all__ = [
    # the artifact
    "export_model", "load", "read_spec", "LoadedModel", "size_report", "format_report",
    # serving
    "save_serving", "load_serving",
    # channel surgery
    "inner_channel_masks", "shrink_channels", "shrink_layers",
    # building blocks
    "finalize", "LayerTensor", "encode_layer", "decode_layer", "fold_bn", "bn_multiplier",
    "pack_bits", "unpack_bits", "packed_size", "Sparse",
]
