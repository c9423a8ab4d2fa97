"""The artifact's files: names, the gzipped spec, atomic writes and checked reads.

An artifact folder holds ``arrays.bin`` and ``spec.json.gz`` (``spec.json`` when exported without
compression). Reads check the format, version, sizes and SHA-256 and end in one
:class:`~jaxcompress.errors.ConfigError` line for a missing, truncated or edited file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from typing import Any

from jaxcompress.checkpoint import WRITE_FAILURES
from jaxcompress.errors import ConfigError

FORMAT, VERSION = "jaxcompress-export", 4
# 3 added Huffman-coded segments; 4 encodes the entries of a weight whose channel axes were moved
# last in the weight's own axis order (before: in the stored order). Older artifacts read as before.
READ_VERSIONS = (2, 3, 4)
WEIGHT_ORDER_SINCE = 4
SPEC_FILE, SPEC_GZ, ARRAYS_FILE = "spec.json", "spec.json.gz", "arrays.bin"
_SPEC_SUFFIXES = (".json", ".json.gz")  # a path with these names a spec file, not a folder


def _path(path: Any, field: str) -> str:
  """``path`` (a ``str``, ``bytes`` or ``os.PathLike`` such as ``pathlib.Path``) as a ``str``;
  ``~`` is the home folder, as in the data, weights and text paths and ``--workdir``."""
  try:
    return os.path.expanduser(os.fsdecode(path))
  except TypeError:
    raise ConfigError(f"{field}: the artifact folder must be a path (str or pathlib.Path), got "
                      f"{type(path).__name__}") from None


def _folder(path: str) -> str:
  """The artifact folder of ``path``: the folder itself, or the one holding a given spec file."""
  return os.path.dirname(path) if path.endswith(_SPEC_SUFFIXES) else path


def spec_path(out_dir: str) -> str:
  """The spec file of an artifact folder: ``spec.json.gz``, else ``spec.json``."""
  gz = os.path.join(out_dir, SPEC_GZ)
  return gz if os.path.isfile(gz) else os.path.join(out_dir, SPEC_FILE)


def spec_bytes(spec: dict, compress: bool = True) -> bytes:
  """The spec file's bytes: compact JSON with one layer per line (valid, small, still diffable),
  gzipped (level 9, no name or time: the same spec gives the same bytes) or plain."""
  compact = lambda obj: json.dumps(obj, separators=(",", ":"))  # noqa: E731
  head = compact({**spec, "layers": []})[:-len('[]}')]
  text = head + "[\n" + ",\n".join(compact(l) for l in spec["layers"]) + "\n]}\n"
  return gzip.compress(text.encode(), 9, mtime=0) if compress else text.encode()


def make_folder(path: str, field: str = "out_dir") -> None:
  """Creates the folder ``path`` (and its parents) unless it exists.

  Raises:
    ConfigError: ``path`` or one of its parents is a file, or the folder cannot be made (a name
      too long, no permission).
  """
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise ConfigError(f"{field}: {path!r} is a file or lies under one; give a folder "
                      "(new, or an earlier export's to replace it)") from None
  except OSError as e:
    raise ConfigError(f"{field}: cannot make the folder {path!r} ({e.strerror or e})") from None


def write_files(files: dict[str, bytes], field: str = "out_dir") -> None:
  """Writes every file to a temporary name, then renames them all: a failed write (a full disk)
  leaves the files that were there as they were, and no temporary file behind.

  Raises:
    OSError: the file system refused the write (:data:`~jaxcompress.checkpoint.WRITE_FAILURES`:
      a full disk, a read-only folder), naming the file: a job reports it against its workdir,
      as it does every other full-disk write.
    ConfigError: a file cannot be written for another reason (one line, naming it and the
      reason).
  """
  written = []
  try:
    for path, data in files.items():
      written.append(path + ".tmp")
      with open(written[-1], "wb") as f:
        f.write(data)
  except BaseException as e:  # a failed write, or Ctrl-C or SIGTERM during it
    for tmp in written:
      if os.path.isfile(tmp):
        os.remove(tmp)
    if not isinstance(e, OSError):
      raise
    if e.errno in WRITE_FAILURES:  # a failed write() or close() names no file
      raise OSError(e.errno, e.strerror, path) from None
    raise ConfigError(f"{field}: cannot write {path!r} ({e.strerror or e}); nothing was "
                      "replaced") from None
  for path in files:
    os.replace(path + ".tmp", path)


def read_spec(path: str, field: str = "model.exported") -> dict:
  """Reads and checks the spec of an artifact folder (or its ``spec.json[.gz]`` file)."""
  path = _path(path, field)
  file = path if path.endswith(_SPEC_SUFFIXES) else spec_path(path)
  if not os.path.isfile(file):
    raise ConfigError(f"{field}: no {SPEC_GZ} or {SPEC_FILE} in {path!r}; point it at the folder "
                      "export_model wrote (e.g. WORKDIR/export)")
  try:
    with open(file, "rb") as f:
      data = f.read()
    spec = json.loads(gzip.decompress(data) if file.endswith(".gz") else data)
  # gzip.BadGzipFile and JSON errors are ValueErrors; damage inside the deflate stream, zlib.error
  except (OSError, EOFError, ValueError, zlib.error) as e:
    raise ConfigError(f"{field}: {file!r} is not valid {'gzipped ' * file.endswith('.gz')}JSON "
                      f"({e}); the artifact is corrupted, export it again") from None
  if not isinstance(spec, dict) or spec.get("format") != FORMAT:
    raise ConfigError(f"{field}: {file!r} is not a {FORMAT} spec")
  if spec.get("version") not in READ_VERSIONS:
    raise ConfigError(f"{field}: {file!r} has format version {spec.get('version')!r}, this "
                      f"jaxcompress reads versions {list(READ_VERSIONS)}; export it again")
  return spec


def read_arrays(path: str, spec: dict, field: str = "model.exported") -> bytes:
  """The raw (decompressed) arrays of an artifact, after the size and SHA-256 checks."""
  info = spec["arrays"]
  if not isinstance(info.get("file"), str) or os.path.basename(info["file"]) != info["file"] or (
      info["file"] in ("", ".", "..")):
    raise ConfigError(f"{field}: the spec's arrays file must be a file name in the artifact "
                      f"folder, got {info.get('file')!r}; the spec is corrupted")
  for key in ("bytes", "raw_bytes"):  # a size given as text would read as a size mismatch
    if isinstance(info.get(key), bool) or not isinstance(info.get(key), int):
      raise ConfigError(f"{field}: the spec's arrays {key} is {info.get(key)!r}, not an integer; "
                        "the spec is corrupted, export it again")
  file = os.path.join(_folder(_path(path, field)), info["file"])
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
    try:
      data = zlib.decompress(data)
    except zlib.error as e:
      raise ConfigError(f"{field}: {file!r} is not a valid zlib stream ({e}); the artifact is "
                        "corrupted, export it again") from None
  elif info["compression"] != "none":
    raise ConfigError(f"{field}: unknown compression {info['compression']!r} in the spec")
  if len(data) != info["raw_bytes"]:
    raise ConfigError(f"{field}: arrays hold {len(data)} bytes after decompression, the spec "
                      f"says {info['raw_bytes']}")
  return data
