"""The export artifact: one folder, ``arrays.bin`` (packed bytes) plus ``spec.json.gz``.

Layout of ``DIR/export/``:

- ``arrays.bin``: the byte segments of every layer (:mod:`.codec`) back to back, optionally
  zlib-compressed as a whole (kept only when that is smaller);
- ``spec.json.gz`` (``zcat`` prints it; a plain ``spec.json`` when exported with
  ``compress=False``, which :func:`load` reads as well): format and version, the input's shape
  and dtype (or those of each input, :mod:`.inputs`), the float32 size of the model's
  parameters, the folded BatchNorms, each quantized layer's input quantization, the arrays
  file's size, raw size, compression and SHA-256, and one line per stored tensor: kind, shape,
  bits, sparse encoding, the segments stored Huffman-coded (``huffman``) and ``segments: {name: bytes}``: its byte segments, which follow each other in
  the raw arrays in the order the tensors and their segments are listed (offsets are implied).

The artifact holds variables, not code: :func:`load` takes the user's own module, checks the
checksum, every size and shape, and that the variables fit that module, before it builds anything;
a truncated or edited file, or a spec that does not match its arrays or the module, ends in one
:class:`~jaxcompress.errors.ConfigError` line instead of a silently wrong model. Files are written
to a temporary name and renamed (:mod:`.files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from jaxcompress.errors import ConfigError, first_line
from jaxcompress.export import inputs as io
from jaxcompress.export.codec import (ACT_KEYS, channel_axes, decode_layer, encode_layer,
                                      weight_shape)
from jaxcompress.export.files import (ARRAYS_FILE, FORMAT, SPEC_FILE, SPEC_GZ, VERSION,
                                      WEIGHT_ORDER_SINCE, make_folder, read_arrays, read_spec,
                                      spec_bytes, write_files)
from jaxcompress.export.finalize import FOLD, FOLDED_LEAVES, Finalized, finalize
from jaxcompress.export.runtime import LoadedModel, make_apply_fn, rebuild
from jaxcompress.export.size import size_report
from jaxcompress.models.functional import functional
from jaxcompress.rules import flat_paths


def export_model(out_dir: str, *, variables: Mapping[str, Any],
                 input_shape: tuple[int, ...] | None = None, input_dtype: str = "float32",
                 inputs: Any = None, masks: Any = None,
                 specs: Mapping[str, Any] | None = None,
                 codebooks: Mapping[str, Any] | None = None,
                 fold: Mapping[str, float] | None = None,
                 gains_into: Mapping[str, str] | None = None, model_name: str = "",
                 compress: bool = True, reduce_axes: Mapping[str, Any] | None = None,
                 window_axes: Mapping[str, Any] | None = None,
                 scale_dtype: str = "float32") -> dict:
  """Finalizes a trained (pruned, quantized) model and writes the artifact to ``out_dir``.

  Works for any Flax model: the artifact stores its variables, not its code; :func:`load` takes
  the user's module back as an argument.

  Args:
    out_dir: the artifact folder, by convention ``WORKDIR/export`` (created; files replaced).
    variables: the variables the fake-quant model runs with (``params``, ``batch_stats``, ...).
    input_shape: the shape of one input example (no batch axis), e.g. ``(32, 32, 3)``.
    input_dtype: the input's dtype (``float32`` images, ``int32`` token ids).
    inputs: in place of ``input_shape`` and ``input_dtype``, for a model whose input is a dict or
      tuple of arrays: that pytree with a ``jax.ShapeDtypeStruct`` (or an array) of one example
      (no batch axis) at each leaf, e.g. ``{'image': jax.ShapeDtypeStruct((32, 32, 3),
      jnp.float32), 'meta': jax.ShapeDtypeStruct((4,), jnp.int32)}``.
    masks: pruning masks, a tree like ``variables['params']`` with 0/1 leaves, or ``None``.
      Masked weights are exactly 0 in the artifact.
    specs: ``{layer path: LayerSpec}`` from ``Quantizer.specs(variables_with_masks_applied,
      qstate)``: weight bits, scales and zero points (the weights become those integers) and
      input quantization. Layers not in ``specs`` stay float32.
    codebooks: ``{weight path: Codebook}`` for k-means layers (codebook plus packed indices).
    fold: ``{BatchNorm path: epsilon}`` to fold (``Compression.fold_norms``).
    gains_into: ``{BatchNorm path: weight path}``: folded BatchNorms whose gain goes into that
      weight's per-output-channel scales (``Compression.gain_layers``); they store a bias alone.
    model_name: a name recorded in the spec (informational).
    compress: Huffman-code each layer's code streams where that makes them smaller
      (:mod:`.huffman`), zlib the arrays file when that makes it smaller, and gzip the spec
      (``spec.json.gz``; ``False``: fixed-width codes and a plain ``spec.json``).
    reduce_axes: ``{weight path: reduction axes}`` (``ModelLayers.reduce_axes()``): such a
      weight may be stored as N:M groups along them (the :mod:`.sparse` ``nm`` encoding).
    window_axes: ``{weight path: window axes}`` (``ModelLayers.window_axes()``): such a weight
      may be stored as whole kernels over them (``blocks``; a conv stacked by ``nn.scan`` has its
      window behind the steps).
    scale_dtype: ``float32``, or ``float16``: the folded BatchNorms and the scales of integer
      weights with one scale per output channel (their last axis) rounded to float16 and stored
      so (``QuantSpec.scale_dtype``; the fake-quant model must be evaluated with the same
      rounding, as ``Compression.eval_variables`` does).

  Returns:
    The :func:`~jaxcompress.export.size.size_report` of the written artifact.

  Raises:
    ConfigError: for inputs that do not fit the variables (see :func:`.finalize.finalize`), or
      not exactly one of ``input_shape`` and ``inputs``.
  """
  if (input_shape is None) == (inputs is None):
    raise ConfigError("export: give input_shape (one array input) or inputs (a dict or tuple of "
                      "inputs), exactly one of them")
  signature = (io.of_shape(input_shape, input_dtype) if inputs is None
               else io.of_shapes(inputs))
  fin = finalize(variables, masks=masks, specs=specs, codebooks=codebooks, fold=fold,
                 gains_into=gains_into, reduce_axes=reduce_axes, window_axes=window_axes,
                 scale_dtype=scale_dtype)
  return _write(out_dir, fin, signature=signature, model_name=model_name, compress=compress)


def recode(src: str, out_dir: str, *, compress: bool = True,
           field: str = "model.exported") -> dict:
  """Writes the artifact at ``src`` again, in this version's format, to ``out_dir``.

  The stored tensors are decoded and encoded again, unchanged: an artifact of format version 2
  (fixed-width codes) comes out Huffman-coded, the same model in fewer bytes, and one of version 2
  or 3 with its moved weights' entries in their own order (version 4); ``compress=False``
  writes fixed-width codes and a plain ``spec.json``. No model is needed.

  Returns:
    The :func:`~jaxcompress.export.size.size_report` of the written artifact.

  Raises:
    ConfigError: one line for an unreadable or corrupted ``src``.
  """
  spec = read_spec(src, field)
  with _malformed(src, field):
    fin = _decode(src, spec, field)
    _check_header(spec, fin, field)
  return _write(out_dir, fin, signature=spec["input"], model_name=spec.get("model", ""),
                compress=compress)


def _write(out_dir: str, fin: Finalized, *, signature: dict, model_name: str,
           compress: bool) -> dict:
  """Encodes finalized tensors and writes the artifact's two files; returns its size report."""
  metas, chunks = [], []
  for t in fin.tensors.values():
    meta, segments = encode_layer(t, huffman=compress, axes=fin.axes.get(t.path))
    if t.path in fin.axes:
      axes = [int(a) for a in fin.axes[t.path]]
      meta["axis"] = axes[0] if len(axes) == 1 else axes
    if meta["kind"] == "float" and meta["bits"] == 32:
      del meta["bits"]  # the default
    if meta["encoding"] == "dense":
      del meta["nnz"], meta["encoding"]  # every entry; the default encoding
    meta["segments"] = {name: int(data.size) for name, data in segments.items() if data.size}
    chunks += [data.tobytes() for data in segments.values()]
    metas.append(meta)
  raw = b"".join(chunks)
  packed = zlib.compress(raw, 9) if compress else raw
  compression = "zlib" if compress and len(packed) < len(raw) else "none"
  data = packed if compression == "zlib" else raw
  header = {"format": FORMAT, "version": VERSION, "model": model_name,
            "input": signature,
            "float32_bytes": fin.float32_bytes, "folded": fin.folded, "acts": fin.acts,
            "arrays": {"file": ARRAYS_FILE, "bytes": len(data), "raw_bytes": len(raw),
                       "compression": compression, "sha256": hashlib.sha256(data).hexdigest()}}
  make_folder(out_dir)
  name, stale = (SPEC_GZ, SPEC_FILE) if compress else (SPEC_FILE, SPEC_GZ)
  write_files({os.path.join(out_dir, ARRAYS_FILE): data,
               os.path.join(out_dir, name): spec_bytes({**header, "layers": metas}, compress)})
  if os.path.exists(os.path.join(out_dir, stale)):  # an earlier export's spec
    os.remove(os.path.join(out_dir, stale))
  return size_report(out_dir)


