"""Native JAX models -> ``(fn, params)`` for :func:`importers._jax.import_jax`.

:func:`as_jax_function` turns each accepted model kind into a pure function ``fn(params, *inputs)``
(``fn(params, **inputs)`` for a dict of inputs) and a flat parameter dict whose keys are the
parameters' dotted paths (``conv1.kernel``, ``bn.mean``), so the imported constants read like the
torch importer's. Every kind is traced in **inference mode**, and the user's object is never
modified (the function works on a copy made inside the trace):

- a ``flax.nnx.Module``: ``nnx.split`` into its graph definition, its array variables (``Param``,
  ``BatchStat`` and any other numeric ``Variable``; named by state path) and the rest (RNG streams,
  kept as they are); the function merges them into a fresh copy, switches the copy to eval mode
  (``deterministic=True``, ``use_running_average=True``: Dropout off, BatchNorm on its running
  statistics) and calls it. The copy's submodule calls are wrapped in ``jax.named_scope`` of their
  attribute name, so each equation's ``Source.module_path`` is its module path as a jaxpr name
  stack (``block/conv1``, ``layers.0``); nnx gives no name stacks of its own.
- a Flax Linen module as ``(module, variables)``, ``(module, variables, apply_kwargs)`` or a bound
  module (``module.bind(variables)``): ``module.apply(variables, *inputs, **apply_kwargs)``. Linen
  takes inference switches as call arguments, so when ``apply_kwargs`` is not given, the
  ``__call__`` parameters named ``train`` / ``training`` / ``is_training`` are set to False and
  ``deterministic`` / ``use_running_average`` to True (only those the signature has); an explicit
  ``apply_kwargs`` replaces that detection. Parameters are named by their path inside their
  collection (``Dense_0.kernel``, ``BatchNorm_0.mean``), or with the collection in front
  (``params.Dense_0.kernel``) when that would collide. Linen's own name stacks give
  ``Source.module_path`` (``Model/Dense_0``).
- an ``equinox.Module``: ``eqx.nn.inference_mode`` on a copy, ``eqx.partition(model,
  eqx.is_array)``; array leaves named by path (``layers.0.weight``). ``eqx.nn.Linear`` layers
  (``weight @ x``) are traced as ``x @ weight.T`` (the same numbers) so that they import as
  dense layers. Equinox models take one
  example (no batch axis) by convention, so with ``batch_axis=0`` the model is traced on the
  example row without its batch axis (the outputs get it back; the compiled pass maps over the
  rows, as ``jax.vmap(model)``); with ``batch_axis=None`` it is called on the example as given.
  ``eqx.nn.Conv*`` layers (zero padding) are traced with their bias added right after the
  convolution, for the same reason. A stateful model (``eqx.nn.BatchNorm``) is passed as
  ``(model, state)`` (``eqx.nn.make_with_state``): it is called as ``model(x, state)`` and its
  first output explained; the state's arrays are constants named by the ``StateIndex`` that
  reads them (``bn.ema_state_index.0`` the running mean, ``.1`` the variance), set on a copy of
  the state (``State.set`` would invalidate the user's). Submodule calls run in
  ``jax.named_scope`` of their attribute name (each callable submodule of the copy becomes an
  instance of a subclass of its class, so ``isinstance`` checks hold): ``Source.module_path``
  is the module path (``conv``, ``layers.0``; Equinox's own ``eqx.nn.Conv`` and ``vmap()``
  scopes are skipped) and ``module_type`` the Equinox class, so a BatchNorm is fused as
  Flax's.
- a plain function ``fn(params, *inputs)`` with ``params=`` (unchanged).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Optional

import jax

from ._names import path_name

__all__ = ["as_jax_function", "is_jax_model", "model_kind"]

# Linen __call__ parameters set for inference when no apply_kwargs are given
_LINEN_INFERENCE = {"train": False, "training": False, "is_training": False,
                    "deterministic": True, "use_running_average": True}


def _linen():
    if "flax" not in sys.modules:  # a flax model cannot exist without flax imported
        return None
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return None
    return nn


def _nnx():
    if "flax" not in sys.modules:
        return None
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return None
    return nnx


def _eqx():
    if "equinox" not in sys.modules:
        return None
    import equinox
    return equinox


def model_kind(model: Any) -> Optional[str]:
    """``"nnx"``, ``"linen"`` (a bound module or a ``(module, variables[, apply_kwargs])``
    tuple), ``"linen-unbound"`` (a Linen module without variables), ``"equinox"`` or None."""
    nnx = _nnx()
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    nn = _linen()
    if nn is not None:
        if isinstance(model, nn.Module):
            return "linen" if model.scope is not None else "linen-unbound"
        if isinstance(model, tuple) and len(model) in (2, 3) and isinstance(model[0], nn.Module):
            return "linen"
    eqx = _eqx()
    if eqx is not None and (isinstance(model, eqx.Module) or (
            isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], eqx.Module)
            and isinstance(model[1], eqx.nn.State))):
        return "equinox"
    return None


def is_jax_model(model: Any) -> bool:
    """A model kind :func:`as_jax_function` converts (that holds its own parameters)."""
    return model_kind(model) in ("nnx", "linen", "equinox")


def _flat(tree, strip_value: bool = False) -> tuple[dict, Any, list]:
    """``({dotted name: leaf}, treedef, names in leaf order)`` of a pytree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, flat = [], {}
    for path, leaf in leaves:
        if strip_value and path and getattr(path[-1], "name", None) == "value":
            path = path[:-1]  # nnx Variable leaves end in .value
        name = path_name(path) or "param"
        if name in flat:  # keep names unique
            i = 1
            while f"{name}_{i}" in flat:
                i += 1
            name = f"{name}_{i}"
        names.append(name)
        flat[name] = leaf
    return flat, treedef, names


