"""Export: genuinely smaller models (packed low-bit weights, sparse storage) of any Flax model.

Data flow: ``finalize`` (bake masks, integer weights, fold BatchNorms found by tracing) -> ``codec``
(one tensor's bytes: ``packing`` of sub-byte codes, ``sparse`` bitmap or gap-coded positions,
``huffman`` codes for skewed code streams) -> ``artifact`` (``DIR/export``: ``arrays.bin`` +
``spec.json.gz``, checked on load; ``recode`` writes one again in the current format) ->
``runtime`` (the user's own module on the artifact's arrays, with the stored input
quantization); ``size`` reports bytes on disk against float32, ``fit`` zeroes the smallest
weights until an artifact fits a byte budget, ``serving`` writes a
``jax.export`` function beside the artifact, ``slim`` runs a loaded artifact with its removed
output channels skipped.

Example:
  >>> from jaxcompress import pruning, quantization
  >>> masks = pruning.magnitude_masks(variables["params"], 0.5)
  >>> masked_variables = {**variables, "params": pruning.apply_masks(variables["params"], masks)}
  >>> qz = quantization.quantize(model, [(".*", dict(weight_bits=8, act_bits=8))])
  >>> qstate = qz.init(masked_variables, x[:8])
  >>> report = export_model("run/export", variables=variables, input_shape=(32, 32, 3),
  ...                       masks=masks, specs=qz.specs(masked_variables, qstate))
  >>> loaded = load("run/export", model)      # the user's own Linen or NNX module
  >>> logits = loaded.logits(x[:8])
  >>> fake_quant, _, _ = jax.jit(qz.apply)(masked_variables, qstate, x[:8])
  >>> bool(jnp.abs(logits - fake_quant).max() < 1e-4)    # the integers compute the same logits
  True
  >>> signature = save_serving("run/serving", slim(loaded).loaded)   # pruned channels not computed
  >>> signature["input"]["shape"]
  ['batch', 32, 32, 3]
"""

from jaxcompress.export.artifact import export_model, load, read_spec, recode
from jaxcompress.export.codec import LayerTensor, decode_layer, encode_layer
from jaxcompress.export.finalize import Finalized, check_finite_variables, finalize
from jaxcompress.export.fit import fit_to_bytes, smallest_bytes
from jaxcompress.export.packing import pack_bits, packed_size, unpack_bits
from jaxcompress.export.runtime import LoadedModel
from jaxcompress.export.serving import load_serving, save_serving
from jaxcompress.export.size import format_report, size_report
from jaxcompress.export.slim import Slimmed, slim
from jaxcompress.export.sparse import Sparse

__all__ = [
    # the artifact
    "export_model", "load", "read_spec", "recode", "LoadedModel", "size_report", "format_report",
    "fit_to_bytes",
    "smallest_bytes",
    # serving
    "save_serving", "load_serving", "slim", "Slimmed",
    # building blocks
    "finalize", "Finalized", "check_finite_variables", "LayerTensor", "encode_layer",
    "decode_layer",
    "pack_bits", "unpack_bits", "packed_size", "Sparse",
]
