"""Any Flax module, Linen or NNX, as pure functions over a variables dict, with layer hooks.

Compression code never calls a user's model directly: it wraps it with :func:`functional` and
gets one interface for both Flax APIs:

- ``variables``: a dict of collections (``params``, ``batch_stats``, ...) of nested dicts of
  arrays with string keys, for Linen as ``model.init`` returns it, for NNX the module's
  ``nnx.Param`` and ``nnx.BatchStat`` state as pure dicts (list indices become ``"0"``, ``"1"``).
  A parameter's path is its keys joined by ``/`` (``Dense_0/kernel``, ``blocks/0/mlp/kernel``),
  the same strings the selection rules match.
- ``apply(variables, *args, train=..., rngs=..., hook=...) -> (output, new_state)``: a pure
  function (``jit``-able, differentiable in ``variables``). The model's train/eval flag is found
  from its signature (``train``, ``training``, ``is_training``, or the inverted
  ``deterministic``/``use_running_average``) and passed in every call, Linen or NNX; an NNX
  model's layers also get ``deterministic``/``use_running_average`` with ``set_attributes``,
  which is all a model without such an argument needs.
  ``new_state`` holds the non-``params`` collections the model updated in training.
- ``hook(call, run)``: called at every call of a linear-like layer (Conv, Dense/Linear,
  DenseGeneral/LinearGeneral, Einsum, Embed) and of a normalization layer (BatchNorm, LayerNorm,
  GroupNorm, RMSNorm), and of any module whose path is in ``hook_paths``; it returns the call's
  output, usually ``run(x)`` for a transformed input ``x``. Linen calls are intercepted with
  ``flax.linen.intercept_methods``; NNX calls by giving each hooked module instance, for the
  duration of the call only, a subclass of its own class whose methods call the hook. The model's
  code is never modified and no global state changes.

Weights are transformed on the ``variables`` tree itself, before ``apply``: pruning masks,
fake-quantized kernels and shared weights are pure functions of parameter pytrees.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
from flax import nnx
from flax.core.tracers import current_trace

from jaxcompress.errors import ConfigError, invalid

LINEN_LINEAR = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)
LINEN_NORM = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NNX_LINEAR = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)
NNX_NORM = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)
TRAIN_FLAGS = ("train", "training", "is_training")
EVAL_FLAGS = ("deterministic", "use_running_average")


class Call(NamedTuple):
  """One intercepted call of a layer.

  Attributes:
    path: the module's ``/``-joined path (``layer1_0/conv1``, ``blocks/0/attn/query``).
    kind: ``linear`` (Conv/Dense-like, holds a ``kernel``), ``embed`` (holds an ``embedding``),
      ``norm``, or ``module`` (a module hooked by its path).
    type_name: the module's class name (``Conv``, ``Linear``, ``BatchNorm``, ...).
    method: ``__call__``, or ``attend`` for an Embed used as the output head.
    x: the call's input: its first argument, by position or by name (``layer(inputs=x)``).
    module: the module object (its attributes, e.g. ``epsilon``, can be read).
  """
  path: str
  kind: str
  type_name: str
  method: str
  x: Any
  module: Any


Hook = Callable[[Call, Callable[[Any], Any]], Any]


def chain_hooks(*hooks: Hook | None) -> Hook | None:
  """One hook running ``hooks`` outermost first: each one's ``run`` calls the next one."""
  hooks = [h for h in hooks if h is not None]
  if not hooks:
    return None

  def chained(call: Call, run: Callable[[Any], Any], i: int = 0) -> Any:
    if i == len(hooks):
      return run(call.x)
    return hooks[i](call, lambda x: chained(call._replace(x=x), run, i + 1))

  return chained


def fold_hook(fold: dict[str, tuple[Any, Any]]) -> Hook:
  """Runs each normalization layer at a path of ``fold`` as ``x * gain + bias`` (eval mode).

  ``fold`` maps a norm's path to its per-channel ``(gain, bias)``: a BatchNorm folded with the
  very arrays the export stores, so a model evaluated with this hook and its exported artifact
  compute the same float32 operations.
  """
  def hook(call, run):
    if call.kind == "norm" and call.path in fold:
      gain, bias = fold[call.path]
      return call.x * gain + bias
    return run(call.x)

  return hook


