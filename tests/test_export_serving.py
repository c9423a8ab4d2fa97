"""The jax.export inference function: runs with plain JAX (no jaxcompress) and equals the
artifact bit for bit."""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.export import files, load, load_serving, save_serving
from jaxcompress.models import get_model
from test_export_runtime import mlp_artifact

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

PLAIN_JAX = """
import sys
sys.modules["jaxcompress"] = None  # importing jaxcompress now fails: prove we do not need it
import jax, numpy as np
for model, inputs, out in zip(*[iter(sys.argv[1:])] * 3):
  with open(model, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  np.save(out, np.asarray(exported.call(np.load(inputs))))
"""


def test_serving_functions_run_without_jaxcompress_and_equal_the_artifact(tmp_path):
  loaded = mlp_artifact(str(tmp_path / "export"))
  signature = save_serving(str(tmp_path / "uint8"), loaded, mean=MEAN, std=STD)
  assert signature["input"] == {"shape": ["batch", 8, 8, 3], "dtype": "uint8",
                                "normalised_inside": True}
  assert signature["output"] == {"shape": ["batch", 10], "dtype": "float32"}
  assert signature["model"] == "mlp"
  assert signature["usage"].endswith(".call(images)")
  assert sorted(os.listdir(tmp_path / "uint8")) == ["model.jaxexport", "signature.json"]
  assert sorted(os.listdir(tmp_path / "export")) == ["arrays.bin", "spec.json.gz"]  # kept apart
  float_sig = save_serving(str(tmp_path / "float"), loaded)
  assert float_sig["input"]["dtype"] == "float32" and not float_sig["input"]["normalised_inside"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)  # another batch size
  np.save(tmp_path / "images.npy", images)
  np.save(tmp_path / "x.npy", x)
  args = [str(tmp_path / p) for p in ("uint8/model.jaxexport", "images.npy", "u.npy",
                                      "float/model.jaxexport", "x.npy", "f.npy")]
  proc = subprocess.run([sys.executable, "-c", PLAIN_JAX, *args], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.asarray(loaded.logits(x)))
  m = np.asarray(MEAN, np.float32) * 255
  s = np.asarray(STD, np.float32) * 255
  normalised = (images.astype(np.float32) - m) / s  # float32, as the function normalises
  want = np.asarray(loaded.logits(normalised))
  np.testing.assert_array_equal(np.load(tmp_path / "u.npy"), want)
  np.testing.assert_array_equal(np.asarray(load_serving(str(tmp_path / "float"))(x)),
                                np.load(tmp_path / "f.npy"))


def test_bad_serving_arguments_raise_one_line(tmp_path):
  loaded = mlp_artifact(str(tmp_path / "export"), seed=1)
  with pytest.raises(ConfigError, match="give both mean and std"):
    save_serving(str(tmp_path / "other"), loaded, mean=MEAN)
  with pytest.raises(ConfigError, match=r"^save_serving.mean must be one value per channel of the "
                                        r"3-channel images, or one for all, got \(0.5, 0.5\)$"):
    save_serving(str(tmp_path / "other"), loaded, mean=(0.5, 0.5), std=STD)
  with pytest.raises(ConfigError, match=r"^save_serving.std must be finite values > 0 \(pixel / "
                                        r"255 units\), got \(0.2, 0.0, 0.3\)$"):
    save_serving(str(tmp_path / "other"), loaded, mean=MEAN, std=(0.2, 0.0, 0.3))
  # platforms='cpu' was lowered for the platforms 'c', 'p', 'u' (the function then refused to run
  # on the CPU), () recorded no platform, 'gpu' was a bare RuntimeError from JAX.
  for platforms in ("cpu", (), ("gpu",), ("cpu", None)):
    with pytest.raises(ConfigError, match=r"^save_serving platforms must be a non-empty tuple of "
                                          r"cpu, cuda, rocm, tpu, got .*'cuda' or 'rocm'$"):
      save_serving(str(tmp_path / "other"), loaded, platforms=platforms)
  assert not (tmp_path / "other").exists()
  with pytest.raises(ConfigError, match="serving: no model.jaxexport in"):
    load_serving(str(tmp_path / "absent"))


