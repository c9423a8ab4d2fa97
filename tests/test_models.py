"""Model shapes, parameter counts, the option-A shortcut and the registry."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, get_model, model_names
from jaxcompress.models.resnet import shortcut_a


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,expected", [("resnet20", 269_722), ("resnet56", 853_018)])
def test_resnet_parameter_counts_match_the_paper(name, expected):
  variables = jax.eval_shape(lambda: get_model(name).init(jax.random.key(0),
                                                           jnp.zeros((1, 32, 32, 3))))
  assert _count(variables["params"]) == expected


@pytest.mark.parametrize("name,shape", [("resnet20", (32, 32, 3)), ("cnn_mnist", (28, 28, 1)),
                                        ("cnn_cifar", (32, 32, 3)), ("mlp", (28, 28, 1))])
def test_models_produce_logits(name, shape):
  model, variables = create_model(name, num_classes=7, image_shape=shape)
  out = jax.jit(model.apply)(variables, jnp.ones((2, *shape)))  # one program, not op by op
  assert out.shape == (2, 7)
  assert np.all(np.isfinite(out))


def test_design_note_cnn_layer_shapes():
  _, v = create_model("cnn_mnist", num_classes=10, image_shape=(28, 28, 1))
  p = v["params"]
  assert p["conv1"]["kernel"].shape == (3, 3, 1, 32)
  assert p["conv2"]["kernel"].shape == (3, 3, 32, 64)
  assert p["fc1"]["kernel"].shape == (14 * 14 * 64, 128)  # SAME convs, one 2x2 max-pool
  _, v = create_model("cnn_cifar", num_classes=10, image_shape=(32, 32, 3))
  assert v["params"]["fc"]["kernel"].shape == (8 * 8 * 128, 10)  # 4x4 average pool


def test_option_a_shortcut_on_a_hand_built_example():
  x = np.arange(1 * 4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)
  out = np.asarray(shortcut_a(jnp.asarray(x), planes=4))
  assert out.shape == (1, 2, 2, 4)
  # Pixels (0,0), (0,2), (2,0), (2,2) of the input; channels padded by planes//4 = 1 each side.
  expected = np.zeros((1, 2, 2, 4), np.float32)
  for i, r in enumerate((0, 2)):
    for j, c in enumerate((0, 2)):
      expected[0, i, j, 1:3] = x[0, r, c, :]
  np.testing.assert_array_equal(out, expected)


def test_stride_two_uses_pytorch_padding():
  # A stride-2 3x3 conv with PyTorch padding 1 on 4x4 reads pixels around rows/cols 0 and 2:
  # with an all-ones kernel the output at (0, 0) sums the 2x2 corner only (4 pixels of 1).
  model = get_model("resnet20")  # the shapes of its variables, nothing computed
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  k = v["params"]["layer2_0"]["conv1"]["kernel"]
  conv = jax.lax.conv_general_dilated(jnp.ones((1, 4, 4, 16)), jnp.ones(k.shape, k.dtype), (2, 2),
                                      ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert conv[0, 0, 0, 0] == 4 * 16 and conv[0, 1, 1, 0] == 9 * 16


def test_unknown_model_name_lists_valid_ones():
  with pytest.raises(ConfigError, match="model.name must be one of .*resnet20.*got 'resnet21'"):
    get_model("resnet21")
  assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} <= set(model_names())


def test_inner_widths_shrink_only_the_first_conv_of_each_block():
  widths = [8, 16, 8, 16, 32, 16, 32, 64, 32]
  x = jnp.zeros((1, 32, 32, 3))  # the shapes of the variables, nothing computed
  v = jax.eval_shape(get_model("resnet20").init, jax.random.key(0), x)
  model = get_model("resnet20", inner_widths=widths)
  small = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert small["layer1_0"]["conv1"]["kernel"].shape == (3, 3, 16, 8)
  assert small["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 8, 16)
  assert small["layer3_2"]["conv1"]["kernel"].shape == (3, 3, 64, 32)
  assert _count(small) < _count(v["params"])


def test_folded_resnet_matches_batchnorm_resnet_by_hand_folding():
  model, v = create_model("resnet20", num_classes=10, image_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0.1, 1, a.shape).astype(np.float32), v)
  params = flax.traverse_util.flatten_dict(v["params"])
  stats = flax.traverse_util.flatten_dict(v["batch_stats"])
  folded = {}
  for key, value in params.items():
    module = key[-2]
    if key[0] == "linear":
      folded[key] = value
    elif module.startswith("conv"):  # fold bnK into convK by hand: w * g, beta - mean * g
      bn = (*key[:-2], module.replace("conv", "bn"))
      g = params[(*bn, "scale")] / np.sqrt(stats[(*bn, "var")] + 1e-5)
      folded[key] = value * g
      folded[(*key[:-1], "bias")] = params[(*bn, "bias")] - stats[(*bn, "mean")] * g
  x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  out = get_model("resnet20", folded=True).apply(
      {"params": flax.traverse_util.unflatten_dict(folded)}, x)
  np.testing.assert_allclose(out, model.apply(v, x), rtol=1e-4, atol=1e-3)


def test_batchnorm_folding_is_the_numpy_affine_map():
  from jaxcompress.models.batchnorm import bn_multiplier, fold_bias
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3, 3, 5)).astype(np.float32)
  gamma, beta, mean = (rng.standard_normal(5).astype(np.float32) for _ in range(3))
  var = rng.uniform(0.5, 2.0, 5).astype(np.float32)
  gain = bn_multiplier(gamma, var)
  bias = fold_bias(None, gain, beta, mean)
  np.testing.assert_allclose(gain, gamma / np.sqrt(var + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(bias, beta - mean * gamma / np.sqrt(var + 1e-5), rtol=1e-5,
                             atol=1e-6)
  oracle = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta  # NumPy eval-mode BatchNorm
  np.testing.assert_allclose(x * gain + bias, oracle, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fold_bias(np.ones(5, np.float32), gain, beta, mean),
                             bias + gain, rtol=1e-5, atol=1e-6)  # a conv bias folds in too
