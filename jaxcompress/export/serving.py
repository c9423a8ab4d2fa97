"""A ``jax.export`` (StableHLO) inference function that runs without jaxcompress.

:func:`save_serving` serializes ``inputs -> outputs`` of a loaded artifact, weights embedded as
constants, with a symbolic batch size, into ``DIR/serving/model.jaxexport``, and describes its
signature in ``DIR/serving/signature.json``. It lives beside the artifact (``DIR/export``), not in
it, so the artifact's bytes stay the model's bytes. Running it needs only JAX; it takes uint8
images where saved with ``mean`` and ``std`` (as the jobs save it), else the model's own input
(``signature.json`` says which). A CIFAR-10 model, saved as the jobs save it, with ``DIR=run``:

  >>> from jaxcompress.export import export_model, load
  >>> _ = export_model("run/export", variables=variables, input_shape=(32, 32, 3))
  >>> _ = save_serving("run/serving", load("run/export", model), mean=(0.49, 0.48, 0.45),
  ...                  std=(0.25, 0.24, 0.26))
  >>> import jax, numpy as np   # all that running it needs
  >>> with open("run/serving/model.jaxexport", "rb") as f:
  ...   exported = jax.export.deserialize(bytearray(f.read()))
  >>> exported.call(np.zeros((8, 32, 32, 3), np.uint8)).shape
  (8, 10)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.data import check_normalization
from jaxcompress.errors import ConfigError, first_line, invalid
from jaxcompress.export import inputs as io
from jaxcompress.export.files import make_folder, write_files
from jaxcompress.export.runtime import check_loaded

SERVING_FILE, SIGNATURE_FILE = "model.jaxexport", "signature.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def save_serving(out_dir: str, loaded: Any, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 platforms: Sequence[str] = ("cpu",)) -> dict:
  """Serializes the inference function of a loaded artifact with ``jax.export``.

  Args:
    out_dir: the serving folder, by convention ``WORKDIR/serving`` (created).
    loaded: a :class:`~jaxcompress.export.runtime.LoadedModel` (from :func:`load`).
    mean: per-channel mean of pixel/255; with ``std`` the function takes ``uint8`` images and
      normalises them itself. Without them it takes the model's own input (normalised float32
      images, int32 token ids: the artifact's input dtype).
    std: per-channel std of pixel/255.
    platforms: platforms to lower for (``"cpu"``, ``"cuda"``, ``"tpu"``).

  Returns:
    The signature written to ``signature.json``.

  Raises:
    ConfigError: if ``loaded`` is not a ``LoadedModel``, ``platforms`` is not a non-empty tuple
      of platform names, only one of ``mean``/``std`` is given, or ``flatbuffers`` is not
      installed.
  """
  try:
    import flatbuffers  # noqa: F401  (jax.export serialization imports it lazily)
  except ImportError:
    raise ConfigError("save_serving needs the flatbuffers package, which jax.export uses to "
                      "serialize; pip install flatbuffers") from None
  check_loaded(loaded, "save_serving")
  # A bare string was taken letter by letter: 'cpu' lowered for platforms c, p, u.
  if (isinstance(platforms, str) or not isinstance(platforms, (tuple, list)) or not platforms
      or not all(isinstance(p, str) and p in PLATFORMS for p in platforms)):
    raise invalid("save_serving platforms", platforms,
                  f"a non-empty tuple of {', '.join(PLATFORMS)}", "e.g. ('cpu',) or ('cpu', "
                  "'cuda'); a GPU is 'cuda' or 'rocm'")
  if (mean is None) != (std is None):
    raise ConfigError("save_serving: give both mean and std (uint8 input) or neither "
                      f"(normalised float32 input), got mean={mean!r}, std={std!r}")
  spec = loaded.spec
  arrays, apply_fn = loaded.arrays, loaded.apply_fn
  if mean is not None and io.single(spec["input"]) is None:
    raise ConfigError("save_serving: mean and std normalise one image input; this model takes "
                      f"{io.describe(spec['input'])}: give neither")

  # The arrays are compiled in as constants; behind a barrier XLA computes with them as with the
  # loaded model's arguments (it would otherwise fold a transposed embedding into another layout,
  # and sum a tied head's products in another order).
  opaque = lambda: jax.lax.optimization_barrier(arrays)
  if mean is not None:
    check_normalization(mean, std, io.single(spec["input"])[0][-1], field="save_serving")
    m = np.asarray(mean, np.float32) * 255
    s = np.asarray(std, np.float32) * 255

    def serve(images):
      return apply_fn(opaque(), (images.astype(jnp.float32) - m) / s)

    dtype = jnp.uint8
  else:

    def serve(inputs):
      return apply_fn(opaque(), inputs)

    dtype = None  # the artifact's own
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      io.structs(spec["input"], batch, dtype))
  logits = jax.eval_shape(serve, io.structs(spec["input"], 1, dtype))
  signature = {"file": SERVING_FILE, "input": {**io.with_batch(spec["input"], dtype),
                                                "normalised_inside": mean is not None},
               "output": {"shape": ["batch", *logits.shape[1:]],
                          "dtype": jnp.dtype(logits.dtype).name},
               "platforms": list(platforms), "model": spec.get("model", ""),
               "usage": "jax.export.deserialize(bytearray(open(file, 'rb').read())).call("
                        f"{'images' if mean is not None else 'inputs'})"}
  make_folder(out_dir)
  write_files({os.path.join(out_dir, SERVING_FILE): bytes(exported.serialize()),
               os.path.join(out_dir, SIGNATURE_FILE): json.dumps(signature, indent=1).encode()})
  return signature


def load_serving(out_dir: str) -> Callable:
  """``images -> logits`` from a serving folder; the plain-JAX code of the module docstring."""
  path = os.path.join(out_dir, SERVING_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"serving: no {SERVING_FILE} in {out_dir!r}; write it with save_serving")
  with open(path, "rb") as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # a truncated or foreign file: struct, flatbuffers or value errors
    raise ConfigError(f"serving: {path!r} is not a serialized jax.export function "
                      f"({first_line(e)}); it is corrupted, write it again with "
                      "save_serving") from None
  return exported.call