def load(path: str, model: Any, *, field: str = "model.exported") -> LoadedModel:
  """Loads an artifact written by :func:`export_model` for the user's own module.

  Args:
    path: the artifact folder (``WORKDIR/export``) or its ``spec.json.gz`` (``spec.json``).
    model: the Flax Linen or NNX module the artifact was exported from (same architecture).
    field: config field name for messages.

  Returns:
    A :class:`~jaxcompress.export.runtime.LoadedModel`: ``.logits(x)``, ``.variables`` for
    ``model.apply`` (an NNX module: ``set_variables(model, loaded.variables)``; either then runs
    without the input quantization), or unpack it as ``model, arrays, apply_fn = load(path,
    model)``.

  Raises:
    ConfigError: one line for a missing or unreadable file, a checksum or size mismatch, a spec
      whose shapes disagree with its arrays, or variables that do not fit ``model`` (naming the
      first mismatching path and both shapes).
  """
  spec = read_spec(path, field)
  with _malformed(path, field):
    fin = _decode(path, spec, field)
    _check_header(spec, fin, field)
    fm = functional(model)
    expected = _expected(fm, spec, field)
    _check_fits(fm, expected, fin, io.describe(spec["input"]), field)
    arrays = rebuild(fin, expected)
    apply_fn = make_apply_fn(fm, fin.acts)
  return LoadedModel(model, arrays, apply_fn, spec, fin)


