"""Size accounting of an artifact: bytes on disk per stored tensor and in total, against float32.

The float32 reference of a model is 4 bytes per entry of its ``params`` (weights, biases,
normalization scales and biases; running statistics are not parameters): 1,078,888 bytes for
ResNet-20. A tensor's bytes are its segments in the raw arrays; the total is what the artifact's
files take on disk (``os.path.getsize``), compression and the (gzipped) JSON spec included.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxcompress.export.files import read_spec, spec_path
from jaxcompress.export.sparse import NM_GROUP
from jaxcompress.tables import markdown_table


def _float32_bytes(path: str, shape) -> int:
  """The float32 bytes of the model's parameters a stored tensor stands for: its own for a
  parameter; for a folded BatchNorm (``fold/``: ``[gain; bias]``, or ``[bias]`` where the gain
  went into the weight scales) the BatchNorm's scale and bias, two per channel."""
  if path.startswith("fold/"):
    return 4 * 2 * int(shape[-1])
  return 4 * int(np.prod(shape)) if path.startswith("params/") else 0


def size_report(out_dir: str) -> dict[str, Any]:
  """Per-tensor and total bytes of the artifact in ``out_dir``, against float32.

  Returns:
    ``{'layers': [{'path', 'kind', 'bits', 'encoding', 'huffman', 'shape', 'density', 'bytes',
    'float32_bytes'}] (one per stored tensor; ``huffman``: its Huffman-coded segments),
    'arrays_raw_bytes', 'arrays_bytes', 'spec_file', 'spec_bytes', 'total_bytes',
    'float32_bytes', 'ratio', 'compression'}``; ``total_bytes`` is the sum of the artifact's
    file sizes on disk and ``ratio`` is ``float32_bytes / total_bytes``.
  """
  spec_file = spec_path(out_dir)
  spec = read_spec(out_dir, "export")
  total_ref = int(spec["float32_bytes"])
  layers = []
  for meta in spec["layers"]:
    n = int(np.prod(meta["shape"]))
    layers.append({
        "path": meta["path"], "kind": meta["kind"], "bits": meta.get("bits", 32),
        "encoding": (f"nm {meta['group_n']}:{NM_GROUP}" if meta.get("encoding") == "nm" else
                     meta.get("encoding", "dense") + (
                         str(meta["gap_bits"]) if meta.get("encoding") == "gaps" else "")),
        "huffman": list(meta.get("huffman", [])),
        "shape": meta["shape"], "density": round(meta.get("nnz", n) / n, 4),
        "bytes": sum(meta["segments"].values()),
        "float32_bytes": _float32_bytes(meta["path"], meta["shape"])})
  files = [spec_file, os.path.join(out_dir, spec["arrays"]["file"])]
  total = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
  return {"layers": layers, "arrays_raw_bytes": spec["arrays"]["raw_bytes"],
          "arrays_bytes": os.path.getsize(os.path.join(out_dir, spec["arrays"]["file"])),
          "spec_file": os.path.basename(spec_file), "spec_bytes": os.path.getsize(spec_file),
          "total_bytes": total,
          "float32_bytes": total_ref, "ratio": round(total_ref / total, 3),
          "compression": spec["arrays"]["compression"]}


def format_report(report: dict[str, Any]) -> str:
  """A Markdown table of :func:`size_report` (one row per layer, then the totals)."""
  rows = [(l["path"], l["kind"], str(l["bits"]),
           l["encoding"] + (" + Huffman" if l["huffman"] else ""),
           f"{l['density']:.3f}", f"{l['bytes']:,}", f"{l['float32_bytes']:,}")
          for l in report["layers"]]
  rows.append((f"arrays (raw / on disk, {report['compression']})", "", "", "", "",
               f"{report['arrays_raw_bytes']:,} / {report['arrays_bytes']:,}", ""))
  rows.append((report["spec_file"], "", "", "", "", f"{report['spec_bytes']:,}", ""))
  rows.append(("**total on disk**", "", "", "", "", f"**{report['total_bytes']:,}**",
               f"**{report['float32_bytes']:,}** ({report['ratio']:.1f}x smaller)"))
  return markdown_table(("layer", "kind", "bits", "encoding", "density", "bytes",
                         "float32 bytes"), rows, align="llrlrrr")
