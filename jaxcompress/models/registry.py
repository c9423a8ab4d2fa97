"""Models by name: a registry, ``MODULE:FACTORY`` for a user's own model, and initial variables.

A model name is either a registry name (the built-in ``resnet20`` ... ``resnet110``,
``cnn_mnist``, ``cnn_cifar``, ``mlp``, the character models ``char_gpt`` and ``char_lstm``, whose
``num_classes`` is the vocabulary size, or one added with :func:`register`), or
``MODULE:FACTORY``: ``MODULE`` is imported from the working directory or ``PYTHONPATH`` and
``FACTORY(num_classes=N)`` must return a Flax Linen module, or, when ``FACTORY`` has an ``rngs``
parameter, ``FACTORY(num_classes=N, rngs=nnx.Rngs(seed))`` an NNX module. Every factory, built-in
or not, goes through the same path.

Example:
  >>> # my_models.py, in the working directory:
  >>> # def small_cnn(num_classes): return SmallCNN(num_classes)   # a flax.linen.Module
  >>> model, variables = create_model("my_models:small_cnn", num_classes=10,
  ...                                 image_shape=(32, 32, 3))
  >>> sorted(variables)
  ['batch_stats', 'params']
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from typing import Any, Callable

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import ConfigError, first_line, invalid, message_line
from jaxcompress.models.cnn import MLP, CifarCNN, MnistCNN
from jaxcompress.models.functional import functional, set_variables, variables_of
from jaxcompress.models.gpt import CharGPT
from jaxcompress.models.lstm import CharLSTM
from jaxcompress.models.resnet import CifarResNet
from jaxcompress.models.weights import load_weights

Model = Any  # a flax.linen.Module or a flax.nnx.Module

_REGISTRY: dict[str, Callable[..., Model]] = {
    **{f"resnet{d}": (lambda d=d, **kw: CifarResNet(depth=d, **kw)) for d in (20, 32, 44, 56, 110)},
    "cnn_mnist": MnistCNN,
    "cnn_cifar": CifarCNN,
    "mlp": MLP,
    "char_gpt": lambda num_classes, **kw: CharGPT(vocab_size=num_classes, **kw),
    "char_lstm": lambda num_classes, **kw: CharLSTM(vocab_size=num_classes, **kw),
}
_TOKEN_MODELS = frozenset({"char_gpt", "char_lstm"})  # built-ins reading token ids, not images
_OWN_MODEL = "for your own model use MODULE:FACTORY, e.g. my_models:make_model"


def model_names(inputs: str | None = None) -> list[str]:
  """Registry names accepted by :func:`get_model` (besides ``MODULE:FACTORY``).

  ``inputs="images"`` leaves out the built-in character models (they read token ids); names
  added with :func:`register` are always listed.
  """
  if inputs not in (None, "images"):
    raise ValueError(f"model_names: inputs must be None or 'images', got {inputs!r}")
  return sorted(n for n in _REGISTRY if inputs is None or n not in _TOKEN_MODELS)


def register(name: str, factory: Callable[..., Model], *, overwrite: bool = False) -> None:
  """Adds ``name`` to the registry, so configs can say ``model.name=NAME``.

  Args:
    name: a non-empty name without ``:`` (a ``:`` means ``MODULE:FACTORY``) or whitespace.
    factory: ``factory(num_classes=N, **kwargs)`` returning a Linen module, or, when it has an
      ``rngs`` parameter, ``factory(num_classes=N, rngs=nnx.Rngs(seed))`` returning an NNX module.
    overwrite: replace a name that is already registered.

  Raises:
    ConfigError: for a bad name, a factory that is not callable, or a name already taken
      (unless ``overwrite``).
  """
  if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
    raise invalid("register name", name, "a non-empty string without ':' or whitespace",
                  "':' is reserved for MODULE:FACTORY")
  if not callable(factory):
    raise invalid(f"register({name!r}) factory", factory, "callable",
                  "pass the function or class that builds the model")
  if name in _REGISTRY and not overwrite:
    raise ConfigError(f"register name {name!r} is already taken; pass overwrite=True to "
                      "replace it, or choose another name")
  _REGISTRY[name] = factory


@contextlib.contextmanager
def _cwd_on_path():
  """The working directory on ``sys.path`` for the duration of an import (as ``python -m``)."""
  cwd = os.getcwd()
  added = cwd not in sys.path and "" not in sys.path
  if added:
    sys.path.insert(0, cwd)
  try:
    yield
  finally:
    if added and cwd in sys.path:
      sys.path.remove(cwd)


def _import_factory(name: str, field: str) -> Callable[..., Model]:
  """The callable named by ``MODULE:FACTORY`` (``FACTORY`` may be dotted: ``Class.create``)."""
  module_name, _, attr = name.partition(":")
  if not module_name or not attr or ":" in attr:
    raise invalid(field, name, "a registry name or MODULE:FACTORY with one ':'")
  with _cwd_on_path():
    try:
      module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  any failure while importing the user's module
      detail = " ".join(str(e).split()) or type(e).__name__
      raise ConfigError(f"{field}: cannot import module {module_name!r} of {name!r} "
                        f"({type(e).__name__}: {detail}); MODULE must be importable from the "
                        "working directory or PYTHONPATH") from None
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr!r} (got "
                        f"{name!r}); FACTORY must name a function or class of that module")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ConfigError(f"{field}: {name!r} is not callable (type {type(obj).__name__}); FACTORY "
                      "must be a function or class that returns a Flax module")
  return obj


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
  """The factory's call signature; for a class, its ``__init__``'s without ``self`` (an NNX
  module's metaclass hides it behind ``(*args, **kwargs)``)."""
  try:
    if inspect.isclass(factory):
      sig = inspect.signature(factory.__init__)
      return sig.replace(parameters=list(sig.parameters.values())[1:])
    return inspect.signature(factory)
  except (TypeError, ValueError):
    return None


def get_model(name: str, num_classes: int = 10, *, field: str = "model.name", seed: int = 0,
              inputs: str | None = None, **kwargs: Any) -> Model:
  """Builds a model by registry name or ``MODULE:FACTORY``.

  Args:
    name: one of :func:`model_names`, or ``MODULE:FACTORY`` (see the module docstring).
    num_classes: size of the classifier output.
    field: config field name used in error messages (``student.name``, ...).
    seed: the seed of ``nnx.Rngs`` for an NNX factory (one with an ``rngs`` parameter).
    inputs: ``"images"`` for a job that feeds images: the built-in character models are
      refused (see :func:`model_names`).
    **kwargs: extra factory arguments (e.g. ``inner_widths`` for a channel-pruned ResNet).

  Returns:
    An unbound Linen module, or an NNX module with freshly initialised parameters.

  Raises:
    ConfigError: for an unknown name, a module that cannot be imported, a missing or
      non-callable attribute, a factory that does not take ``num_classes``, one that raises,
      or one that returns something other than a Flax module.
  """
  names = model_names(inputs)
  if not isinstance(name, str) or not name:
    raise invalid(field, name, "a registry name (one of " + ", ".join(names)
                  + ") or MODULE:FACTORY")
  if ":" in name:
    factory = _import_factory(name, field)
  elif name in names:
    factory = _REGISTRY[name]
  elif name in _REGISTRY:
    raise invalid(field, name, "an image model: one of " + ", ".join(names),
                  f"{name} reads characters: train it with python -m experiments.train_lm")
  else:
    raise invalid(field, name, "one of " + ", ".join(names), _OWN_MODEL)
  sig = _signature(factory)
  if sig is not None and "rngs" in sig.parameters:
    kwargs["rngs"] = nnx.Rngs(seed)
  try:
    if sig is not None:
      sig.bind(num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise ConfigError(f"{field}: the factory of {name!r} cannot be called with "
                      f"num_classes={num_classes}{''.join(f', {k}=...' for k in kwargs)} ({e}); "
                      "it must accept num_classes (and rngs, for an NNX model)") from None
  try:
    model = factory(num_classes=num_classes, **kwargs)
  except ConfigError:
    raise
  except Exception as e:  # the user's factory failing is a user mistake
    raise ConfigError(f"{field}: the factory of {name!r}, called with "
                      f"num_classes={num_classes}, raised {first_line(e)}") from None
  if not isinstance(model, (nn.Module, nnx.Module)):
    raise ConfigError(f"{field}: {name!r} returned type {type(model).__name__}, not a "
                      "flax.linen.Module or flax.nnx.Module; FACTORY must return the model")
  return model


def check_logits(out: Any, name: str, num_classes: int, image_shape: tuple[int, ...],
                 field: str) -> None:
  """One line naming ``field`` unless ``out`` (the shapes a model returns for one input of
  ``image_shape``, from ``jax.eval_shape``) is one ``(1, num_classes)`` array of logits."""
  if not isinstance(out, jax.ShapeDtypeStruct) or tuple(out.shape) != (1, num_classes):
    shown = jax.tree.map(lambda a: tuple(a.shape), out)
    raise ConfigError(f"{field}: {name!r} returns {shown} for one input of shape "
                      f"{list(image_shape)}; a classifier of {num_classes} classes must return "
                      f"one array of logits of shape (1, {num_classes}) ([batch, classes])")


def create_model(name: str, *, num_classes: int, image_shape: tuple[int, ...],
                 weights: str | None = None, seed: int = 0, field: str = "model",
                 name_field: str = "", weights_field: str = "") -> tuple[Model, dict]:
  """Builds a model and its variables: read from ``weights`` or freshly initialised.

  Args:
    name: registry name or ``MODULE:FACTORY``.
    num_classes: classifier width.
    image_shape: ``(H, W, C)`` of one input.
    weights: empty for a random initialisation from ``seed``; a PyTorch-layout ``.npz`` state
      dict, a ``flax.serialization`` ``.msgpack`` file of the variables dict, or an orbax
      checkpoint directory (:func:`jaxcompress.models.weights.load_weights`).
    seed: initialisation seed.
    field: config section name, for messages (``model``, ``teacher``, ``student``).
    name_field, weights_field: how messages name ``name`` and ``weights`` (default
      ``{field}.name`` and ``{field}.weights``; a job's flags: ``--model``, ``--weights``).

  Returns:
    ``(model, variables)``: the Linen or NNX module, and its variables dict with
    ``variables['params']`` and, for BatchNorm models, ``variables['batch_stats']`` (Linen: as
    ``model.init`` returns them in eval mode; NNX: ``variables_of(model)``). An NNX module also
    holds the loaded weights itself.

  Raises:
    ConfigError: for a bad name (see :func:`get_model`), a model whose forward fails on one
      input of ``image_shape`` or does not return one ``(1, num_classes)`` array of logits, or
      weights that are missing, unreadable or do not fit the model (naming the first mismatching
      path and both shapes).
  """
  name_field, weights_field = name_field or f"{field}.name", weights_field or f"{field}.weights"
  model = get_model(name, num_classes, field=name_field, seed=seed, inputs="images")
  fn = functional(model)
  sample = np.zeros((1, *image_shape), np.float32)

  def fails(e: Exception) -> ConfigError:  # a model not taking the dataset's input: user mistake
    if isinstance(e, flax.errors.InvalidRngError):
      return ConfigError(f"{name_field}: {name}'s forward draws random numbers in eval mode "
                         f"({message_line(e)}); give its __call__ a train or deterministic flag "
                         "(or build it in eval mode), so evaluation is deterministic")
    return ConfigError(f"{name_field}: {name}'s forward fails on one input of shape "
                       f"{list(image_shape)} ({first_line(e)}); the model must accept the "
                       "dataset's images")

  if fn.kind == "nnx":
    reference = variables_of(model)
  else:
    init = lambda: fn.init(jax.random.key(seed), sample)
    try:
      reference = jax.eval_shape(init) if weights else jax.jit(init)()
    except Exception as e:
      raise fails(e) from None
  try:
    out = jax.eval_shape(lambda v: fn.apply(v, sample)[0], reference)
  except Exception as e:
    raise fails(e) from None
  check_logits(out, name, num_classes, image_shape, name_field)
  if not weights:
    return model, dict(reference)
  variables = jax.tree.map(jnp.asarray, load_weights(weights, reference,
                                                     field=weights_field))
  if fn.kind == "nnx":
    set_variables(model, variables)
  return model, variables