@contextlib.contextmanager
def _malformed(path: str, field: str):
  """Turns what a malformed spec raises while decoding into one ConfigError line."""
  try:
    yield
  except (KeyError, TypeError, IndexError, ValueError, AttributeError, OverflowError,
          MemoryError) as e:
    if isinstance(e, ConfigError):
      raise
    cause = f"{type(e).__name__}: {e}".replace("\n", " ")
    raise ConfigError(f"{field}: {path!r} has a malformed spec ({cause}); the artifact is "
                      "corrupted, export it again") from None


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_header(spec: dict, fin: Finalized, field: str) -> None:
  """The input shape, folded BatchNorms and input quantization are well-formed and agree with
  the stored tensors."""
  bad = lambda what: ConfigError(f"{field}: the spec's {what}; the artifact is corrupted, export "
                                 "it again")
  wrong = io.check(spec["input"])
  if wrong:
    raise bad(wrong)
  stored = {k[len(FOLD) + 1:] for k in fin.tensors if k.startswith(f"{FOLD}/")}
  if set(fin.folded) != stored:
    raise bad(f"folded BatchNorms {sorted(fin.folded)} do not match the stored folds "
              f"{sorted(stored)}")
  for name in sorted(stored):
    t = fin.tensors[f"{FOLD}/{name}"]
    if t.kind != "float" or t.codes.ndim != 2 or t.codes.shape[0] not in (1, 2):
      raise bad(f"fold of {name!r} is not a float [gain; bias] or [bias] tensor (shape "
                f"{list(t.codes.shape)})")
  for name, eps in spec["folded"].items():
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
      raise bad(f"epsilon {eps!r} of {name!r} is not a number in [0, 1)")
  for p, act in spec["acts"].items():
    if f"params/{p}/kernel" not in fin.tensors:
      raise bad(f"input quantization of {p!r} names no stored layer")
    if not isinstance(act, dict) or set(act) != set(ACT_KEYS):
      raise bad(f"input quantization of {p!r} must have the keys {list(ACT_KEYS)}")
    ints = [act[k] for k in ("bits", "zero_point", "qmin", "qmax")]
    scale = act["scale"]
    if not all(_is_int(v) for v in ints) or not (
        1 <= act["bits"] <= 16 and act["qmin"] < act["qmax"]
        and 1 << (act["bits"] - 1) <= act["qmax"] - act["qmin"] < 1 << act["bits"]
        and act["qmin"] <= act["zero_point"] <= act["qmax"]) or not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool)
        and np.isfinite(scale) and scale > 0):
      raise bad(f"input quantization of {p!r} is inconsistent: {act!r}")


