"""Reading a model's variables from disk: PyTorch ``.npz``, flax ``.msgpack``, orbax checkpoint.

Three formats, told apart by the path:

- ``*.npz``: a PyTorch-layout ``state_dict`` (:mod:`jaxcompress.models.torch_import`);
- ``*.msgpack``: the variables dict ``{'params': ..., 'batch_stats': ...}`` written with
  ``flax.serialization.to_bytes`` (or ``msgpack_serialize``);
- a directory: an orbax checkpoint (``StandardCheckpointer``/``PyTreeCheckpointer``) holding
  the variables dict, a bare ``params`` tree (for a model without other collections), or a larger
  dict with a ``params`` key, such as a train state, whose other collections are read from the
  top level or from ``model_state``; other entries (optimizer state, step) are ignored.

Whatever the format, the tree read must have the model's paths and shapes exactly; a mismatch
raises one line naming the first mismatching path and both shapes. Arrays come back as NumPy
arrays in the model's dtypes.

Weights may also be given **by name** (``resnet56_cifar10``: no path separator, no extension):
:func:`find_weights` looks for ``{name}.npz``, ``{name}.msgpack`` or an orbax folder ``{name}/`` in
a weights folder (:func:`weights_dir`: the configured one, else ``$JAXCOMPRESS_WEIGHTS_DIR``,
else ``~/.cache/jaxcompress/weights``), and :func:`save_weights` stores trained variables there
under their name, so the next run finds them.

Example:
  >>> import flax.serialization
  >>> from jaxcompress.models import create_model
  >>> with open("w.msgpack", "wb") as f:
  ...   _ = f.write(flax.serialization.to_bytes(variables))
  >>> model, variables = create_model("my_models:small_cnn", num_classes=10,
  ...                                 image_shape=(32, 32, 3), weights="w.msgpack")
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from jaxcompress.datasets import DATASETS
from jaxcompress.errors import ConfigError, check_finite
from jaxcompress.models.torch_import import load_npz, torch_to_flax

FORMATS = ("a PyTorch-layout .npz, a flax.serialization .msgpack file of the variables dict or an "
           "orbax checkpoint directory")
WEIGHTS_ENV = "JAXCOMPRESS_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = "~/.cache/jaxcompress/weights"
SUFFIXES = (".npz", ".msgpack")


def weights_dir(configured: str = "") -> str:
  """The weights folder: ``configured``, else ``$JAXCOMPRESS_WEIGHTS_DIR``, else the cache."""
  return os.path.expanduser(configured or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


def is_name(spec: str) -> bool:
  """``spec`` names weights (``resnet20_cifar10``) rather than giving a path to them."""
  return bool(spec) and os.sep not in spec and "/" not in spec and not spec.startswith(".") \
      and os.path.splitext(spec)[1].lower() not in SUFFIXES


def named_dataset(spec: str) -> str | None:
  """The dataset a weights name says it is for, by its ``_<dataset>`` suffix
  (``resnet20_cifar10``: ``cifar10``; the longest that fits: ``_fashion_mnist`` is not
  ``_mnist``); ``None`` for a path, or a name without such a suffix."""
  found = [d for d in DATASETS if is_name(spec) and spec.endswith(f"_{d}")]
  return max(found, key=len) if found else None


def check_dataset(spec: str, dataset: str, *, field: str = "model.weights") -> None:
  """Raises one line if ``spec`` names weights for another dataset than ``dataset``
  (:func:`named_dataset`): trained on other images or classes, and a job that trains weights it
  does not find would save them under a name that says otherwise."""
  named = named_dataset(spec)
  if named not in (None, dataset):
    raise ConfigError(f"{field}: {spec!r} names weights for {named}, but data.name is "
                      f"{dataset!r}; give weights for {dataset} (a name such as "
                      f"{spec[:-len(named)] + dataset!r}, or a path)")


def find_weights(name: str, folder: str) -> str | None:
  """The file (or orbax folder) of weights ``name`` in ``folder``, or ``None`` if there is none."""
  for candidate in (f"{name}.npz", f"{name}.msgpack", name):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path) or (candidate == name and os.path.isdir(path)):
      return path
  return None


def resolve_weights(spec: str, folder: str) -> str | None:
  """A weights path from a config value: a path as given, or a name looked up in ``folder``.

  Returns ``None`` for an empty ``spec`` and for a name with no file in ``folder`` (the caller
  decides whether to train it).
  """
  if not spec:
    return None
  return find_weights(spec, folder) if is_name(spec) else spec


def locate(spec: str, *, folder: str = "", field: str = "model.weights") -> str:
  """The path of weights given as a path or by name (looked up in :func:`weights_dir`).

  Raises:
    ConfigError: a name with no file in the weights folder.
  """
  if not is_name(spec):
    return os.path.expanduser(spec)
  folder = weights_dir(folder)
  path = find_weights(spec, folder)
  if path is None:
    raise ConfigError(f"{field}: no weights named {spec!r} in the weights folder {folder!r} "
                      f"(looked for {spec}.npz, {spec}.msgpack and an orbax folder {spec}/); "
                      f"point ${WEIGHTS_ENV} at the folder that holds them, give a path, or let "
                      "the main job train them (pretrain.epochs > 0)")
  return path


def check_writable(folder: str, *, field: str = "weights_dir") -> None:
  """Raises one line unless ``folder`` is a writable folder or can be created; creates nothing
  (a run refused by a later check leaves no folder behind)."""
  fix = f"set --config.{field} or ${WEIGHTS_ENV} to a writable folder"
  existing = os.path.abspath(folder)
  while not os.path.exists(existing):  # the folder, or the nearest parent that exists
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{field}: cannot create the weights folder {folder!r} ({existing!r} is a "
                      f"file); {fix}")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{field}: the weights folder {folder!r} is not writable; {fix}")


def save_weights(variables: Any, name: str, folder: str, *, field: str = "weights_dir") -> str:
  """Writes ``variables`` as ``{folder}/{name}.msgpack`` atomically
  (:func:`jaxcompress.checkpoint.write_file`).

  Returns:
    The path written.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from jaxcompress.checkpoint import write_file  # pylint: disable=g-import-not-at-top
  check_writable(folder, field=field)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}.msgpack")
  data = flax.serialization.to_bytes(_to_numpy(variables))

  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)

  write_file(path, write)
  return path