def _call(model, xs, kw):
    return model(*xs, **kw)


def as_jax_function(model: Any, params: Any = None, *, batched: bool = True
                    ) -> tuple[Callable, Any, str, dict]:
    """``(fn, params, model_name, modules)`` for :func:`import_jax` (module docstring).
    ``batched``: the inputs have a leading batch axis (``batch_axis=0``), which Equinox models are
    vmapped over. ``modules`` is filled while ``fn`` is traced: jaxpr name stack -> ``(dotted
    module path, module class)`` of every submodule called (Flax NNX and Linen; empty for the
    others). A model that holds its parameters with ``params=``, or a function without it,
    raises TypeError."""
    kind = model_kind(model)
    if kind is None:
        if not callable(model):
            raise TypeError(f"expected a torch.nn.Module, a flax.nnx.Module, a Flax Linen "
                            f"(module, variables), an equinox.Module or a function "
                            f"fn(params, *inputs) with params=..., got {type(model).__name__}")
        if params is None:
            raise TypeError(f"a function {getattr(model, '__name__', type(model).__name__)} "
                            f"needs its parameter pytree as params= (fn(params, *inputs)); "
                            f"flax.nnx, Flax Linen (module, variables) and equinox models hold "
                            f"their own")
        return model, params, getattr(model, "__name__", type(model).__name__), {}
    if kind == "linen-unbound":
        raise TypeError(f"a Flax Linen module needs its variables: pass (module, variables), "
                        f"e.g. Explainer(({type(model).__name__}(...), variables), x), or a "
                        f"bound module module.bind(variables)")
    if params is not None:
        raise TypeError(f"params= is for a JAX function fn(params, *inputs); a {kind} model "
                        f"({type(model).__name__}) holds its own parameters")
    if kind == "nnx":
        return _from_nnx(model)
    if kind == "linen":
        return _from_linen(model)
    if isinstance(model, tuple):  # (model, eqx.nn.State)
        return _from_equinox(model[0], batched, model[1])
    return _from_equinox(model, batched)


# ---- flax.nnx ---------------------------------------------------------------------------------
_SCOPED: dict = {}


def _scoped_class(cls, names: dict):
    """A subclass of ``cls`` whose ``__call__`` runs in ``jax.named_scope(names[id(self)])``."""
    sub = _SCOPED.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            name = _SCOPE_NAMES.get(id(self))
            if not name:
                return cls.__call__(self, *args, **kwargs)
            with jax.named_scope(name):
                return cls.__call__(self, *args, **kwargs)
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _SCOPED[cls] = sub
    return sub


