"""Data parallelism: 4 simulated CPU devices give the loss of 1 device."""

import os
import subprocess
import sys
import textwrap
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
      loss, _ = ev({"params": state.params, **state.model_state}, parallel.shard_batch(mesh, batches[0]))
      out[n] = {"losses": losses, "eval": float(np.mean(loss)),
                "sharded": len(state.params["conv1"]["kernel"].sharding.device_set)}
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


def test_batch_size_must_divide_over_devices():
  four = types.SimpleNamespace(devices=np.empty(4))  # only the device count matters
  parallel.check_batch_size(128, four)
  with pytest.raises(ConfigError, match=r"data.batch_size must be a positive multiple of the 4 "
                                        r"devices, got 130; try 128"):
    parallel.check_batch_size(130, four)
  with pytest.raises(ConfigError, match="positive multiple"):
    parallel.check_batch_size(0, four)