def capture_hook(store: dict[str, Any], paths: Sequence[str]) -> Hook:
  """Records into ``store[path]`` the output of the first call of each module in ``paths``.

  Raises:
    ConfigError: for a module called inside a lifted transform (``nn.scan``, ``nn.remat``,
      ``nn.vmap``, ``nnx.scan``), whose values cannot leave it, or one that returns no single
      array.
  """
  paths = set(paths)
  outer = current_trace()

  def hook(call, run):
    out = run(call.x)
    if call.path in paths and call.path not in store:
      if not hasattr(out, "shape"):
        raise ConfigError(f"distill.feature_pairs: {call.path!r} returns a "
                          f"{type(out).__name__}, not one array; pair a module that returns one")
      if current_trace() != outer:
        raise ConfigError(f"distill.feature_pairs: {call.path!r} runs inside a lifted transform "
                          "(nn.scan, nn.remat, nn.vmap, nnx.scan), whose values cannot leave "
                          "it; pair a module outside it")
      store[call.path] = out
    return out

  return hook


def weight_name(kind: str) -> str | None:
  """The parameter that holds a layer's weight: ``kernel``, ``embedding`` or none."""
  return {"linear": "kernel", "embed": "embedding"}.get(kind)


def contraction_axes(module: Any, ndim: int) -> tuple[int, ...]:
  """The axes of a linear-like layer's ``ndim``-D weight that its product sums over.

  The reduction axes, where N:M sparse tensor cores want their groups: Dense/Linear ``[in, out]``
  -> ``(0,)``; DenseGeneral/LinearGeneral ``[*batch, *in, *features]`` -> the ``in`` axes (the
  attention output projection ``[heads, dim, out]`` -> ``(0, 1)``); Einsum -> the kernel's letters
  absent from the output; Conv ``[*window, in, out]`` -> the input-channel axis ``ndim - 2`` alone
  (groups of consecutive input channels at each window position; ``ndim - 1`` for a
  ConvTranspose with ``transpose_kernel=True``, ``[*window, out, in]``); Embed
  ``[vocab, features]`` -> ``(0,)``, like a Dense that maps one-hot tokens.
  """
  if isinstance(module, (nn.DenseGeneral, nnx.LinearGeneral)):
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    batch = module.batch_dims if isinstance(module, nn.DenseGeneral) else module.batch_axis
    # Linen: an int or a tuple of ints; NNX: a mapping of batch axis to size (a FrozenDict)
    batch = batch if isinstance(batch, (tuple, list, Mapping)) else (batch,)
    return tuple(range(len(batch), len(batch) + len(axis)))
  letters = _einsum_letters(module, ndim)
  if letters is not None:
    return tuple(i for i, kept in enumerate(letters) if not kept)
  if _transposed(module, ndim):
    return (ndim - 1,)
  return (max(ndim - 2, 0),)


def _einsum_letters(module: Any, ndim: int) -> list[bool] | None:
  """For an Einsum whose ``ndim``-D kernel the equation spells out letter by letter: whether
  the output keeps each kernel letter; ``None`` for any other layer (or an elided kernel)."""
  if not isinstance(module, (nn.Einsum, nnx.Einsum)):
    return None
  inputs, _, output = module.einsum_str.replace(" ", "").partition("->")
  kernel = inputs.split(",")[-1]
  if "." in kernel or len(kernel) != ndim:
    return None
  return [c in output for c in kernel]


def _transposed(module: Any, ndim: int) -> bool:
  """A ConvTranspose with ``transpose_kernel=True``: its kernel is ``[*window, out, in]``."""
  return (isinstance(module, (nn.ConvTranspose, nnx.ConvTranspose)) and ndim >= 2
          and bool(getattr(module, "transpose_kernel", False)))


def output_axes(module: Any, ndim: int) -> tuple[int, ...]:
  """The axes of a linear-like layer's ``ndim``-D weight that its output keeps, one output
  channel per entry of their product: the last (Conv, Dense, Embed's features), a
  DenseGeneral's/LinearGeneral's batch and feature axes (``features=(heads, dim)``: ``[in,
  heads, dim]`` -> ``(1, 2)``), an Einsum's kernel letters the output keeps
  (``"btd,dhk->bthk"``: ``(1, 2)``), for a ConvTranspose with ``transpose_kernel=True``
  (``[*window, out, in]``) ``ndim - 2``."""
  if isinstance(module, (nn.DenseGeneral, nnx.LinearGeneral)):
    summed = contraction_axes(module, ndim)
    return tuple(i for i in range(ndim) if i not in summed) or (ndim - 1,)
  letters = _einsum_letters(module, ndim)
  if letters and any(letters):
    return tuple(i for i, kept in enumerate(letters) if kept)
  if _transposed(module, ndim):
    return (ndim - 2,)
  return (ndim - 1,)


