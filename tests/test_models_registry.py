"""Models by registry name or MODULE:FACTORY (Linen and NNX), register(), msgpack/orbax weights."""

import os
import re
import textwrap
import uuid

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, get_model, model_names, register
from jaxcompress.models import registry
from jaxcompress.models.functional import functional

SOURCE = textwrap.dedent('''
    import flax.linen as nn
    from flax import nnx

    class Net(nn.Module):
      num_classes: int
      width: int = 16

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(self.num_classes)(x)

    def linen_net(num_classes):
      return Net(num_classes)

    def narrow_net(num_classes):
      return Net(num_classes, width=8)

    class NnxNet(nnx.Module):
      def __init__(self, num_classes, *, rngs):
        self.layers = getattr(nnx, "List", list)(
            [nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, num_classes, rngs=rngs)])
        self.bn = nnx.BatchNorm(16, rngs=rngs)

      def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.layers[1](nnx.relu(self.bn(self.layers[0](x))))

    def nnx_net(num_classes, rngs):
      return NnxNet(num_classes, rngs=rngs)

    NOT_CALLABLE = 3

    def not_a_model(num_classes):
      return "a string"

    def no_classes():
      return Net(3)

    def raises(num_classes):
      raise RuntimeError("boom")

    class NnxNeedsMoreInputs(nnx.Module):
      def __init__(self, num_classes, *, rngs):
        self.fc = nnx.Linear(20, num_classes, rngs=rngs)

      def __call__(self, x):
        return self.fc(x.reshape((x.shape[0], -1)))

    def nnx_wrong_inputs(num_classes, rngs):
      return NnxNeedsMoreInputs(num_classes, rngs=rngs)

    class NoPool(nn.Module):
      num_classes: int

      @nn.compact
      def __call__(self, x):
        return nn.Dense(self.num_classes)(x)  # [B, H, W, classes]: forgot to pool

    def no_pool(num_classes):
      return NoPool(num_classes)

    def five_classes(num_classes):
      return Net(5)

    class AlwaysDrops(nn.Module):
      num_classes: int

      @nn.compact
      def __call__(self, x):  # dropout with no switch of __call__
        return nn.Dense(self.num_classes)(nn.Dropout(0.5, deterministic=False)(x.mean((1, 2))))

    def always_drops(num_classes):
      return AlwaysDrops(num_classes)
''')
SHAPE = (2, 2, 3)  # 12 inputs


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """Writes the factories into a uniquely named module on sys.path; returns its name."""
  name = f"user_models_{uuid.uuid4().hex[:12]}"
  (tmp_path / f"{name}.py").write_text(SOURCE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


@pytest.fixture
def clean_registry(monkeypatch):
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_linen_factory_by_module_name(user_module):
  model, variables = create_model(f"{user_module}:linen_net", num_classes=5, image_shape=SHAPE)
  assert isinstance(model, nn.Module)
  assert _shapes(variables["params"]["Dense_0"]) == {"kernel": (12, 16), "bias": (16,)}
  assert variables["batch_stats"]["BatchNorm_0"]["var"].shape == (16,)
  out, _ = functional(model).apply(variables, np.ones((3, *SHAPE), np.float32))
  assert out.shape == (3, 5)


def test_nnx_factory_gets_rngs_from_the_seed(user_module):
  model, variables = create_model(f"{user_module}:nnx_net", num_classes=4, image_shape=SHAPE,
                                  seed=3)
  assert isinstance(model, nnx.Module)
  assert variables["params"]["layers"]["0"]["kernel"].shape == (12, 16)
  assert variables["params"]["layers"]["1"]["kernel"].shape == (16, 4)
  assert variables["batch_stats"]["bn"]["mean"].shape == (16,)
  again = create_model(f"{user_module}:nnx_net", num_classes=4, image_shape=SHAPE, seed=3)[1]
  other = create_model(f"{user_module}:nnx_net", num_classes=4, image_shape=SHAPE, seed=4)[1]
  k = lambda v: np.asarray(v["params"]["layers"]["0"]["kernel"])
  np.testing.assert_array_equal(k(variables), k(again))
  assert not np.array_equal(k(variables), k(other))


def test_an_nnx_class_is_a_factory_too(user_module):
  model, variables = create_model(f"{user_module}:NnxNet", num_classes=6, image_shape=SHAPE)
  assert isinstance(model, nnx.Module)
  assert variables["params"]["layers"]["1"]["kernel"].shape == (16, 6)
  model = get_model(f"{user_module}:Net", 4)  # a Linen class: its fields are the arguments
  assert isinstance(model, nn.Module) and model.num_classes == 4


def test_module_is_found_from_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / "cwd_models_xyz.py").write_text(SOURCE)
  monkeypatch.chdir(tmp_path)
  model = get_model("cwd_models_xyz:linen_net", 3)
  assert model.num_classes == 3


