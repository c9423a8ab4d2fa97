"""The jax.export inference function: runs with plain JAX (no jaxcompress) and equals the model."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import save_serving
from test_export_runtime import mlp_artifact

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

PLAIN_JAX = """
import sys
sys.modules["jaxcompress"] = None  # importing jaxcompress now fails: prove we do not need it
import jax, numpy as np
with open(sys.argv[1], "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(images)))
"""


def test_serving_function_runs_without_jaxcompress_and_matches_the_artifact(tmp_path):
  loaded = mlp_artifact(str(tmp_path / "export"))
  signature = save_serving(str(tmp_path / "serving"), loaded, mean=MEAN, std=STD)
  assert signature["input"] == {"shape": ["batch", 8, 8, 3], "dtype": "uint8",
                                "normalised_inside": True}
  assert sorted(os.listdir(tmp_path / "serving")) == ["model.jaxexport", "signature.json"]
  assert sorted(os.listdir(tmp_path / "export")) == ["arrays.bin", "spec.json"]  # kept apart
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  proc = subprocess.run([sys.executable, "-c", PLAIN_JAX, str(tmp_path / "serving" /
                                                              "model.jaxexport"),
                         str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  normalised = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  want = np.asarray(loaded.logits(normalised.astype(np.float32)))
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, rtol=1e-4, atol=1e-4)


def test_float_input_variant_takes_any_batch_size(tmp_path):
  loaded = mlp_artifact(str(tmp_path / "export"), seed=1)
  save_serving(str(tmp_path / "serving"), loaded)
  with open(tmp_path / "serving" / "model.jaxexport", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  for batch in (1, 3):
    x = np.random.default_rng(batch).standard_normal((batch, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(exported.call(x), loaded.logits(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="give both mean and std"):
    save_serving(str(tmp_path / "other"), loaded, mean=MEAN)