def output_axis(module: Any, ndim: int) -> int:
  """The last of :func:`output_axes`: the axis channel pruning removes entries of."""
  return output_axes(module, ndim)[-1]


def called_shape(call: Any, name: str) -> tuple[int, ...] | None:
  """The shape of the weight ``name`` as the called module holds it (inside ``nn.scan``, one
  step's slice of the stacked parameter), or ``None`` where the module does not show it."""
  try:
    if isinstance(call.module, nn.Module):
      return tuple(jax.numpy.shape(call.module.variables["params"][name]))
    return tuple(getattr(call.module, name).shape)
  except (AttributeError, KeyError, TypeError):
    return None


def stacked_count(stored: Sequence[int], called: Sequence[int] | None, path: str) -> int:
  """Leading axes a lifted transform stacks on a weight stored at shape ``stored`` that one call
  holds at shape ``called`` (``None``: not shown; 0 for an ordinary weight).

  Raises:
    ConfigError: for a weight stacked along other axes than its leading ones
      (``variable_axes={'params': 1}``), which the library cannot compress step by step.
  """
  k = len(stored) - len(called) if called is not None else 0
  if k > 0 and tuple(stored[k:]) != tuple(called):
    raise ConfigError(f"model: the weight {path!r} is stored at {list(stored)}, one call uses "
                      f"{list(called)}: a lifted transform stacks it along other axes than its "
                      "leading ones; stack parameters first (nn.scan/nn.vmap with "
                      "variable_axes={'params': 0}) to compress each step")
  return max(k, 0)


def stacked_axes(axes: Sequence[int], stacked: int) -> tuple[int, ...]:
  """Axes of one call's weight (``axes``) in the stored weight that stacks ``stacked`` leading
  axes before it (``nn.scan``/``nn.vmap`` over ``params``), those leading axes first."""
  return tuple(range(stacked)) + tuple(int(a) + stacked for a in axes)


def _kind(module: Any, linear: tuple, norm: tuple) -> str | None:
  if isinstance(module, linear):
    return "embed" if isinstance(module, (nn.Embed, nnx.Embed)) else "linear"
  if isinstance(module, norm):
    return "norm"
  return None


def _str_keys(tree: Any) -> Any:
  """Nested dicts with every key as a string (NNX list indices become ``"0"``, ...)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _pure(state: Any) -> dict:
  """An NNX state as nested dicts (``nnx.to_pure_dict``; the method on flax releases before it)."""
  to_pure = getattr(nnx, "to_pure_dict", None)
  return to_pure(state) if to_pure is not None else state.to_pure_dict()


def _like(tree: Any, ref: Any, path: str) -> Any:
  """``tree`` (string keys) with the key types of ``ref`` (an NNX pure dict), checked to hold
  every entry of ``ref`` at its shape: variables of another module are one line, not a model
  trained at the wrong shapes."""
  if not isinstance(ref, dict):
    if tuple(jax.numpy.shape(tree)) != tuple(jax.numpy.shape(ref)):
      raise ConfigError(f"variables: {path} has shape {tuple(jax.numpy.shape(tree))}, the NNX "
                        f"module's has {tuple(jax.numpy.shape(ref))}: these are another model's "
                        "variables; pass variables_of(module)")
    return tree
  if not isinstance(tree, Mapping):
    raise ConfigError(f"variables: {path} is a {type(tree).__name__}, the NNX module holds "
                      "layers there; pass variables_of(module)")
  missing = [str(k) for k in ref if str(k) not in tree]
  if missing:
    raise ConfigError(f"variables: {path}/{missing[0]} is missing (string keys expected, as "
                      "variables_of(module) gives them); pass variables_of(module)")
  return {k: _like(tree[str(k)], v, f"{path}/{k}") for k, v in ref.items()}


def _call_parameters(module: Any) -> Mapping[str, inspect.Parameter]:
  """The parameters of a module's ``__call__`` (none where Python cannot tell)."""
  try:
    return inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return {}


