"""PyTorch state_dict import, checked against an independent NumPy convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.models import get_model, load_pytorch_npz, torch_to_flax
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


def test_a_single_array_file_is_one_line(tmp_path):
  path = tmp_path / "one.npz"
  with open(path, "wb") as f:
    np.save(f, np.zeros(3, np.float32))  # an .npy under an .npz name
  with pytest.raises(ConfigError, match=r"one.npz' is not a readable .npz file \(not a zip "):
    load_npz(str(path), field="teacher.weights")


def test_an_unknown_suffix_names_the_source():
  sd = _torch_state_dict()
  sd["layer1.0.conv1.weight_orig"] = sd.pop("layer1.0.conv1.weight")
  with pytest.raises(ConfigError, match=r"^teacher.weights=t.npz: tensor "
                                        r"'layer1.0.conv1.weight_orig' has no Flax counterpart"):
    torch_to_flax(sd, _reference(get_model("resnet20")), source="teacher.weights=t.npz")


def test_two_names_for_one_tensor_are_refused():
  sd = _torch_state_dict()
  sd["layer1_0.conv1.weight"] = np.zeros_like(sd["layer1.0.conv1.weight"])  # also layer1_0/conv1
  with pytest.raises(ConfigError, match=r"tensors 'layer1.0.conv1.weight' and "
                                        r"'layer1_0.conv1.weight' both map to "
                                        r"'params/layer1_0/conv1/kernel'"):
    torch_to_flax(sd, _reference(get_model("resnet20")))


class _Convs(nn.Module):
  """A 1-D and a 3-D conv whose windows equal their output channels (shapes cannot tell)."""

  @nn.compact
  def __call__(self, x1, x3):
    a = nn.Conv(3, (3,), padding="VALID", use_bias=False, name="c1d")(x1)
    b = nn.Conv(2, (2, 2, 2), padding="VALID", use_bias=False, name="c3d",
                param_dtype=jnp.bfloat16)(x3)
    return a, b


def test_1d_and_3d_convs_take_pytorch_layout_and_the_models_dtype():
  rng = np.random.default_rng(0)
  sd = {"c1d.weight": rng.normal(size=(3, 2, 3)).astype(np.float32),     # [out, in, k]
        "c3d.weight": rng.normal(size=(2, 2, 2, 2, 2)).astype(np.float32)}  # [out, in, d, h, w]
  x1 = rng.normal(size=(1, 5, 2)).astype(np.float32)      # [n, length, in]
  x3 = rng.normal(size=(1, 3, 3, 3, 2)).astype(np.float32)
  model = _Convs()
  reference = jax.eval_shape(lambda: model.init(jax.random.key(0), x1, x3))
  variables = torch_to_flax(sd, reference)
  assert variables["params"]["c3d"]["kernel"].dtype == jnp.bfloat16
  a, b = model.apply(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables), x1, x3)
  # PyTorch's cross-correlation, written out: out[t, o] = sum_{i, k} w[o, i, k] x[t + k, i].
  want_a = np.stack([np.einsum("oik,ki->o", sd["c1d.weight"], x1[0, t:t + 3])
                     for t in range(3)])
  w3 = sd["c3d.weight"].astype(jnp.bfloat16).astype(np.float32)
  want_b = np.stack([np.einsum("oidhw,dhwi->o", w3, x3[0, d:d + 2, h:h + 2, v:v + 2])
                     for d in range(2) for h in range(2) for v in range(2)]).reshape(2, 2, 2, 2)
  np.testing.assert_allclose(a[0], want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b[0], want_b, rtol=1e-2, atol=1e-2)


class _NNXBlocks(nnx.Module):
  def __init__(self, *, rngs):
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


def test_an_nnx_module_takes_pytorch_weights_of_its_list(tmp_path):
  rng = np.random.default_rng(0)
  sd = {"layers.0.weight": rng.normal(size=(4, 4)), "layers.0.bias": rng.normal(size=4),
        "layers.1.weight": rng.normal(size=(2, 4)), "layers.1.bias": rng.normal(size=2)}
  np.savez(tmp_path / "w.npz", **sd)
  model = _NNXBlocks(rngs=nnx.Rngs(0))
  variables = load_pytorch_npz(model, str(tmp_path / "w.npz"))
  np.testing.assert_array_equal(variables["params"]["layers"]["0"]["kernel"],
                                sd["layers.0.weight"].T.astype(np.float32))
  x = rng.normal(size=(3, 4)).astype(np.float32)
  h = np.maximum(x @ sd["layers.0.weight"].T + sd["layers.0.bias"], 0)
  np.testing.assert_allclose(model(x), h @ sd["layers.1.weight"].T + sd["layers.1.bias"],
                             rtol=1e-5, atol=1e-5)
