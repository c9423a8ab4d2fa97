"""Data parallelism: 4 simulated CPU devices give the loss of 1 device; multi-process settings.

(Runs of several processes are in test_multihost.py.)
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

from jaxcompress import parallel
from jaxcompress.errors import ConfigError

SCRIPT = textwrap.dedent("""
    import jax, json, numpy as np
    from configs import common
    from jaxcompress import parallel
    from jaxcompress.data import Batch
    from jaxcompress.models import create_model
    from jaxcompress.optim import OptimizerSpec, make_optimizer
    from jaxcompress.steps import TrainState, make_train_step, make_eval_step, supervised_loss
    assert jax.device_count() == 4, jax.devices()
    model, v = create_model("resnet20", num_classes=4, image_shape=(8, 8, 3))
    cfg = common.train_config(); cfg.schedule = "constant"; cfg.learning_rate = 0.05
    opt = make_optimizer(OptimizerSpec.from_mapping(cfg), 10)
    rng = np.random.default_rng(0)
    batches = [Batch(rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                     rng.integers(0, 4, 16).astype(np.int32), np.ones(16, np.float32))
               for _ in range(3)]
    out = {}
    for n in (1, 4):
      mesh = parallel.make_mesh(jax.devices()[:n])
      params = dict(v)["params"]
      state = parallel.replicate(mesh, TrainState.create(params, {"batch_stats": v["batch_stats"]}, opt))
      step = make_train_step(supervised_loss(model), opt, mesh=mesh)
      losses = []
      for b in batches:
        state, m = step(state, parallel.shard_batch(mesh, b))
        losses.append(float(m["loss"]))
      ev = make_eval_step(lambda var, x: model.apply(var, x), mesh=mesh)
      loss, _, _ = ev({"params": state.params, **state.model_state}, parallel.shard_batch(mesh, batches[0]))
      out[n] = {"losses": losses, "eval": float(np.mean(loss)),
                "sharded": len(state.params["conv1"]["kernel"].sharding.device_set)}
    out["rows"] = parallel.local_rows(parallel.make_mesh(), 16)  # one process holds them all
    import os, tempfile
    from jaxcompress.data import DataSpec
    from jaxcompress.errors import ConfigError
    from jaxcompress.train import LoopSpec, fit
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    images = (np.zeros((24, 8, 8, 3), np.uint8), np.zeros(24, np.int32))
    try:
      fit(state, step, images, DataSpec(batch_size=6, mean=(0.0,) * 3, std=(1.0,) * 3),
          LoopSpec(epochs=1), workdir, mesh=parallel.make_mesh())
      out["fit"] = "trained"
    except ConfigError as e:
      out["fit"] = str(e) + ("; the workdir was made" if os.path.exists(workdir) else "")
    print(json.dumps(out))
""")


def test_four_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=repo, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  one, four = out["1"], out["4"]
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-5)
  np.testing.assert_allclose(four["eval"], one["eval"], rtol=2e-5)
  assert four["sharded"] == 4 and one["sharded"] == 1
  assert one["losses"][-1] != one["losses"][0]  # the steps did train
  assert out["rows"] == [0, 16]
  assert out["fit"] == "data.batch_size must be a positive multiple of the 4 devices, got 6; try 4"


def test_batch_size_must_divide_over_devices():
  four = types.SimpleNamespace(devices=np.empty(4))  # only the device count matters
  parallel.check_batch_size(128, four)
  with pytest.raises(ConfigError, match=r"data.batch_size must be a positive multiple of the 4 "
                                        r"devices, got 130; try 128"):
    parallel.check_batch_size(130, four)
  with pytest.raises(ConfigError, match="positive multiple"):
    parallel.check_batch_size(0, four)


@pytest.mark.parametrize("fields,match", [
    (dict(num_processes=2, process_id=2), r"parallel.process_id must be in \[0, 2\)"),
    (dict(num_processes=0), r"parallel.num_processes must be >= 1"),
    (dict(process_id=-3), r"parallel.process_id must be >= 0, or -1"),
    (dict(coordinator_address="localhost"), r"parallel.coordinator_address must be HOST:PORT"),
    (dict(initialization_timeout=0), r"parallel.initialization_timeout must be > 0"),
    (dict(initialization_timeout=0.5), r"parallel.initialization_timeout must be an integer"),
    (dict(num_processes="2"), r"parallel.num_processes must be an integer, got '2'"),
    (dict(process_id=None), r"parallel.process_id must be an integer, got None"),
    (dict(coordinator_address="http://host:1234"), r"parallel.coordinator_address must be HOST"),
    (dict(coordinator_address="host :1234"), r"parallel.coordinator_address must be HOST"),
    (dict(coordinator_address="host:\u0661\u0662"), r"parallel.coordinator_address must be HOST"),
])
def test_distributed_spec_names_the_bad_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    parallel.DistributedSpec(distributed=True, **fields)


@pytest.mark.parametrize("fields,alone", [(dict(num_processes=2), 1), (dict(process_id=1), 0)])
def test_a_multi_process_field_without_distributed_is_refused(fields, alone):
  (name, value), = fields.items()
  with pytest.raises(ConfigError, match=rf"parallel.{name} must be -1 or {alone} while "
                     rf"parallel.distributed is False, got {value}; set parallel.distributed=True"):
    parallel.DistributedSpec(**fields)
  parallel.DistributedSpec(num_processes=1, process_id=0)  # one process, said outright


def test_distributed_must_be_a_bool():
  with pytest.raises(ConfigError, match=r"^parallel.distributed must be True or False, got 'no'$"):
    parallel.DistributedSpec(distributed="no")


def test_distributed_spec_reads_the_parallel_section():
  from configs import common
  spec = parallel.DistributedSpec.from_mapping(common.parallel_config())
  assert spec == parallel.DistributedSpec()  # one process: initialize does nothing
  parallel.initialize_distributed(spec)


def test_coordinator_address_is_checked_before_joining():
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    # Process 0 must serve the address: here the port is taken.
    with pytest.raises(ConfigError, match=rf"parallel.coordinator_address: process 0 starts the "
                                          rf"coordinator at 127.0.0.1:{port} but cannot listen"):
      parallel.initialize_distributed(parallel.DistributedSpec(
          True, f"127.0.0.1:{port}", num_processes=2, process_id=0))
  # The others must reach it within the timeout: now nothing listens there.
  start = time.monotonic()
  with pytest.raises(ConfigError, match=rf"parallel.coordinator_address: no coordinator answers "
                                        rf"at 127.0.0.1:{port} after 1 s"):
    parallel.initialize_distributed(parallel.DistributedSpec(
        True, f"127.0.0.1:{port}", num_processes=2, process_id=1, initialization_timeout=1))
  assert time.monotonic() - start < 10