def weights_format(path: str, *, field: str = "model.weights") -> str:
  """Which format ``path`` holds (``npz``, ``msgpack`` or ``orbax``), without reading it.

  Raises:
    ConfigError: the path does not exist, or is a file of another kind; a name with no file.
  """
  path = locate(path, field=field)
  if os.path.isdir(path):
    return "orbax"
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no such file {path!r}; give {FORMATS}, or a weights name looked "
                      f"up in the weights folder (${WEIGHTS_ENV})")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".npz", ".msgpack"):
    return ext[1:]
  raise ConfigError(f"{field}: {path!r} must be {FORMATS}, got a {ext or 'extension-less'} "
                    "file; rename it or save the variables with flax.serialization.to_bytes")


def read_tree(path: str, *, field: str = "model.weights") -> Any:
  """Reads the raw tree of a ``.msgpack`` file or an orbax checkpoint directory.

  Returns:
    Nested dicts of NumPy arrays, as stored.

  Raises:
    ConfigError: a missing path, or a file or folder that cannot be parsed.
  """
  path = locate(path, field=field)
  kind = weights_format(path, field=field)
  if kind == "msgpack":
    from flax import serialization
    try:
      with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001  msgpack raises many types for a bad file
      raise ConfigError(f"{field}: {path!r} is not a readable flax msgpack file "
                        f"({type(e).__name__}: {_one_line(e)})") from None
  if kind == "orbax":
    import orbax.checkpoint as ocp
    try:
      with warnings.catch_warnings():  # "sharding info not provided": we want host arrays
        warnings.simplefilter("ignore")
        with ocp.PyTreeCheckpointer() as ckpt:
          tree = ckpt.restore(os.path.abspath(path))
    except Exception as e:  # noqa: BLE001  orbax raises many types for a bad folder
      hint = ("; for a jaxcompress training checkpoint give its state folder, e.g. "
              f"{os.path.join(path, 'state')}" if os.path.isdir(os.path.join(path, "state"))
              else "")
      raise ConfigError(f"{field}: {path!r} is not a readable orbax checkpoint "
                        f"({type(e).__name__}: {_one_line(e)}){hint}") from None
    return _to_numpy(tree)
  raise ConfigError(f"{field}: {path!r} is a PyTorch .npz; read it with load_weights")