def _flag_names(module: Any) -> tuple[str | None, bool]:
  """``(name, inverted)`` of a Linen or NNX module's train/eval keyword argument."""
  names = _call_parameters(module)
  for name in TRAIN_FLAGS:
    if name in names:
      return name, False
  for name in EVAL_FLAGS:
    if name in names:
      return name, True
  return None, False


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
  """A Flax module as pure functions; build it with :func:`functional`.

  Invariants: ``kind`` is ``linen`` or ``nnx``; for NNX ``graphdef`` and ``rest`` (the state
  that is neither a parameter nor a batch statistic, e.g. RNG counters) are fixed at wrapping
  time and ``reference`` keeps the key types of the module's own state.
  """
  module: Any
  kind: str
  flag: str | None = None
  flag_inverted: bool = False
  graphdef: Any = None
  rest: Any = None
  reference: Any = None
  takes_rngs: bool = False  # NNX: __call__ has an ``rngs`` argument (given one in training)

  @property
  def name(self) -> str:
    return type(self.module).__name__

  def init(self, key: jax.Array, *args: Any, **kwargs: Any) -> dict:
    """Fresh variables: ``module.init`` for Linen (eval mode); the module's own state for NNX."""
    if self.kind == "nnx":
      return variables_of(self.module)
    kwargs = self._flag_kwargs(kwargs, False)
    return dict(self.module.init(key, *args, **kwargs))

  def _flag_kwargs(self, kwargs: dict, train: bool) -> dict:
    if self.flag is None:
      return kwargs
    return {**kwargs, self.flag: (not train) if self.flag_inverted else train}

  def apply(self, variables: dict, *args: Any, train: bool = False, rngs: Any = None,
            hook: Hook | None = None, hook_paths: Sequence[str] = (),
            **kwargs: Any) -> tuple[Any, dict]:
    """Runs the model; see the module docstring.

    Args:
      variables: the model's variables (``params`` and e.g. ``batch_stats``).
      *args: the model's inputs.
      train: training mode (batch statistics updated, dropout on).
      rngs: a PRNG key for dropout and other stochastic layers in training.
      hook: ``hook(call, run) -> output`` at layer calls, or ``None``.
      hook_paths: paths of further modules whose calls reach ``hook`` (kind ``module``).
      **kwargs: further keyword arguments of the model.

    Returns:
      ``(output, new_state)``: ``new_state`` holds the non-``params`` collections as the model
      left them (empty in eval mode).
    """
    if self.kind == "nnx":
      return self._apply_nnx(variables, args, kwargs, train, rngs, hook, set(hook_paths))
    kwargs = self._flag_kwargs(kwargs, train)
    mutable = [c for c in variables if c != "params"] if train else False
    # Flax serves a stream the dict lacks (a Dropout's rng_collection="noise") from "params".
    rng_dict = ({"dropout": rngs, "params": jax.random.fold_in(rngs, 1)}
                if (train and rngs is not None) else None)
    fn = lambda: self.module.apply(variables, *args, mutable=mutable, rngs=rng_dict, **kwargs)
    if hook is not None:
      with nn.intercept_methods(_linen_interceptor(hook, set(hook_paths))):
        out = fn()
    else:
      out = fn()
    if train:
      out, new_state = out
      return out, dict(new_state)
    return out, {}

  def _apply_nnx(self, variables, args, kwargs, train, rngs, hook, hook_paths):
    states = [nnx.State(_like(variables["params"], self.reference["params"], "params"))]
    if "batch_stats" in self.reference:
      if "batch_stats" not in variables:
        raise ConfigError("variables: no 'batch_stats'; the NNX module has BatchNorm statistics: "
                          "pass variables_of(module)")
      states.append(nnx.State(_like(variables["batch_stats"], self.reference["batch_stats"],
                                    "batch_stats")))
    rest = jax.tree.map(lambda a: a, self.rest)  # fresh Variables, owned by the current trace
    model = nnx.merge(self.graphdef, *states, rest)
    model.set_attributes(deterministic=not train, use_running_average=not train,
                         raise_if_not_found=False)
    kwargs = self._flag_kwargs(kwargs, train)  # a flag of __call__ overrides the attributes
    streams = sorted({node.tag for _, node in nnx.iter_graph(model)
                      if isinstance(node, nnx.RngStream)}) if train else []
    # A __call__(x, rngs=None) that hands its Rngs to the layers gets them from the step's key.
    call_rngs = train and "rngs" not in kwargs and self.takes_rngs
    if (streams or call_rngs) and rngs is None:  # the module's own keys: the same draws each call
      drawn = f"its streams: {', '.join(streams)}" if streams else "its __call__ takes rngs"
      raise ConfigError(f"rngs: the NNX model draws random numbers in training ({drawn}); pass "
                        "rngs=, a new PRNG key at every step")
    if streams:  # match_shape: streams split by nnx.split_rngs (stacked blocks) keep their shape
      nnx.reseed(model, policy="match_shape",
                 **{s: jax.random.fold_in(rngs, i) for i, s in enumerate(streams)})
    if call_rngs:
      kwargs = {**kwargs, "rngs": nnx.Rngs(jax.random.fold_in(rngs, len(streams)))}
    swapped = []
    if hook is not None:
      for path, module in nnx.iter_modules(model):
        path = "/".join(str(p) for p in path)
        kind = _kind(module, NNX_LINEAR, NNX_NORM) or ("module" if path in hook_paths else None)
        if kind is not None:
          swapped.append((module, type(module)))
          object.__setattr__(module, _CALL, (path, kind, hook))
          object.__setattr__(module, "__class__", _hooked_class(type(module)))
    try:
      out = model(*args, **kwargs)
    finally:
      for module, cls in swapped:
        object.__setattr__(module, "__class__", cls)
        object.__delattr__(module, _CALL)
    new_state = {}
    if train and "batch_stats" in variables:
      new_state["batch_stats"] = _str_keys(_pure(nnx.state(model, nnx.BatchStat)))
    return out, new_state


