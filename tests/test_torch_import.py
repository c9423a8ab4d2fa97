"""PyTorch state_dict import, checked against an independent NumPy convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.models import get_model, torch_to_flax
from jaxcompress.models.torch_import import load_npz


def _torch_state_dict(depth=20, seed=0):
  """A random state dict with PyTorch names and layouts (OIHW convs, [out, in] linear)."""
  rng = np.random.default_rng(seed)
  sd = {"conv1.weight": rng.normal(size=(16, 3, 3, 3))}
  bn = lambda p, c: {f"{p}.weight": rng.normal(size=c), f"{p}.bias": rng.normal(size=c),
                     f"{p}.running_mean": rng.normal(size=c),
                     f"{p}.running_var": rng.uniform(0.5, 2, size=c),
                     f"{p}.num_batches_tracked": np.array(7)}
  sd.update(bn("bn1", 16))
  n = (depth - 2) // 6
  cin = 16
  for s, planes in enumerate((16, 32, 64), 1):
    for b in range(n):
      p = f"layer{s}.{b}"
      sd[f"{p}.conv1.weight"] = rng.normal(size=(planes, cin, 3, 3))
      sd.update(bn(f"{p}.bn1", planes))
      sd[f"{p}.conv2.weight"] = rng.normal(size=(planes, planes, 3, 3))
      sd.update(bn(f"{p}.bn2", planes))
      cin = planes
  sd["linear.weight"] = rng.normal(size=(10, 64))
  sd["linear.bias"] = rng.normal(size=10)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _reference(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def _numpy_conv_nchw(x, w):
  """Cross-correlation as PyTorch's Conv2d(padding=1, stride=1, bias=False) computes it."""
  n, c, h, wd = x.shape
  o = w.shape[0]
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = np.zeros((n, o, h, wd))
  for i in range(h):
    for j in range(wd):
      patch = xp[:, :, i:i + 3, j:j + 3]  # [n, c, 3, 3]
      out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
  return out


def test_imported_conv_matches_numpy_convolution():
  sd = _torch_state_dict()
  variables = torch_to_flax(sd, _reference(get_model("resnet20")))
  kernel = variables["params"]["conv1"]["kernel"]
  x_nchw = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
  x_nhwc = np.transpose(x_nchw, (0, 2, 3, 1))
  flax_out = jax.lax.conv_general_dilated(x_nhwc, kernel, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = np.transpose(_numpy_conv_nchw(x_nchw, sd["conv1.weight"]), (0, 2, 3, 1))
  np.testing.assert_allclose(flax_out, expected, rtol=1e-4, atol=1e-4)


def test_linear_and_batchnorm_land_in_the_right_places():
  sd = _torch_state_dict()
  v = torch_to_flax(sd, _reference(get_model("resnet20")))
  np.testing.assert_array_equal(v["params"]["linear"]["kernel"], sd["linear.weight"].T)
  np.testing.assert_array_equal(v["params"]["layer2_1"]["bn2"]["scale"],
                                sd["layer2.1.bn2.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["layer3_0"]["bn1"]["var"],
                                sd["layer3.0.bn1.running_var"])


def test_wrong_shape_names_the_offending_path():
  sd = _torch_state_dict()
  sd["layer2.1.conv2.weight"] = np.zeros((32, 16, 3, 3), np.float32)
  with pytest.raises(ConfigError, match=r"params/layer2_1/conv2/kernel .*conv2.weight"):
    torch_to_flax(sd, _reference(get_model("resnet20")))


def test_wrong_depth_is_reported():
  with pytest.raises(ConfigError, match="missing .* tensors"):
    torch_to_flax(_torch_state_dict(20), _reference(get_model("resnet32")))
  with pytest.raises(ConfigError, match="does not have"):
    torch_to_flax(_torch_state_dict(32), _reference(get_model("resnet20")))


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(ConfigError, match="no such file"):
    load_npz(str(tmp_path / "absent.npz"))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ConfigError, match="not a readable .npz"):
    load_npz(str(bad))