def test_register_adds_a_name_and_refuses_a_taken_one(user_module, clean_registry):
  import importlib
  mod = importlib.import_module(user_module)
  register("my_net", mod.linen_net)
  assert "my_net" in model_names()
  assert get_model("my_net", 7).num_classes == 7
  with pytest.raises(ConfigError, match="'my_net' is already taken.*overwrite=True"):
    register("my_net", mod.narrow_net)
  register("my_net", mod.narrow_net, overwrite=True)
  assert get_model("my_net", 7).width == 8
  register("my_nnx", mod.nnx_net)
  _, v = create_model("my_nnx", num_classes=2, image_shape=SHAPE)
  assert v["params"]["layers"]["1"]["kernel"].shape == (16, 2)
  with pytest.raises(ConfigError, match="already taken"):
    register("resnet20", mod.linen_net)
  with pytest.raises(ConfigError, match="without ':'"):
    register("a:b", mod.linen_net)
  for blank in (" ", "my net", "net\n"):
    with pytest.raises(ConfigError, match="without ':' or whitespace"):
      register(blank, mod.linen_net)


@pytest.mark.parametrize("field", ["student", "teacher", "model"])
@pytest.mark.parametrize("factory,message", [
    ("nosuchmodule_q:make", r"cannot import module 'nosuchmodule_q'.*No module named"),
    ("{mod}:missing", r"module '{mod}' has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", r"'{mod}:NOT_CALLABLE' is not callable \(type int\)"),
    ("{mod}:not_a_model", r"'{mod}:not_a_model' returned type str, not a flax.linen.Module"),
    ("{mod}:no_classes", r"cannot be called with num_classes=10"),
    ("{mod}:", r"MODULE:FACTORY"),
    ("{mod}:raises", r"the factory of '{mod}:raises', called with num_classes=10, raised "
                     r"RuntimeError: boom$"),
    ("{mod}:no_pool", r"'{mod}:no_pool' returns \(1, 2, 2, 10\) for one input of shape "
                      r"\[2, 2, 3\]; a classifier of 10 classes must return one array of "
                      r"logits of shape \(1, 10\)"),
    ("{mod}:five_classes", r"'{mod}:five_classes' returns \(1, 5\)"),
])
def test_bad_module_factory_names_the_field_and_value(user_module, field, factory, message):
  name = factory.format(mod=user_module)
  with pytest.raises(ConfigError) as e:
    create_model(name, num_classes=10, image_shape=SHAPE, field=field)
  text = str(e.value)
  assert text.startswith(f"{field}.name"), text
  assert repr(name) in text or repr(name.split(":")[0]) in text, text
  assert "\n" not in text
  assert re.search(message.format(mod=re.escape(user_module)), text), text


def test_a_model_that_drops_out_in_eval_mode_is_named_for_what_it_is(user_module):
  name = f"{user_module}:always_drops"
  with pytest.raises(ConfigError, match=re.escape(
      f"model.name: {name}'s forward draws random numbers in eval mode (Dropout_0 needs PRNG for "
      '"dropout"); give its __call__ a train or deterministic flag')):
    create_model(name, num_classes=10, image_shape=SHAPE)


def test_an_nnx_model_whose_forward_fails_is_one_line(user_module):
  name = f"{user_module}:nnx_wrong_inputs"
  with pytest.raises(ConfigError, match=re.escape(
      f"student.name: {name}'s forward fails on one input of shape [2, 2, 3] (TypeError: ")):
    create_model(name, num_classes=10, image_shape=SHAPE, field="student")


def test_import_error_inside_the_module_is_reported(tmp_path, monkeypatch):
  (tmp_path / "broken_models_q.py").write_text("import numpy\nraise RuntimeError('boom')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ConfigError, match=r"student.name: cannot import module 'broken_models_q' "
                                        r"of 'broken_models_q:f' \(RuntimeError: boom\)"):
    get_model("broken_models_q:f", field="student.name")