def _linen_interceptor(hook: Hook, hook_paths: set[str]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = "/".join(module.path)
    kind = _kind(module, LINEN_LINEAR, LINEN_NORM)
    method = context.method_name
    if kind is not None:
      wanted = method == "__call__" or (kind == "embed" and method == "attend")
    else:
      kind, wanted = "module", method == "__call__" and path in hook_paths
    found = _layer_input(next_fun, type(module), method, args, kwargs) if wanted else None
    if found is None:
      return next_fun(*args, **kwargs)
    _check_equation(module, path, args, kwargs)
    return hook(Call(path, kind, type(module).__name__, method, found[0], module), found[1])

  return interceptor


def _layer_input(call: Callable[..., Any], cls: type, method: str, args: tuple,
                 kwargs: dict) -> tuple[Any, Callable[[Any], Any]] | None:
  """``(x, run)`` of one call of a hooked method: its input, the first argument whether given by
  position or by name (``layer(inputs=x)``), and ``run(y)``, the call with ``y`` in its place;
  ``None`` for a call without one."""
  if args:
    return args[0], lambda y: call(y, *args[1:], **kwargs)
  name = _input_name(cls, method)
  if name not in kwargs:
    return None
  rest = {k: v for k, v in kwargs.items() if k != name}
  return kwargs[name], lambda y: call(**{name: y}, **rest)


def _check_equation(module: Any, path: str, args: tuple, kwargs: dict) -> None:
  """Refuses an Einsum call that gives its own equation (``layer(x, "btd,fd->btf")``) where it
  is not the module's ``einsum_str``, from which the layer's axes are read."""
  if not isinstance(module, (nn.Einsum, nnx.Einsum)):
    return
  given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  own = module.einsum_str
  if given is None or (own is not None and given.replace(" ", "") == own.replace(" ", "")):
    return
  raise ConfigError(f"model: the Einsum {path!r} is called with the equation {given!r}, not its "
                    f"einsum_str {own!r}; the library reads the layer's reduction and output "
                    f"axes from einsum_str: give {given!r} when the Einsum is built and call it "
                    "with its input alone")


@functools.lru_cache(maxsize=None)
def _input_name(cls: type, method: str) -> str | None:
  """The name of the first parameter of ``cls.method`` after ``self`` (a layer's input)."""
  try:
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]
  except (TypeError, ValueError):
    return None
  return params[0].name if params and params[0].kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) else None


_HOOKED: dict[type, type] = {}  # a memo of the hooked subclasses, one per class; holds no state
_CALL = "_jaxcompress_call"  # instance attribute: (path, kind, hook) while a call is hooked