_SCOPE_NAMES: dict = {}


def _name_submodules(nnx, root, modules_seen: dict) -> list:
    """Wrap every submodule of ``root`` (a copy made inside the trace) so that its calls run in
    a named scope of its path relative to the enclosing module; returns the objects renamed and
    records ``name stack -> (dotted module path, class)`` in ``modules_seen``."""
    modules = {}
    for path, node in nnx.iter_graph(root):
        # modules with a __call__ of their own (containers such as nnx.List are not scoped)
        if isinstance(node, nnx.Module) and path and callable(node) \
                and type(node).__call__ is not getattr(nnx.Module, "__call__", None):
            modules[tuple(path)] = node
    done, stacks = [], {}
    for path, node in modules.items():
        # relative to the nearest enclosing scoped module: the longest proper prefix of path
        cut = 0
        for k in range(len(path) - 1, 0, -1):
            if path[:k] in modules:
                cut = k
                break
        name = ".".join(str(p) for p in path[cut:])
        if type(node) in _SCOPED.values():  # shared: already scoped under its first path
            continue
        cls = type(node)
        try:
            node.__class__ = _scoped_class(cls, _SCOPE_NAMES)
        except TypeError:  # a class whose instances cannot change class: left unnamed
            continue
        _SCOPE_NAMES[id(node)] = name
        stacks[path] = f"{stacks[path[:cut]]}/{name}" if cut else name
        modules_seen[stacks[path]] = (".".join(str(p) for p in path),
                                      f"{cls.__module__}.{cls.__qualname__}")
        done.append(node)
    return done


def _is_array_variable(nnx):
    def keep(path, var):
        if isinstance(var, nnx.RngState):
            return False
        value = var.get_value() if hasattr(var, "get_value") else getattr(var, "value", None)
        return isinstance(value, jax.Array) and \
            not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
    return keep


