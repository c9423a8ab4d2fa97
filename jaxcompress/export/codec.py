"""One finalized layer: its integer (or k-means, or float) kernel, folded BatchNorm gain and bias,
and its byte encoding in the artifact.

A :class:`LayerTensor` is what the exported model stores for one Conv/Dense layer, after masks are
baked in, weights are quantized and BatchNorm is folded. The layer computes
``y = layer(x, kernel) * gain[c] + bias[c]`` with ``c`` the output channel (last axis), where

- ``int``:    ``kernel = (q - zero_point[c]) * scale[c]``, ``q`` in ``[qmin, qmin + 2^bits)``
  (a weight with scales along several axes, ``meta["axis"]`` a list of them, stores those axes
  last and holds one scale per entry of them: ``scale[..., c]``);
- ``kmeans``: ``kernel = codebook[i]``, index ``2^bits`` marks a pruned weight (0); a weight
  stacked by ``nn.scan`` may hold one codebook per step (``codebook[*steps, i]``,
  ``meta["codebook_axes"]`` its leading axes);
- ``float``:  the float32 kernel with BatchNorm already multiplied in (no ``gain``), stored as
  float32 or, when its values are float16 values (``bits=16``), as float16,

and ``gain`` is ``None`` (1) where no BatchNorm was folded. Keeping the BatchNorm gain out of a
quantized kernel leaves that kernel bit-identical to the one the fake-quant model ran with (an
export with ``gains_into`` multiplies the gain into ``scale`` instead, and the model it is
compared with is evaluated with the same product).
:func:`encode_layer` turns a layer into named byte segments and a small JSON-able dict;
:func:`decode_layer` inverts it and checks every byte count against the dict. With
``huffman=True`` the code streams (integer and k-means values, gap and N:M position codes) are
each Huffman-coded (:mod:`.huffman`, a table over all ``2^width`` codes) where that takes fewer
bytes than their fixed-width packing; ``meta["huffman"]`` lists the segments so coded, and the
decoder unpacks them first.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jaxcompress.errors import ConfigError, unknown
from jaxcompress.export import sparse
from jaxcompress.export.huffman import coded_size
from jaxcompress.export.huffman import decode as huffman_decode
from jaxcompress.export.huffman import encode as huffman_encode
from jaxcompress.export.packing import check_width, pack_bits, packed_size, unpack_bits

KINDS = ("int", "kmeans", "float")
ACT_KEYS = ("bits", "scale", "zero_point", "qmin", "qmax")


def stored_order(ndim: int, axes: Sequence[int]) -> list[int]:
  """The axis order a weight is stored in: its channel ``axes`` (those with one scale each) last,
  in order, the others before them as they were."""
  return [a for a in range(ndim) if a not in axes] + list(axes)


def _weight_order(ndim: int, axes: Sequence[int] | None) -> list[int] | None:
  """:func:`stored_order` where it moves an axis, else ``None``."""
  order = None if axes is None else stored_order(ndim, axes)
  return None if order is None or order == list(range(ndim)) else order


def weight_shape(shape: Sequence[int], axes: Sequence[int] | None) -> tuple[int, ...]:
  """The weight's own shape of a tensor stored at ``shape`` with its channel ``axes`` last
  (:func:`stored_order`; ``None``: stored as it is)."""
  order = _weight_order(len(shape), axes) or list(range(len(shape)))
  return tuple(int(shape[order.index(a)]) for a in range(len(shape)))


class LayerTensor(NamedTuple):
  """A finalized Conv/Dense layer (NumPy arrays; see the module docstring for the formulas).

  Attributes:
    path: ``/``-joined module path, e.g. ``layer1_0/conv1``.
    kind: ``int``, ``kmeans`` or ``float``.
    codes: kernel-shaped: int32 codes ``q`` (``int``), int32 indices (``kmeans``), or the float32
      folded kernel (``float``).
    bits: code width (2..8), or 32 (16) for a ``float`` tensor stored as float32 (float16).
    qmin: smallest code (``int``; 0 otherwise).
    zero_point: int32 ``[C]``, or shaped as ``scale`` (``int`` only; ``None`` means all zero).
    scale: float32 weight scale, ``[C]`` per channel, ``[1]`` per tensor, or shaped as the last
      axes of ``codes`` its channel axes were moved to (``int`` only).
    gain: float32 ``[C]`` folded BatchNorm multiplier applied to the output, or ``None``.
    bias: float32 ``[C]``, or ``None``.
    codebook: float32 ``[2^bits]``, or ``[*steps, 2^bits]`` for one per index of the leading
      axes of ``codes`` (``kmeans`` only).
    act: input fake-quantization ``{'bits', 'scale', 'zero_point', 'qmin', 'qmax'}``, or ``None``.
    group_axes: the axes of ``codes`` the layer's product sums over (its reduction axes, in the
      stored layout), or ``None``: with them the :mod:`.sparse` ``nm`` encoding (groups of 4
      along those axes, NVIDIA's 2:4 layout) is considered.
    window_axes: the axes of ``codes`` that hold the layer's kernel window (in the stored layout),
      or ``None``: with them :mod:`.sparse` ``blocks`` over them is considered.
    scale_bits: 32, or 16: ``scale`` holds float16 values and is stored as float16.
  """
  path: str
  kind: str
  codes: np.ndarray
  bits: int
  qmin: int = 0
  zero_point: np.ndarray | None = None
  scale: np.ndarray | None = None
  gain: np.ndarray | None = None
  bias: np.ndarray | None = None
  codebook: np.ndarray | None = None
  act: dict | None = None
  group_axes: tuple | None = None
  scale_bits: int = 32
  window_axes: tuple | None = None

  def nonzero(self) -> np.ndarray:
    """Entries whose real kernel value is not exactly zero by construction."""
    if self.kind == "int":
      zp = 0 if self.zero_point is None else self.zero_point
      return self.codes != zp
    if self.kind == "kmeans":
      return self.codes != (1 << self.bits)
    return self.codes != 0

  def kernel(self) -> np.ndarray:
    """The real float32 kernel the layer runs with (before ``gain``), as fake quantization has it:
    ``(q - zp)`` in float32 times the scale, or the codebook entries."""
    if self.kind == "int":
      zp = np.float32(0) if self.zero_point is None else self.zero_point.astype(np.float32)
      return (self.codes.astype(np.float32) - zp) * self.scale.astype(np.float32)
    if self.kind == "kmeans":  # one codebook row per index of the codes' leading axes
      book = np.asarray(self.codebook, np.float32)
      book = book.reshape(-1, book.shape[-1])
      book = np.concatenate([book, np.zeros((len(book), 1), np.float32)], axis=1)  # index 2^bits
      codes = self.codes.reshape(len(book), -1)
      return np.take_along_axis(book, codes, axis=1).reshape(self.codes.shape)
    return np.asarray(self.codes, np.float32)

  def folded_kernel(self) -> np.ndarray:
    """``kernel() * gain``: the kernel of a plain biased layer (equal up to float rounding)."""
    return self.kernel() if self.gain is None else (self.kernel() * self.gain).astype(np.float32)


def encode_layer(t: LayerTensor, *, huffman: bool = False,
                 axes: Sequence[int] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """Encodes a layer: ``(meta, segments)``.

  ``meta`` is JSON-able (shape, kind, bits, the chosen :mod:`.sparse` encoding and its counts, the
  input quantization); ``segments`` maps ``positions``, ``values`` and, where present,
  ``zero_point``, ``scale``, ``gain``, ``bias``, ``codebook`` to ``uint8`` arrays. ``huffman``:
  Huffman-code the code streams that get smaller so (listed in ``meta["huffman"]``).

  ``axes``: the weight axes ``t.codes`` holds last (:func:`stored_order`; the caller writes them
  as ``meta["axis"]``). The entries are then encoded in the weight's own row-major order (format
  version 4), the order in which training caps a mask's gap codes
  (:mod:`jaxcompress.pruning.positions`) and a budget sizes it, so the stored positions take the
  bytes those counted.
  """
  nonzero = t.nonzero()
  if t.kind == "int":
    values = t.codes - t.qmin
  elif t.kind == "kmeans":
    values = t.codes
  else:
    values = t.codes.astype(np.float32)
  order, group, window = _weight_order(t.codes.ndim, axes), t.group_axes, t.window_axes
  if order is not None:  # stored axis i is weight axis order[i]
    back = np.argsort(order)
    values, nonzero = np.transpose(values, back), np.transpose(nonzero, back)
    group = group and tuple(order[a] for a in group)
    window = window and tuple(order[a] for a in window)
  enc = sparse.encode(values, nonzero, t.bits, allow_dense=t.kind != "kmeans", group_axes=group,
                      window_axes=window)
  meta = {"path": t.path, "kind": t.kind, "shape": list(t.codes.shape), "bits": t.bits,
          "encoding": enc.encoding, "nnz": enc.nnz}
  if t.kind == "int":
    meta["qmin"] = t.qmin
  if enc.encoding == "gaps":
    meta.update(gap_bits=enc.gap_bits, codes=enc.codes)
  if enc.encoding == "nm":
    meta.update(group_n=enc.group_n, group_axes=list(enc.group_axes))
  if enc.window_axes:
    meta["window_axes"] = list(enc.window_axes)
  if t.scale_bits != 32:
    meta["scale_bits"] = t.scale_bits
  if t.act is not None:
    meta["act"] = {k: t.act[k] for k in ACT_KEYS}
  segments = {"positions": enc.positions, "values": enc.values}
  if t.zero_point is not None and np.any(t.zero_point != 0):
    segments["zero_point"] = pack_bits(t.zero_point - t.qmin, t.bits)
  if t.scale is not None:
    segments["scale"] = sparse.float_bytes(t.scale, t.scale_bits)
  if t.gain is not None:
    segments["gain"] = sparse.float_bytes(t.gain)
  if t.bias is not None:
    segments["bias"] = sparse.float_bytes(t.bias)
  if t.codebook is not None:
    segments["codebook"] = sparse.float_bytes(t.codebook)
    if np.ndim(t.codebook) > 1:
      meta["codebook_axes"] = int(np.ndim(t.codebook) - 1)
  if huffman:
    coded = []
    for name, (width, count) in code_streams(meta).items():
      symbols = unpack_bits(segments[name], width, count)
      if coded_size(symbols, 1 << width) < segments[name].size:
        segments[name] = huffman_encode(symbols, 1 << width)
        coded.append(name)
    if coded:
      meta["huffman"] = coded
  return meta, segments


def code_streams(meta: dict) -> dict[str, tuple[int, int]]:
  """``{segment: (code width, code count)}`` of a layer's fixed-width code streams, non-empty:
  integer and k-means values, gap and N:M position codes (bitmaps and kernel marks are 1-bit)."""
  out = {}
  if meta["kind"] != "float" and int(meta["nnz"]):
    out["values"] = (int(meta["bits"]), int(meta["nnz"]))
  if meta["encoding"] == "gaps" and int(meta["codes"]):
    out["positions"] = (int(meta["gap_bits"]), int(meta["codes"]))
  if meta["encoding"] == "nm":
    out["positions"] = (sparse.NM_INDEX_BITS, int(meta["nnz"]))
  return out


def _unhuffman(meta: dict, segments: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
  """``segments`` with the ``meta["huffman"]`` ones decoded to their fixed-width packing."""
  coded = meta.get("huffman", [])
  streams = code_streams(meta)
  if (not isinstance(coded, list) or len(set(map(str, coded))) != len(coded)
      or any(name not in streams for name in coded)):
    raise ConfigError(f"{where}: huffman lists {coded!r}; a {meta['encoding']} "
                      f"{meta['kind']} layer may code {sorted(streams)}; the spec is corrupted")
  out = dict(segments)
  for name in coded:
    width, count = streams[name]
    check_width(width, f"{where}: the code width of segment {name!r}")  # before 1 << width
    symbols = huffman_decode(segments[name], count, 1 << width,
                             where=f"{where} segment {name!r}")
    out[name] = pack_bits(symbols, width)
  return out


def channel_axes(meta: dict, where: str) -> tuple[int, ...] | None:
  """The axes a weight's scales run along (``meta["axis"]``: an integer, or a list of them),
  stored last and moved back on load; ``None`` where the spec gives none (the last axis).

  Raises:
    ConfigError: for anything but distinct axes of the layer's shape.
  """
  if "axis" not in meta:
    return None
  axis, ndim = meta["axis"], len(meta["shape"])
  axes = axis if isinstance(axis, list) else [axis]
  if (not axes or len(set(map(str, axes))) != len(axes) or any(
      isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < ndim for a in axes)):
    raise ConfigError(f"{where}: axis is {axis!r}, not distinct axes of its {ndim}-d shape; the "
                      "spec is corrupted")
  return tuple(axes)


def _expected_segments(meta: dict, channels: int,
                       scales: int) -> dict[str, tuple[int, ...] | None]:
  """Allowed byte counts of every segment a layer may have (``None``: checked by the decoder):
  ``channels`` output channels, ``scales`` entries of its channel axes."""
  bits = meta["bits"]
  out = {"positions": None, "values": None, "gain": (4 * channels,), "bias": (4 * channels,)}
  if meta["kind"] == "int":
    out["zero_point"] = (packed_size(scales, bits),)
    width = int(meta.get("scale_bits", 32)) // 8
    out["scale"] = (width, width * scales)
  if meta["kind"] == "kmeans":
    books = int(np.prod(meta["shape"][:int(meta.get("codebook_axes", 0))]))
    out["codebook"] = (4 * (1 << bits) * books,)
  return out


def decode_layer(meta: dict, segments: dict[str, np.ndarray], *,
                 weight_order: bool = True) -> LayerTensor:
  """Inverse of :func:`encode_layer`.

  ``weight_order``: the entries of a weight with moved channel axes (``meta["axis"]``) follow
  the weight's own axis order, as :func:`encode_layer` writes them; ``False`` for artifacts of
  format versions 2 and 3, which walked them in the stored order.

  Raises:
    ConfigError: for an unknown kind, a missing or wrongly sized segment, or sparse data that
      disagrees with the shape (a corrupted artifact or a spec that does not match its arrays).
  """
  path = meta["path"]
  where = f"artifact layer {path!r}"
  if meta["kind"] not in KINDS:
    raise unknown(f"{where} kind", meta["kind"], KINDS)
  if meta.get("encoding") not in sparse.ENCODINGS:
    raise unknown(f"{where} encoding", meta.get("encoding"), sparse.ENCODINGS)
  shape = tuple(int(d) for d in meta["shape"])
  n, channels, bits = int(np.prod(shape)), shape[-1], int(meta["bits"])
  if meta["kind"] == "float" and bits not in sparse.FLOAT_DTYPES:
    raise ConfigError(f"{where}: a float tensor has bits 16 or 32, the spec says {bits}; the "
                      "spec is corrupted")
  if not 0 <= int(meta.get("codebook_axes", 0)) < len(shape):
    raise ConfigError(f"{where}: codebook_axes is {meta['codebook_axes']!r}, not 0 to "
                      f"{len(shape) - 1} leading axes of its shape; the spec is corrupted")
  if meta.get("scale_bits", 32) not in sparse.FLOAT_DTYPES:
    raise ConfigError(f"{where}: scale_bits is 16 or 32, the spec says {meta['scale_bits']!r}; "
                      "the spec is corrupted")
  segments = _unhuffman(meta, segments, where)
  axes = channel_axes(meta, where)
  scale_shape = shape[-len(axes or (1,)):]  # the channel axes, stored last
  order = _weight_order(len(shape), axes) if weight_order else None
  # the shape the entries were encoded in: the weight's own where they follow its order
  walked = shape if order is None else weight_shape(shape, axes)
  expected = _expected_segments(meta, channels, int(np.prod(scale_shape)))
  for name, data in segments.items():
    if name not in expected:
      raise ConfigError(f"{where}: unexpected segment {name!r} for a {meta['kind']} layer; the "
                        "spec is corrupted")
    if expected[name] is not None and data.size not in expected[name]:
      need = " or ".join(str(n) for n in expected[name])
      raise ConfigError(f"{where}: segment {name!r} has {data.size} bytes, a layer of shape "
                        f"{list(shape)} needs {need}; the spec does not match the arrays")
  required = {"int": ("scale",), "kmeans": ("codebook",), "float": ()}[meta["kind"]]
  for name in ("positions", "values") + required:
    if name not in segments:
      raise ConfigError(f"{where}: segment {name!r} is missing; the spec is corrupted")
  enc = sparse.Sparse(meta["encoding"], int(meta.get("gap_bits", 0)), int(meta.get("codes", 0)),
                      int(meta["nnz"]), segments["positions"], segments["values"],
                      int(meta.get("group_n", 0)),
                      tuple(int(a) for a in meta.get("group_axes", ())),
                      tuple(int(a) for a in meta.get("window_axes", ())))
  nonzero, values = sparse.decode(enc, n, bits, where=where, shape=walked)
  f32 = lambda name, width=sparse.FLOAT_BITS: (
      sparse.float_values(segments[name], width) if name in segments else None)
  qmin = int(meta.get("qmin", 0))
  zero_point = None
  if "zero_point" in segments:
    zero_point = unpack_bits(segments["zero_point"], bits, int(np.prod(scale_shape))).astype(
        np.int32).reshape(scale_shape) + qmin
  if meta["kind"] == "int":
    fill = np.broadcast_to(0 if zero_point is None else zero_point, shape)
    if order is not None:
      fill = np.transpose(fill, np.argsort(order))
    codes = fill.reshape(-1).astype(np.int32)
    codes[nonzero] = values.astype(np.int32) + qmin
  elif meta["kind"] == "kmeans":
    codes = np.full(n, 1 << bits, np.int32)
    codes[nonzero] = values
  else:
    codes = np.zeros(n, np.float32)
    codes[nonzero] = values
  act = meta.get("act")
  scale_bits = int(meta.get("scale_bits", 32))
  scale = f32("scale", scale_bits)
  if scale is not None and scale.size > 1:
    scale = scale.reshape(scale_shape)
  codes, group, window = codes.reshape(walked), enc.group_axes, enc.window_axes
  if order is not None:  # back to the stored layout
    codes = np.transpose(codes, order)
    group, window = (tuple(order.index(a) for a in x) for x in (group, window))
  codebook = f32("codebook")
  if codebook is not None:  # one codebook per index of the leading codebook_axes
    codebook = codebook.reshape(shape[:int(meta.get("codebook_axes", 0))] + (1 << bits,))
  return LayerTensor(path, meta["kind"], codes, bits, qmin, zero_point, scale, f32("gain"),
                     f32("bias"), codebook, None if act is None else dict(act),
                     group or None, scale_bits, window or None)