def test_unknown_registry_name_lists_the_names_and_the_module_form():
  with pytest.raises(ConfigError, match=r"teacher.name must be one of .*resnet20.*got 'resnet21'"
                                        r".*MODULE:FACTORY"):
    get_model("resnet21", field="teacher.name")


def test_image_jobs_list_and_take_only_image_models():
  with pytest.raises(ConfigError) as e:
    get_model("resnet21", field="student.name", inputs="images")
  listed = str(e.value).split("one of ")[1].split(", got")[0].split(", ")
  assert "resnet20" in listed and "mlp" in listed
  assert "char_gpt" not in listed and "char_lstm" not in listed
  with pytest.raises(ConfigError, match=r"^student.name must be an image model: one of .*resnet20"
                                        r".*got 'char_lstm'.*experiments.train_lm$"):
    create_model("char_lstm", num_classes=10, image_shape=(8, 8, 3), field="student")
  assert {"char_gpt", "char_lstm"} <= set(model_names())


def _save_msgpack(path, variables):
  path.write_bytes(flax.serialization.to_bytes(jax.device_get(variables)))
  return str(path)


def _save_orbax(path, tree):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(str(path), tree)
  return str(path)


def _assert_same(a, b):
  fa = flax.traverse_util.flatten_dict(jax.device_get(a), sep="/")
  fb = flax.traverse_util.flatten_dict(jax.device_get(b), sep="/")
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("factory", ["linen_net", "nnx_net"])
@pytest.mark.parametrize("fmt", ["msgpack", "orbax", "orbax_train_state"])
def test_weights_round_trip(user_module, tmp_path, factory, fmt):
  name = f"{user_module}:{factory}"
  _, saved = create_model(name, num_classes=3, image_shape=SHAPE, seed=1)
  # Make batch statistics non-trivial so a silently re-initialised model would differ.
  # (positive shifts keep the variances valid).
  saved = jax.tree.map(lambda x: np.asarray(x) + np.random.default_rng(0).uniform(
      0.1, 1.0, size=x.shape).astype(np.float32), saved)
  if fmt == "msgpack":
    path = _save_msgpack(tmp_path / "w.msgpack", saved)
  elif fmt == "orbax":
    path = _save_orbax(tmp_path / "ckpt", saved)
  else:  # a train-state-like dict: params, model_state, optimizer state and step
    path = _save_orbax(tmp_path / "state", {
        "params": saved["params"], "model_state": {"batch_stats": saved["batch_stats"]},
        "opt_state": {"mu": saved["params"]}, "step": np.int32(7)})
  model, loaded = create_model(name, num_classes=3, image_shape=SHAPE, seed=2, weights=path,
                               field="student")
  _assert_same(loaded, saved)
  x = np.random.default_rng(1).normal(size=(4, *SHAPE)).astype(np.float32)
  got, _ = functional(model).apply(loaded, x)
  want, _ = functional(model).apply(jax.tree.map(np.asarray, saved), x)
  assert np.all(np.isfinite(want))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  if factory == "nnx_net":  # the module itself holds the loaded weights too
    model.set_attributes(use_running_average=True, raise_if_not_found=False)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bare_params_load_into_a_model_without_batch_stats(tmp_path):
  _, saved = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=5)
  path = _save_orbax(tmp_path / "params", saved["params"])
  _, loaded = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), weights=path)
  _assert_same(loaded, saved)


def test_a_shape_mismatch_names_the_path_and_both_shapes(user_module, tmp_path):
  _, narrow = create_model(f"{user_module}:narrow_net", num_classes=3, image_shape=SHAPE)
  path = _save_msgpack(tmp_path / "w.msgpack", narrow)
  with pytest.raises(ConfigError) as e:
    create_model(f"{user_module}:linen_net", num_classes=3, image_shape=SHAPE, weights=path,
                 field="student")
  assert str(e.value).startswith(
      f"student.weights: {path!r} does not fit the model: params/BatchNorm_0/bias has shape [8] "
      "in the file, the model needs [16]"), str(e.value)