def _one_line(e: Exception) -> str:
  text = str(e).strip()
  return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_to_numpy(v) for v in tree)
  return np.asarray(tree)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{'a/b/c': leaf}`` over nested dicts (keys as strings); empty dicts vanish."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def _shape(x: Any) -> list[int] | None:
  shape = getattr(x, "shape", None)
  return None if shape is None else [int(d) for d in shape]


def _select(tree: Any, reference: dict, field: str, path: str) -> dict:
  """The model's collections out of what the file holds (see the module docstring)."""
  if not isinstance(tree, dict):
    raise ConfigError(f"{field}: {path!r} holds a {type(tree).__name__}, not a dict of "
                      "variables {'params': ..., 'batch_stats': ...}")
  collections = list(reference)
  if "params" not in tree:
    if collections == ["params"]:
      return {"params": tree}  # a bare params tree
    keys = ", ".join(map(str, list(tree)[:5])) or "none"
    raise ConfigError(f"{field}: {path!r} has no 'params' entry (top-level keys: {keys}); the "
                      f"model needs {', '.join(collections)}: save its whole variables dict")
  if set(tree) <= set(collections):
    return tree
  state = tree.get("model_state") if isinstance(tree.get("model_state"), dict) else {}
  return {c: tree[c] if c in tree else state[c] for c in collections if c in tree or c in state}


def fit_to(tree: Any, reference: dict, *, field: str = "model.weights",
           path: str = "weights") -> dict:
  """Checks a tree read from a file against the model's variables and casts it to their dtypes.

  Args:
    tree: what the file holds (see the module docstring for the layouts accepted).
    reference: the model's variables, or their ``jax.ShapeDtypeStruct`` s.
    field: config field, for messages.
    path: the file, for messages.

  Returns:
    The variables dict, NumPy arrays with the reference's paths, shapes and dtypes.

  Raises:
    ConfigError: naming the first path that is missing, extra or of another shape.
  """
  got = _flatten(_select(tree, reference, field, path))
  order = sorted(reference, key=lambda c: c != "params")  # params first: the telling mismatch
  want = _flatten({c: reference[c] for c in order})
  prefix = f"{field}: {path!r} does not fit the model:"
  hint = "; is it for another model or number of classes?"
  for key, ref in want.items():
    if key not in got:
      raise ConfigError(f"{prefix} {key} (shape {_shape(ref)}) is missing from the file{hint}")
    if _shape(got[key]) != _shape(ref):
      raise ConfigError(f"{prefix} {key} has shape {_shape(got[key])} in the file, the model "
                        f"needs {_shape(ref)}{hint}")
  for key, value in got.items():
    if key not in want:
      raise ConfigError(f"{prefix} the file has {key} (shape {_shape(value)}), which the model "
                        f"does not have{hint}")
  out: dict = {}
  for key, ref in want.items():
    *parents, leaf = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(got[key], dtype=ref.dtype)
  return out


def load_weights(path: str, reference: dict, *, field: str = "model.weights") -> dict:
  """Reads ``path`` (any format above) as variables that fit ``reference``.

  Args:
    path: a ``.npz``, a ``.msgpack`` file or an orbax checkpoint directory, or a weights name
      (:func:`locate`).
    reference: the model's variables or their shapes (``jax.eval_shape`` of its init).
    field: config field, for messages (``student.weights``).

  Returns:
    The variables dict of NumPy arrays.

  Raises:
    ConfigError: one line for a missing, unreadable or mismatching file, or one holding NaN/Inf.
  """
  path = locate(path, field=field)
  if weights_format(path, field=field) == "npz":
    variables = torch_to_flax(load_npz(path, field=field), reference, source=f"{field}={path}")
  else:
    variables = fit_to(read_tree(path, field=field), reference, field=field, path=path)
  check_finite(f"{field}: {path!r} entry ", variables, "weights must be finite (a model "
               "evaluated, distilled from or fine-tuned with them computes NaN): use weights "
               "saved before the run diverged")
  return variables