def _eval_mode(nnx, module):
    """Dropout off and BatchNorm on running statistics, on ``module`` (a copy)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            for attr, value in (("deterministic", True), ("use_running_average", True)):
                if attr in vars(node):
                    setattr(node, attr, value)


def _from_nnx(model):
    nnx = _nnx()
    graphdef, arrays, rest = nnx.split(model, _is_array_variable(nnx), ...)
    flat, treedef, names = _flat(arrays, strip_value=True)
    leaves_def = jax.tree_util.tree_structure(arrays)
    modules_seen: dict = {}

    def fn(p, *xs, **kw):
        state = jax.tree_util.tree_unflatten(leaves_def, [p[n] for n in names])
        copy = nnx.merge(graphdef, state, rest)  # a fresh module: the user's is untouched
        _eval_mode(nnx, copy)
        renamed = _name_submodules(nnx, copy, modules_seen)
        try:
            return _call(copy, xs, kw)
        finally:
            for node in renamed:
                _SCOPE_NAMES.pop(id(node), None)

    return fn, flat, type(model).__name__, modules_seen


# ---- Flax Linen -------------------------------------------------------------------------------
def _from_linen(model):
    nn = _linen()
    apply_kwargs = None
    if isinstance(model, tuple):
        module, variables = model[0], model[1]
        if len(model) == 3:
            apply_kwargs = dict(model[2] or {})
        if module.scope is not None:
            module = module.unbind()[0]
    else:
        module, variables = model.unbind()
    if apply_kwargs is None:
        try:
            sig = inspect.signature(type(module).__call__)
        except (TypeError, ValueError):  # pragma: no cover
            sig = None
        apply_kwargs = {k: v for k, v in _LINEN_INFERENCE.items()
                        if sig is not None and k in sig.parameters}
    variables = jax.tree_util.tree_map(lambda v: v, dict(variables))  # a shallow, own copy
    # names inside their collection when unique, else with the collection in front
    inner, full = {}, {}
    order = []
    for coll in variables:
        flat, _, names = _flat(variables[coll])
        for n in names:
            inner.setdefault(n, []).append(coll)
            full[f"{coll}.{n}"] = flat[n]
            order.append((coll, n))
    unique = all(len(c) == 1 for c in inner.values())
    key = (lambda coll, n: n) if unique else (lambda coll, n: f"{coll}.{n}")
    params = {key(c, n): full[f"{c}.{n}"] for c, n in order}
    trees = {c: jax.tree_util.tree_structure(variables[c]) for c in variables}
    coll_names = {c: [n for cc, n in order if cc == c] for c in variables}

    modules_seen: dict = {}
    root = type(module).__name__

    def record(next_fun, args, kwargs, context):
        m = context.module
        if m.path:  # Linen's name stack: the root class, then the module path
            cls = type(m)
            modules_seen["/".join((root,) + tuple(m.path))] = (
                ".".join(m.path), f"{cls.__module__}.{cls.__qualname__}")
        return next_fun(*args, **kwargs)

    def fn(p, *xs, **kw):
        v = {c: jax.tree_util.tree_unflatten(trees[c], [p[key(c, n)] for n in coll_names[c]])
             for c in variables}
        with nn.intercept_methods(record):
            return module.apply(v, *xs, **kw, **apply_kwargs)

    return fn, params, root, modules_seen


# ---- Equinox ----------------------------------------------------------------------------------
def _right_linear(eqx):
    """``eqx.nn.Linear`` computes ``weight @ x``: a dot_general with the constant on the left,
    which the importer reads as a product of two values. The same layer written ``x @ weight.T``
    (the dense form the importer maps onto ``aten.linear``, bias folded in), same parameters."""
    global _RightLinear
    if _RightLinear is None:
        class Linear(eqx.Module):
            weight: Any
            bias: Any

            def __call__(self, x, *, key=None):
                y = x @ self.weight.T
                return y if self.bias is None else y + self.bias

        _RightLinear = Linear
    return _RightLinear


_RightLinear = None
_BiasConv = None


def _bias_conv(eqx):
    """``eqx.nn.Conv`` adds its bias after squeezing the batch axis it added; the same
    convolution with the bias added right after ``conv_general_dilated`` (the form the importer
    folds into ``aten.convolution``), same parameters."""
    global _BiasConv
    if _BiasConv is None:
        class Conv(eqx.Module):
            weight: Any
            bias: Any
            stride: tuple = eqx.field(static=True)
            padding: tuple = eqx.field(static=True)
            dilation: tuple = eqx.field(static=True)
            groups: int = eqx.field(static=True)

            def __call__(self, x, *, key=None):
                y = jax.lax.conv_general_dilated(
                    x[None], self.weight, window_strides=self.stride, padding=self.padding,
                    rhs_dilation=self.dilation, feature_group_count=self.groups)
                if self.bias is not None:
                    y = y + self.bias[None]
                return y[0]

        _BiasConv = Conv
    return _BiasConv


class _EqxStacks(dict):
    """jaxpr name stack -> (module path, class) of an Equinox model's scoped submodules; Equinox
    layers add a scope of their own (``eqx.nn.Conv``), skipped when a stack is looked up."""

    def get(self, key, default=None):
        clean = "/".join(p for p in key.split("/")
                         if not p.startswith("eqx.nn.") and not p.endswith(")"))  # vmap()
        return dict.get(self, clean, default) if clean else default


_EQX_SCOPED: dict = {}


def _eqx_scoped(node, name: str):
    """A copy of the Equinox module ``node`` whose ``__call__`` runs in ``jax.named_scope(name)``
    (an instance of a subclass: ``isinstance`` checks such as ``StatefulLayer`` still hold, and
    the pytree has the same fields and leaves)."""
    cls = type(node)
    sub = _EQX_SCOPED.get((cls, name))
    if sub is None:
        def __call__(self, *args, **kwargs):
            with jax.named_scope(name):
                return cls.__call__(self, *args, **kwargs)
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _EQX_SCOPED[(cls, name)] = sub
    new = object.__new__(sub)
    for k, v in vars(node).items():
        object.__setattr__(new, k, v)
    return new


def _scope_equinox(eqx, root, original: dict, stacks: dict):
    """``root`` with every callable submodule scoped by its attribute path relative to its
    parent (:func:`_eqx_scoped`); records ``stack -> (dotted path, class)`` in ``stacks``
    (``original``: id of a swapped layer -> the Equinox class it replaced)."""
    def visit(node, path, stack):
        def child(p, n):
            if not (isinstance(n, eqx.Module) and callable(n)):
                return n
            name = path_name(p)
            if not name:
                return n
            full, st = path + (name,), f"{stack}/{name}" if stack else name
            cls = original.get(id(n), type(n))
            stacks[st] = (".".join(full), f"{cls.__module__}.{cls.__qualname__}")
            try:
                return _eqx_scoped(visit(n, full, st), name)
            except TypeError:  # pragma: no cover - a module that cannot be rebuilt: unnamed
                return n
        return jax.tree_util.tree_map_with_path(
            child, node, is_leaf=lambda n: n is not node and isinstance(n, eqx.Module))
    return visit(root, (), "")


def _from_equinox(model, batched: bool, state=None):
    eqx = _eqx()
    inference = eqx.nn.inference_mode(model, True)  # a new pytree; the model is unchanged
    right = _right_linear(eqx)

    conv = _bias_conv(eqx)
    convs = tuple(getattr(eqx.nn, n) for n in ("Conv", "Conv1d", "Conv2d", "Conv3d"))

    original: dict = {}

    def swap(node):
        new = node
        if type(node) is eqx.nn.Linear and node.in_features != "scalar" \
                and node.out_features != "scalar":
            new = right(node.weight, node.bias)
        elif type(node) in convs and str(getattr(node, "padding_mode", "ZEROS")) == "ZEROS":
            new = conv(node.weight, node.bias, tuple(node.stride), tuple(node.padding),
                       tuple(node.dilation), node.groups)
        if new is not node:
            original[id(new)] = type(node)
        return new

    inference = jax.tree_util.tree_map(
        swap, inference, is_leaf=lambda n: type(n) is eqx.nn.Linear or type(n) in convs)
    arrays, _ = eqx.partition(inference, eqx.is_array)
    flat, _, names = _flat(arrays)  # named on the unscoped tree: the same leaves, in order
    stacks = _EqxStacks()
    scoped = _scope_equinox(eqx, inference, original, stacks)
    arrays, static = eqx.partition(scoped, eqx.is_array)
    treedef = jax.tree_util.tree_structure(arrays)
    if treedef.num_leaves != len(names):  # pragma: no cover - scoping changed the leaves
        arrays, static = eqx.partition(inference, eqx.is_array)
        treedef, stacks = jax.tree_util.tree_structure(arrays), {}
    # the state's entries (eqx.nn.BatchNorm's running statistics) named by the StateIndex that
    # reads them: bn.ema_state_index.0 (mean), bn.ema_state_index.1 (var)
    entries = []  # (StateIndex, treedef of its value, names of its leaves)
    if state is not None:
        found = jax.tree_util.tree_flatten_with_path(
            model, is_leaf=lambda n: isinstance(n, eqx.nn.StateIndex))[0]
        for path, idx in found:
            if not isinstance(idx, eqx.nn.StateIndex):
                continue
            value = state.get(idx)
            leaves, vdef = jax.tree_util.tree_flatten_with_path(value)
            base = path_name(path)
            keys = []
            for lp, leaf in leaves:
                key = ".".join(x for x in (base, path_name(lp)) if x)
                while key in flat:
                    key += "_"
                flat[key] = leaf
                keys.append(key)
            entries.append((idx, vdef, keys))

    def fn(p, *xs, **kw):
        m = eqx.combine(jax.tree_util.tree_unflatten(treedef, [p[n] for n in names]), static)
        if state is not None:
            # State.set invalidates the State it is called on: set on a copy, so the user's
            # state stays usable
            st = jax.tree_util.tree_map(lambda a: a, state)
            for idx, vdef, keys in entries:
                st = st.set(idx, jax.tree_util.tree_unflatten(vdef, [p[k] for k in keys]))
            model_fn = m

            def m(*a, **k):  # the model's output; the updated state is dropped
                return model_fn(*a, st, **k)[0]
        if not batched:
            return m(*xs, **kw)
        # the trace sees one row ([1, ...]): the model is called on that example, the outputs
        # get the row axis back (the compiled pass maps over the rows)
        out = m(*[a[0] for a in xs], **{k: v[0] for k, v in kw.items()})
        return jax.tree_util.tree_map(lambda o: o[None], out)

    return fn, flat, type(model).__name__, stacks