def test_the_signature_names_the_dtype_the_function_returns(tmp_path):
  """A model computing in bfloat16 returns bfloat16 logits; the signature says so."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jaxcompress import compose, export

  class Half(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(16, dtype=jnp.bfloat16)(x))
      h = nn.relu(nn.Dense(16, dtype=jnp.bfloat16)(h))
      return nn.Dense(4, dtype=jnp.bfloat16)(h)

  x = np.ones((2, 6), np.float32)
  model = Half()
  variables = model.init(jax.random.key(0), x)
  comp = compose.build(model, variables, x, optimizer=optax.sgd(0.1), total_steps=1,
                       quant=compose.QuantSpec(weight_bits=8))
  comp.export(str(tmp_path / "export"), comp.init_state(variables, x))
  signature = save_serving(str(tmp_path / "serving"),
                           export.load(str(tmp_path / "export"), model))
  served = load_serving(str(tmp_path / "serving"))(x)
  assert signature["output"] == {"shape": ["batch", 4], "dtype": "bfloat16"}
  assert signature["usage"].endswith(".call(inputs)")  # the model's own inputs, as exported
  assert jnp.dtype(served.dtype).name == "bfloat16"


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path):
  loaded = mlp_artifact(str(tmp_path / "export"))
  (tmp_path / "taken").write_text("")
  with pytest.raises(ConfigError, match=r"^out_dir: '.*taken' is a file or lies under one"):
    save_serving(str(tmp_path / "taken"), loaded)
  with pytest.raises(ConfigError, match=r"^out_dir: '.*taken/sub' is a file or lies under one"):
    save_serving(str(tmp_path / "taken" / "sub"), loaded)
  with pytest.raises(ConfigError, match=r"^out_dir: '.*taken' is a file or lies under one"):
    mlp_artifact(str(tmp_path / "taken"))  # the artifact itself
  with pytest.raises(ConfigError, match=r"^out_dir: cannot make the folder '.*' \(File name too "
                                        r"long\)$"):
    mlp_artifact(str(tmp_path / ("x" * 300)))


def test_a_failed_write_keeps_the_earlier_files_and_leaves_no_temporary_one(tmp_path):
  """A folder where a temporary file goes stands for a full disk: the write fails part way."""
  out = tmp_path / "export"
  first = mlp_artifact(str(out), seed=0)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  want = np.asarray(first.logits(x))
  before = sorted(os.listdir(out))
  (out / "spec.json.gz.tmp").mkdir()
  with pytest.raises(ConfigError, match=r"^out_dir: cannot write '.*spec.json.gz' \(Is a "
                                        r"directory\); nothing was replaced$"):
    mlp_artifact(str(out), seed=1)
  (out / "spec.json.gz.tmp").rmdir()
  assert sorted(os.listdir(out)) == before  # no arrays.bin.tmp left
  np.testing.assert_array_equal(load(str(out), first.model).logits(x), want)

  serving = tmp_path / "serving"
  save_serving(str(serving), first)
  (serving / "signature.json.tmp").mkdir()
  with pytest.raises(ConfigError, match=r"^out_dir: cannot write '.*signature.json'"):
    save_serving(str(serving), first)
  assert sorted(os.listdir(serving)) == ["model.jaxexport", "signature.json",
                                         "signature.json.tmp"]


def test_a_full_disk_names_the_file_for_the_job_to_report_against_its_workdir(tmp_path,
                                                                             monkeypatch):
  """A full disk while writing is the system's refusal, an OSError naming the file, which a job
  reports as ``--workdir=W: No space left on device: FILE`` (as every other full-disk write);
  it was a ConfigError blaming ``out_dir``, a library argument the job's user never gave."""
  loaded = mlp_artifact(str(tmp_path / "export"))

  def full_disk(path, mode):  # the temporary file is made, then the disk is full
    builtins.open(path, mode).close()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(files, "open", full_disk, raising=False)
  serving = tmp_path / "serving.tmp"
  with pytest.raises(OSError) as raised:
    save_serving(str(serving), loaded)
  assert not isinstance(raised.value, ConfigError)
  assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
      errno.ENOSPC, "No space left on device", str(serving / "model.jaxexport"))
  assert os.listdir(serving) == []  # no temporary file left


def test_a_truncated_serving_file_is_one_line(tmp_path):
  save_serving(str(tmp_path), mlp_artifact(str(tmp_path / "export")))
  data = (tmp_path / "model.jaxexport").read_bytes()
  (tmp_path / "model.jaxexport").write_bytes(data[:len(data) // 2])
  with pytest.raises(ConfigError, match=r"^serving: '.*model.jaxexport' is not a serialized "
                                        r"jax.export function \(.*\); it is corrupted"):
    load_serving(str(tmp_path))


def test_an_artifact_without_a_model_name_is_served(tmp_path):
  out = tmp_path / "export"
  mlp_artifact(str(out))
  spec = json.loads(gzip.decompress((out / "spec.json.gz").read_bytes()))
  del spec["model"]  # informational: load reads such a spec, and so does save_serving
  (out / "spec.json.gz").write_bytes(gzip.compress(json.dumps(spec).encode()))
  signature = save_serving(str(tmp_path / "serving"), load(str(out), get_model("mlp")))
  assert signature["model"] == ""


def test_ctrl_c_while_the_artifact_files_are_written_leaves_no_temporary_file(tmp_path,
                                                                              monkeypatch):
  # the second file's write is interrupted: the first one's temporary copy must go too, as
  # checkpoint.write_file's does
  from jaxcompress.export.files import write_files
  opened = builtins.open

  def interrupted(path, *args, **kwargs):
    if str(path).endswith("b.bin.tmp"):
      raise KeyboardInterrupt
    return opened(path, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", interrupted)
  with pytest.raises(KeyboardInterrupt):
    write_files({str(tmp_path / "a.bin"): b"1", str(tmp_path / "b.bin"): b"2"})
  assert os.listdir(tmp_path) == []