def _hooked_class(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` (and ``attend``) go through the instance's hook.

  The hook, path and kind are read from the instance (set only for the duration of one
  :meth:`Functional.apply`); the subclass is cached per class.
  """
  sub = _HOOKED.get(cls)
  if sub is None:
    def make(method):
      def wrapped(self, *args, **kwargs):
        path, kind, hook = getattr(self, _CALL)
        call = getattr(super(sub, self), method)
        found = _layer_input(call, cls, method, args, kwargs)
        if found is None:
          return call(*args, **kwargs)
        _check_equation(self, path, args, kwargs)
        return hook(Call(path, kind, cls.__name__, method, found[0], self), found[1])
      return wrapped

    body = {"__call__": make("__call__")}
    if issubclass(cls, nnx.Embed):
      body["attend"] = make("attend")
    sub = _HOOKED[cls] = type(cls.__name__, (cls,), body)
  return sub


def variables_of(module: nnx.Module) -> dict:
  """The variables dict of an NNX module: ``params`` and, if it has any, ``batch_stats``."""
  if not isinstance(module, nnx.Module):
    raise ConfigError(f"variables_of: module must be an NNX module (flax.nnx.Module), got "
                      f"{type(module).__name__}; a Linen module's variables come from its init")
  out = {"params": _str_keys(_pure(nnx.state(module, nnx.Param)))}
  stats = _pure(nnx.state(module, nnx.BatchStat))
  if stats:
    out["batch_stats"] = _str_keys(stats)
  return out


def set_variables(module: nnx.Module, variables: Mapping[str, Any]) -> None:
  """Writes a variables dict into an NNX module, in place: the way back from :func:`variables_of`.

  ``variables`` has string keys, as :func:`variables_of` gives them (``nnx.update`` does not take
  ``"0"`` for a list index), e.g. ``Compression.variables(state)`` after training, or the
  ``batch_stats`` alone that a training forward returns. It is checked against the module
  before anything is written.

  Raises:
    ConfigError: ``module`` is not an NNX module, or ``variables`` are not its variables (neither
      ``params`` nor ``batch_stats``, an entry missing, another shape, or a collection the module
      does not hold).
  """
  reference = variables_of(module)
  if not isinstance(variables, Mapping) or not {"params", "batch_stats"} & set(variables):
    keys = sorted(map(str, variables))[:4] if isinstance(variables, Mapping) else []
    raise invalid("variables", f"a {type(variables).__name__} with keys {keys}",
                  "a dict with 'params' and/or 'batch_stats', as variables_of(module) gives")
  states = []
  for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    if collection not in variables:
      continue
    if collection not in reference:
      raise ConfigError(f"variables: {collection!r} given, the NNX module holds no "
                        f"{kind.__name__}; pass variables_of(module)")
    state = nnx.state(module, kind)
    states.append((state, _like(variables[collection], _pure(state), collection)))
  for state, values in states:
    replace = getattr(nnx, "replace_by_pure_dict", None)
    if replace is not None:
      replace(state, values)
    else:  # older flax
      state.replace_by_pure_dict(values)
    nnx.update(module, state)


def functional(model: Any, *, train_kwarg: str | None = "auto") -> Functional:
  """Wraps a Flax Linen or NNX module (see the module docstring).

  Args:
    model: an ``nn.Module`` (unbound) or an ``nnx.Module``; a :class:`Functional` is returned
      as is.
    train_kwarg: the keyword of the model's train flag; ``"auto"`` finds it from the signature
      of its ``__call__`` (``train``, ``training``, ``is_training``, inverted
      ``deterministic`` or ``use_running_average``); ``None``: the model takes none.

  Returns:
    The :class:`Functional`.

  Raises:
    ConfigError: if ``model`` is not a Flax module.
  """
  if isinstance(model, Functional):
    return model
  if not isinstance(model, (nnx.Module, nn.Module)):
    raise ConfigError(f"model must be a Flax Linen module (flax.linen.Module) or an NNX module "
                      f"(flax.nnx.Module), got {type(model).__name__}")
  if train_kwarg == "auto":
    flag, inverted = _flag_names(model)
  else:
    flag, inverted = train_kwarg, train_kwarg in EVAL_FLAGS
  if isinstance(model, nnx.Module):
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    reference = {"params": _pure(params)}
    if _pure(stats):
      reference["batch_stats"] = _pure(stats)
    return Functional(model, "nnx", flag=flag, flag_inverted=inverted, graphdef=graphdef,
                      rest=rest, reference=reference,
                      takes_rngs="rngs" in _call_parameters(model))
  return Functional(model, "linen", flag=flag, flag_inverted=inverted)
