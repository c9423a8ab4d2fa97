"""The docstring examples run, and those that show their output print it, as a user who copies
them sees it.

Examples that use the reader's own model get it from :func:`reader`: the small CNN
``my_models:small_cnn`` in the working directory (a fresh folder, where the examples also write
their files), its ``variables`` and ``params``, 512 CIFAR-10-shaped images ``x`` with labels
``y``, a ``batch`` of 32 of them and its ``loss(params, batch)``; ``jax``, ``jnp``, ``np`` and
``optax`` are imported. Everything else an example needs, it makes or imports itself.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiments
import jaxcompress
from jaxcompress.models import create_model
from jaxcompress.text import TEXT_ENV
from test_public_api import resolve

MODULES = [m.name for m in pkgutil.walk_packages(jaxcompress.__path__, "jaxcompress.")]
# The jobs' entry points define the process's --config flag when imported (a second one in the
# same process is refused), so only the experiments' library modules are imported here.
JOB_FILES = {f"experiments.{p.stem}": p.read_text()
             for p in sorted(pathlib.Path(experiments.__file__).parent.glob("[!_]*.py"))}
ENTRY_POINTS = [name for name, text in JOB_FILES.items() if "cli.run(main)" in text]
JOB_MODULES = [name for name in JOB_FILES if name not in ENTRY_POINTS]

MY_MODELS = '''import flax.linen as nn


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
    return nn.Dense(self.num_classes, name="linear")(x.mean((1, 2)))


def small_cnn(num_classes):
  return SmallCNN(num_classes)
'''

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
  """The working folder (with ``my_models.py`` and, under ``text/``, a Tiny Shakespeare
  stand-in) and the examples' globals."""
  folder = tmp_path_factory.mktemp("reader")
  (folder / "my_models.py").write_text(MY_MODELS)
  (folder / "text" / "tiny_shakespeare").mkdir(parents=True)
  (folder / "text" / "tiny_shakespeare" / "input.txt").write_text(TEXT * 40)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(folder)
    model, variables = create_model("my_models:small_cnn", num_classes=10,
                                    image_shape=(32, 32, 3))
  sys.modules.pop("my_models")  # another folder's my_models.py is another module
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=512)

  @jax.jit
  def loss(params, batch):
    logits = model.apply({**variables, "params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return folder, dict(model=model, variables=variables, params=variables["params"], x=x, y=y,
                      batch=(x[:32], y[:32]), loss=loss, jax=jax, jnp=jnp, np=np, optax=optax)


@pytest.mark.parametrize("name", MODULES + JOB_MODULES)
def test_docstring_examples_print_what_they_show(name, reader, monkeypatch):
  folder, globs = reader
  monkeypatch.chdir(folder)
  monkeypatch.setenv(TEXT_ENV, str(folder / "text"))
  # Fresh dicts: an example that assigns into ``variables`` leaves the other modules' alone.
  globs = {**globs, "variables": jax.tree.map(lambda a: a, globs["variables"])}
  try:
    result = doctest.testmod(importlib.import_module(name), extraglobs=globs,
                             optionflags=doctest.ELLIPSIS)
  finally:
    sys.modules.pop("my_models", None)
  assert result.failed == 0


def test_the_entry_points_hold_no_examples():
  # They are not imported above, so an example there would never run.
  assert len(ENTRY_POINTS) > 5 and [n for n in ENTRY_POINTS if ">>>" in JOB_FILES[n]] == []


def test_the_examples_are_found():
  finder = doctest.DocTestFinder()
  found = [name for name in MODULES
           if any(t.examples for t in finder.find(importlib.import_module(name), name))]
  assert len(MODULES) > 50 and len(found) > 25


def test_the_package_docstring_names_modules_that_import():
  names = [n for line in re.findall(r"^  (\w+(?:, \w+)*)(?: {2,}|$)", jaxcompress.__doc__, re.M)
           for n in line.split(", ")]
  assert len(names) > 15
  for name in names:
    importlib.import_module(f"jaxcompress.{name}")


def _resolves(dotted: str) -> bool:
  try:
    resolve(dotted)
  except (ImportError, AttributeError):
    return False
  return True


def test_the_cross_references_of_the_docstrings_resolve():
  # :meth: and :attr: name members of the class they are written in, so they are left out.
  role = re.compile(r":(?:func|class|mod|data|exc):`~?([\w.]+)`")
  bad, count = [], 0
  for name in ["jaxcompress"] + MODULES:
    module = importlib.import_module(name)
    package = name if module.__file__.endswith("__init__.py") else name.rpartition(".")[0]
    with open(module.__file__) as f:
      refs = role.findall(f.read())
    count += len(refs)
    for ref in refs:  # relative (.finalize.finalize), absolute, or from the module or package
      where = [package + ref] if ref.startswith(".") else [f"{name}.{ref}",
                                                            f"{package}.{ref}", ref]
      if not any(_resolves(w) for w in where):
        bad.append(f"{name}: {ref}")
  assert count > 300 and bad == []


def _functions(module):
  """The functions and methods ``module`` defines."""
  for obj in vars(module).values():
    if getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      yield obj
    elif inspect.isclass(obj):
      for member in vars(obj).values():
        member = getattr(member, "__func__", member)  # a staticmethod's or classmethod's
        if inspect.isfunction(member):
          yield member


ARG = r"^  (\*{0,2}\w+(?:, \*{0,2}\w+)*)(?: \([^)\n]*\))?:"  # an Args entry: 'name (type):'


def test_the_args_sections_name_the_parameters():
  # Names documented together ("seed, epoch: ...") count each; *args and **kwargs as args, kwargs.
  bad, count = [], 0
  for name in MODULES:
    for fn in _functions(importlib.import_module(name)):
      section = re.search(r"^Args:\n((?:  .*\n?|\n)+)", inspect.getdoc(fn) or "", re.M)
      if not section:
        continue
      count += 1
      listed = [n.strip(" *") for names in re.findall(ARG, section.group(1), re.M)
                for n in names.split(",")]
      params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
      if sorted(listed) != sorted(params):
        bad.append(f"{fn.__module__}.{fn.__qualname__}: documents {sorted(set(listed))}, "
                   f"takes {sorted(params)}")
  assert count > 80 and bad == []