def _decode(path: str, spec: dict, field: str) -> Finalized:
  raw = np.frombuffer(read_arrays(path, spec, field), np.uint8)
  total = sum(int(size) for meta in spec["layers"] for size in meta["segments"].values())
  if total != raw.size:
    raise ConfigError(f"{field}: the spec's segments add up to {total} bytes, the arrays hold "
                      f"{raw.size}; the spec does not match the arrays")
  tensors, axes, offset = {}, {}, 0
  for meta in spec["layers"]:
    for key in ("bits", "nnz", "codes", "gap_bits", "group_n", "qmin", "scale_bits",
                "codebook_axes"):
      if key in meta and not _is_int(meta[key]):
        raise ConfigError(f"{field}: {key} of {meta['path']!r} is {meta[key]!r}, not an integer; "
                          "the spec is corrupted")
    for key in ("group_axes", "window_axes"):
      listed = meta.get(key, [])
      if not isinstance(listed, list) or not all(_is_int(a) for a in listed):
        raise ConfigError(f"{field}: {key} of {meta['path']!r} is {listed!r}, not a list of "
                          "integers; the spec is corrupted")
    if meta["kind"] == "int" and "qmin" not in meta:
      raise ConfigError(f"{field}: int layer {meta['path']!r} has no qmin; the spec is corrupted")
    if not isinstance(meta["shape"], list) or not all(_is_int(d) and d > 0 for d in meta["shape"]):
      raise ConfigError(f"{field}: shape of {meta['path']!r} is {meta['shape']!r}, not a list of "
                        "positive integers; the spec is corrupted")
    segments = {}
    for name, size in meta["segments"].items():
      if not isinstance(size, int) or size < 0:
        raise ConfigError(f"{field}: segment {name!r} of {meta['path']!r} has size {size!r}; the "
                          "spec is corrupted")
      segments[name] = raw[offset:offset + size]
      offset += size
    meta = dict(meta)
    if meta["kind"] == "float":
      meta.setdefault("bits", 32)
    meta.setdefault("encoding", "dense")
    if meta["encoding"] == "dense":
      meta.setdefault("nnz", int(np.prod(meta["shape"])))
    for name in ("positions", "values"):  # empty segments are not listed
      segments.setdefault(name, np.zeros(0, np.uint8))
    tensors[meta["path"]] = decode_layer(meta, segments,
                                         weight_order=spec["version"] >= WEIGHT_ORDER_SINCE)
    if "axis" in meta:
      axes[meta["path"]] = channel_axes(meta, f"{field}: layer {meta['path']!r}")
  return Finalized(tensors, axes, {k: dict(v) for k, v in spec["acts"].items()},
                   {k: float(v) for k, v in spec["folded"].items()}, int(spec["float32_bytes"]))


def _expected(fm, spec: dict, field: str) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{collection/leaf path: (shape, dtype)}`` of the variables ``fm``'s module needs."""
  sample = io.zeros(spec["input"], 1)
  try:
    want = jax.eval_shape(lambda: fm.init(jax.random.key(0), sample))
  except Exception as e:  # the user's module on the artifact's input: the wrong module
    cause = first_line(e)
    raise ConfigError(f"{field}: {fm.name}'s forward fails on the artifact's input "
                      f"{io.describe(spec['input'])} ({cause}); load it with the module it was "
                      "exported from") from None
  return {f"{c}/{p}": (tuple(v.shape), v.dtype) for c, tree in want.items()
          for p, v in flat_paths(tree).items()}


def _check_fits(fm, expected: dict, fin: Finalized, given: str, field: str) -> None:
  """The artifact's variables have exactly the paths and shapes ``fm``'s module needs on the
  artifact's input (``given``, described)."""
  want = {k: list(v[0]) for k, v in expected.items()}
  have = {}
  for key, t in fin.tensors.items():
    if key.startswith(f"{FOLD}/"):
      path = key[len(FOLD) + 1:]
      for collection, leaf in FOLDED_LEAVES:
        name = f"{collection}/{path}/{leaf}"
        # a BatchNorm may lack scale or bias; its running mean says it is one
        if name in want or (collection, leaf) == ("batch_stats", "mean"):
          have[name] = [int(t.codes.shape[-1])]
      continue
    have[key] = list(weight_shape(t.codes.shape, fin.axes.get(key)))  # channel axes back
  for key in sorted(set(want) | set(have)):
    if key not in have:
      raise ConfigError(f"{field}: the artifact has no {key!r}, which {fm.name} needs; it was "
                        "exported from another model")
    if key not in want:
      raise ConfigError(f"{field}: the artifact holds {key!r}, which {fm.name} does not have; it "
                        "was exported from another model")
    if want[key] != have[key] and not (want[key] == [] and have[key] == [1]):  # scalar: [1]
      raise ConfigError(f"{field}: {key} has shape {have[key]} in the artifact, {fm.name} needs "
                        f"{want[key]} on the artifact's input {given}; it was exported from "
                        "another model, or with another input shape")