def test_missing_and_extra_paths_are_named(user_module, tmp_path):
  _, v = create_model(f"{user_module}:linen_net", num_classes=3, image_shape=SHAPE)
  v = jax.device_get(v)
  missing = {"params": {k: p for k, p in v["params"].items() if k != "Dense_1"},
             "batch_stats": v["batch_stats"]}
  path = _save_msgpack(tmp_path / "missing.msgpack", missing)
  with pytest.raises(ConfigError, match=r"teacher.weights: .*missing.msgpack' does not fit the "
                                        r"model: params/Dense_1/bias \(shape \[3\]\) is missing"):
    create_model(f"{user_module}:linen_net", num_classes=3, image_shape=SHAPE, weights=path,
                 field="teacher")
  extra = {**v, "params": {**v["params"], "Dense_9": {"kernel": np.zeros((2, 2), np.float32)}}}
  path = _save_msgpack(tmp_path / "extra.msgpack", extra)
  with pytest.raises(ConfigError, match=r"the file has params/Dense_9/kernel \(shape \[2, 2\]\), "
                                        r"which the model does not have"):
    create_model(f"{user_module}:linen_net", num_classes=3, image_shape=SHAPE, weights=path)


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_weights_holding_nan_are_one_line_naming_the_entry(tmp_path, fmt):
  _, v = create_model("mlp", num_classes=10, image_shape=(28, 28, 1))
  v = jax.tree.map(np.array, v)
  v["params"]["fc1"]["kernel"][3, 4] = np.nan  # a diverged run's weights
  path = (_save_msgpack(tmp_path / "w.msgpack", v) if fmt == "msgpack"
          else _save_orbax(tmp_path / "w", v))
  with pytest.raises(ConfigError) as e:
    create_model("mlp", num_classes=10, image_shape=(28, 28, 1), weights=path, field="teacher")
  assert str(e.value) == (
      f"teacher.weights: {path!r} entry ['params']['fc1']['kernel'] holds 1 NaN/Inf value(s); "
      "weights must be finite (a model evaluated, distilled from or fine-tuned with them "
      "computes NaN): use weights saved before the run diverged")


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "absent.msgpack"), r"model.weights: no such file '.*absent.msgpack'"),
    (lambda d: (d / "junk.msgpack").write_bytes(b"\xc1\xc1 not msgpack") and
     str(d / "junk.msgpack"), r"model.weights: '.*junk.msgpack' is not a readable flax msgpack"),
    (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"),
     r"model.weights: '.*empty_dir' is not a readable orbax checkpoint"),
    (lambda d: (d / "w.pt").write_bytes(b"x") and str(d / "w.pt"),
     r"model.weights: '.*w.pt' must be a PyTorch-layout .npz, a flax.serialization .msgpack"),
])
def test_unreadable_weights_are_one_line(tmp_path, make, message):
  path = make(tmp_path)
  with pytest.raises(ConfigError, match=message) as e:
    create_model("mlp", num_classes=10, image_shape=(28, 28, 1), weights=path)
  assert "\n" not in str(e.value)


def test_weights_saved_on_a_full_disk_leave_the_old_file_and_no_temporary_one(tmp_path,
                                                                               monkeypatch):
  from conftest import disk_full
  from jaxcompress.models import weights as w
  path = tmp_path / "my_mlp.msgpack"
  path.write_bytes(b"old weights")
  _, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=5)
  disk_full(monkeypatch, path)
  with pytest.raises(OSError) as e:
    w.save_weights(variables, "my_mlp", str(tmp_path))
  assert e.value.errno == 28 and e.value.filename == str(path)  # ENOSPC, naming the file
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["my_mlp.msgpack"] and path.read_bytes() == b"old weights"


def test_weights_by_name_are_found_in_the_weights_folder_and_saved_there(tmp_path, monkeypatch):
  from jaxcompress.models import weights as w
  monkeypatch.setenv(w.WEIGHTS_ENV, str(tmp_path / "env"))
  assert w.weights_dir("") == str(tmp_path / "env") and w.weights_dir("/x") == "/x"
  assert w.is_name("resnet20_cifar10") and not w.is_name("w.msgpack")
  assert not w.is_name("dir/resnet20") and not w.is_name("")
  _, variables = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), seed=5)
  path = w.save_weights(variables, "my_mlp", str(tmp_path / "env"))
  assert path == str(tmp_path / "env" / "my_mlp.msgpack")
  assert w.find_weights("my_mlp", str(tmp_path / "env")) == path
  assert w.resolve_weights("my_mlp", str(tmp_path / "env")) == path
  assert w.resolve_weights("other", str(tmp_path / "env")) is None
  _, loaded = create_model("mlp", num_classes=10, image_shape=(28, 28, 1), weights="my_mlp")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ConfigError, match=r"model.weights: no weights named 'other' in the "
                                         r"weights folder"):
    create_model("mlp", num_classes=10, image_shape=(28, 28, 1), weights="other")
