"""The export artifact: one folder, ``arrays.bin`` (packed bytes) plus ``spec.json``.

Layout of ``DIR/export/``:

- ``arrays.bin``: the byte segments of every layer (:mod:`.codec`) back to back, optionally
  zlib-compressed as a whole (kept only when that is smaller);
- ``spec.json``: format and version, model name, ``num_classes``, ``input_shape``,
  ``model_kwargs`` (``folded``, ``inner_widths``), the arrays file's size, raw size, compression
  and SHA-256, and one line per layer: kind, shape, bits, sparse encoding, input quantization and
  ``segments: {name: bytes}``: the layer's byte segments, which follow each other in the raw
  arrays in the order the layers and their segments are listed (offsets are implied).

:func:`load` checks the checksum and every size and shape before it builds anything, so a
truncated or edited file, or a spec that does not match its arrays or the model asked for, ends
in one :class:`~jaxcompress.errors.ConfigError` line instead of a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Mapping

import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.export.codec import decode_layer, encode_layer
from jaxcompress.export.finalize import finalize
from jaxcompress.export.runtime import LoadedModel, build_model, layer_variables, make_apply_fn
from jaxcompress.export.size import size_report
from jaxcompress.export.surgery import shrink_layers
from jaxcompress.models import CifarResNet, get_model

FORMAT, VERSION = "jaxcompress-export", 1
SPEC_FILE, ARRAYS_FILE = "spec.json", "arrays.bin"


def _spec_text(header: dict, layers: list[dict]) -> str:
  """Compact JSON with one layer per line (valid JSON, small, still diffable)."""
  compact = lambda obj: json.dumps(obj, separators=(",", ":"))
  head = compact({**header, "layers": []})[:-len('[]}')]
  return head + "[\n" + ",\n".join(compact(l) for l in layers) + "\n]}\n"


def export_model(out_dir: str, *, model_name: str, variables: Mapping[str, Any],
                 num_classes: int | None = None, masks: Any = None,
                 specs: Mapping[str, Any] | None = None,
                 codebooks: Mapping[str, Any] | None = None,
                 input_shape: tuple[int, ...] = (32, 32, 3), shrink: bool = True,
                 compress: bool = True) -> dict:
  """Finalizes a trained (pruned, quantized) model and writes the artifact to ``out_dir``.

  Args:
    out_dir: the artifact folder, by convention ``WORKDIR/export`` (created; files replaced).
    model_name: registry name (``resnet20``, ``cnn_cifar``, ...); ``load`` rebuilds this model.
    variables: ``{'params': ..., 'batch_stats': ...}`` of the unfolded model, the variables the
      fake-quant model runs with.
    num_classes: classifier width (default: read from the last layer's bias).
    masks: pruning masks, a tree like ``variables['params']`` with 0/1 leaves (the pruning
      package's ``magnitude_masks``, ``channel_masks``, ``current_masks(opt_state)``), or
      ``None``. Masked weights are exactly 0 in the artifact.
    specs: ``{module path: LayerSpec}`` from the quantization package,
      ``Quantizer.specs(variables_with_masks_applied, qstate)``: per-layer weight bits, scale and
      zero point (the weights become those integers) and the calibrated input ranges
      (``act_scale``, ``act_zero_point``, ``act_qmin``, ``act_qmax``; the loaded model
      fake-quantizes layer inputs with them). Layers not in ``specs`` stay float32.
    codebooks: ``{path: Codebook}`` from the quantization package's ``cluster_params`` for
      k-means layers (codebook plus packed indices are stored).
    input_shape: ``(H, W, C)`` of one input image.
    shrink: for CIFAR ResNets, physically remove the inner channels that are exactly silent
      (zero kernel, non-positive folded bias), e.g. after :func:`inner_channel_masks`.
    compress: zlib the arrays file when that makes it smaller.

  Returns:
    The :func:`~jaxcompress.export.size.size_report` of the written artifact.

  Raises:
    ConfigError: for inputs that do not fit the model (see :func:`.finalize.finalize`), or a model
      whose folded form this package cannot rebuild.
  """
  layers = finalize(variables, masks=masks, specs=specs, codebooks=codebooks)
  last = list(layers.values())[-1]
  num_classes = int(num_classes if num_classes is not None else last.channels)
  kwargs: dict[str, Any] = {}
  if isinstance(get_model(model_name, num_classes), CifarResNet):
    kwargs["folded"] = True
    if shrink:
      layers, widths = shrink_layers(layers)
      if widths != [t.channels for p, t in layers.items() if p.endswith("/conv2")]:
        kwargs["inner_widths"] = widths
  # Rebuild now: an artifact that cannot be loaded is never written.
  build_model(model_name, num_classes, kwargs, input_shape, layer_variables(layers),
              field="export")
  metas, chunks = [], []
  for t in layers.values():
    meta, segments = encode_layer(t)
    meta["segments"] = {name: int(data.size) for name, data in segments.items()}
    chunks += [data.tobytes() for data in segments.values()]
    metas.append(meta)
  raw = b"".join(chunks)
  packed = zlib.compress(raw, 9) if compress else raw
  compression = "zlib" if compress and len(packed) < len(raw) else "none"
  data = packed if compression == "zlib" else raw
  header = {"format": FORMAT, "version": VERSION, "model": model_name, "num_classes": num_classes,
            "input_shape": list(input_shape), "model_kwargs": kwargs,
            "arrays": {"file": ARRAYS_FILE, "bytes": len(data), "raw_bytes": len(raw),
                       "compression": compression, "sha256": hashlib.sha256(data).hexdigest()}}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ARRAYS_FILE), "wb") as f:
    f.write(data)
  with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
    f.write(_spec_text(header, metas))
  return size_report(out_dir)


def read_spec(path: str, field: str = "model.exported") -> dict:
  """Reads and checks ``spec.json`` of an artifact folder (or the file itself)."""
  spec_path = path if path.endswith(".json") else os.path.join(path, SPEC_FILE)
  if not os.path.isfile(spec_path):
    raise ConfigError(f"{field}: no {SPEC_FILE} in {path!r}; point it at the folder "
                      "export_model wrote (e.g. WORKDIR/export)")
  try:
    with open(spec_path) as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{field}: {spec_path!r} is not valid JSON ({e}); the artifact is "
                      "corrupted, export it again") from None
  if not isinstance(spec, dict) or spec.get("format") != FORMAT:
    raise ConfigError(f"{field}: {spec_path!r} is not a {FORMAT} spec")
  if spec.get("version") != VERSION:
    raise ConfigError(f"{field}: {spec_path!r} has format version {spec.get('version')!r}, this "
                      f"jaxcompress reads version {VERSION}; export it again")
  return spec


def read_arrays(path: str, spec: dict, field: str = "model.exported") -> bytes:
  """The raw (decompressed) arrays of an artifact, after the size and SHA-256 checks."""
  info = spec["arrays"]
  file = os.path.join(os.path.dirname(path) if path.endswith(".json") else path, info["file"])
  if not os.path.isfile(file):
    raise ConfigError(f"{field}: {file!r} is missing; copy the whole artifact folder")
  with open(file, "rb") as f:
    data = f.read()
  if len(data) != info["bytes"]:
    raise ConfigError(f"{field}: {file!r} has {len(data)} bytes, the spec says {info['bytes']}; "
                      "the file is truncated or was replaced, export it again")
  if hashlib.sha256(data).hexdigest() != info["sha256"]:
    raise ConfigError(f"{field}: {file!r} does not match the SHA-256 in its spec; the file was "
                      "modified or corrupted, export it again")
  if info["compression"] == "zlib":
    data = zlib.decompress(data)
  elif info["compression"] != "none":
    raise ConfigError(f"{field}: unknown compression {info['compression']!r} in the spec")
  if len(data) != info["raw_bytes"]:
    raise ConfigError(f"{field}: arrays hold {len(data)} bytes after decompression, the spec "
                      f"says {info['raw_bytes']}")
  return data


def load(path: str, *, expect_model: str | None = None, expect_num_classes: int | None = None,
         field: str = "model.exported") -> LoadedModel:
  """Loads an artifact written by :func:`export_model` as a callable model.

  Args:
    path: the artifact folder (``WORKDIR/export``) or its ``spec.json``.
    expect_model: the model name the caller asks for; a different one raises.
    expect_num_classes: the classifier width the caller needs; a different one raises.
    field: config field name for messages.

  Returns:
    A :class:`~jaxcompress.export.runtime.LoadedModel`: ``.logits(x)``, or unpack it as
    ``model, variables, apply_fn = load(path)``.

  Raises:
    ConfigError: one line for a missing or unreadable file, a checksum or size mismatch, a spec
      whose shapes disagree with its arrays or its model, or a model other than the one expected.
  """
  spec = read_spec(path, field)
  try:
    return _load(path, spec, expect_model, expect_num_classes, field)
  except (KeyError, TypeError, IndexError) as e:
    raise ConfigError(f"{field}: {path!r} has a malformed spec ({type(e).__name__}: {e}); the "
                      "artifact is corrupted, export it again") from None


def _load(path: str, spec: dict, expect_model: str | None, expect_num_classes: int | None,
          field: str) -> LoadedModel:
  if expect_model is not None and spec["model"] != expect_model:
    raise ConfigError(f"{field}: the artifact in {path!r} is a {spec['model']}, but "
                      f"{expect_model!r} was asked for; set model.name={spec['model']} or point "
                      "at the right artifact")
  if expect_num_classes is not None and spec["num_classes"] != expect_num_classes:
    raise ConfigError(f"{field}: the artifact in {path!r} has {spec['num_classes']} classes, the "
                      f"dataset has {expect_num_classes}")
  raw = np.frombuffer(read_arrays(path, spec, field), np.uint8)
  total = sum(int(size) for meta in spec["layers"] for size in meta["segments"].values())
  if total != raw.size:
    raise ConfigError(f"{field}: the spec's segments add up to {total} bytes, the arrays hold "
                      f"{raw.size}; the spec does not match the arrays")
  layers, offset = {}, 0
  for meta in spec["layers"]:
    segments = {}
    for name, size in meta["segments"].items():
      if not isinstance(size, int) or size < 0:
        raise ConfigError(f"{field}: segment {name!r} of layer {meta['path']!r} has size "
                          f"{size!r}; the spec is corrupted")
      segments[name] = raw[offset:offset + size]
      offset += size
    layers[meta["path"]] = decode_layer(meta, segments)
  variables = layer_variables(layers)
  model = build_model(spec["model"], spec["num_classes"], spec["model_kwargs"],
                      tuple(spec["input_shape"]), variables, field=field)
  acts = {p: t.act for p, t in layers.items() if t.act is not None}
  return LoadedModel(model, variables, make_apply_fn(model, acts), spec, layers)
