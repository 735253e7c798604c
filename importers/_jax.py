"""JAX -> dlbjax IR: trace a pure function ``fn(params, *inputs)`` with ``jax.make_jaxpr`` and
translate its jaxpr into the same :class:`dlbjax.ir.Program` the torch importer builds.

Every lax primitive is mapped onto existing ATen op names with their ATen argument conventions, so
the existing lowerings and relevance rules apply unchanged:

- ``dot_general`` with a constant right operand contracted with the left's trailing dims ->
  ``aten.linear.default`` (the kernel [in, out] stored transposed, [out, in], as torch's Linear; a
  following ``+ bias`` is folded into it); a kernel of more than 2 dims (einsum-style dense,
  multi-head projections) is flattened to [out, in] with views around the linear; between two
  activations -> ``aten.matmul.default``, with batch dimensions (attention's Q K^T and P V) as a
  matmul of [batch.., free, contracted] by [batch.., contracted, free] (permutes/views around);
- ``conv_general_dilated`` (any layout, e.g. flax's NHWC/HWIO) -> permutes to NCHW/OIHW,
  ``aten.convolution.default`` (a following per-channel ``+ bias`` folded in), permute back; with
  ``lhs_dilation`` (``jax.lax.conv_transpose``) a transposed ``aten.convolution.default`` (kernel
  flipped, [in, out, k..]) and slices for asymmetric padding;
- ``reduce_window_max`` / ``reduce_window_sum`` -> ``aten.max_pool{n}d`` (window dilation kept) /
  ``aten.avg_pool{n}d`` (times the window size) between permutes; asymmetric padding as
  ``aten.constant_pad_nd`` with -inf (max) or 0 (sum) first;
- element-wise arithmetic, ``max(x, 0)`` -> ``aten.relu.default``, unary functions, reductions,
  reshapes, transposes, broadcasts and casts as ATen index maps;
- indexing and joining: ``slice`` / ``dynamic_slice`` (constant starts) / ``split`` ->
  ``aten.slice.Tensor`` chains; ``dynamic_update_slice`` (constant starts, one dim) ->
  ``aten.slice_scatter.default``; ``concatenate`` -> ``aten.cat.default``; ``rev`` ->
  ``aten.flip.default``; ``pad`` (non-negative, no interior) -> ``aten.constant_pad_nd.default``;
  ``gather`` as ``x.take(i, axis)``: a constant 2-d table indexed by integer inputs ->
  ``aten.embedding.default`` on the ids themselves (``table[ids]``'s negative-index wrap dropped),
  an activation indexed by constant in-range indices -> ``aten.index_select.default``;
- masks: ``select_n(pred, on_false, on_true)`` -> ``aten.where.self(pred, on_true, on_false)``;
  ``eq/ne/lt/le/gt/ge`` -> ``aten.<cmp>.Scalar`` (scalar constant) or ``.Tensor``; ``and/or/not``
  -> ``aten.logical_*`` (bool) / ``aten.bitwise_*``; ``iota`` and everything else computed from
  constants only is folded;
- layer-level activations: ``jax.nn.relu``/``silu``/``sigmoid``/``relu6`` by their jit or
  custom_jvp name, ``jax.nn.softmax`` and ``jax.nn.gelu`` (both forms) by their written-out
  equations -> ``aten.softmax.int`` / ``aten.gelu.default``;
- norms over the last axis written out (flax ``nnx.LayerNorm``'s ``mean(x^2) - mean(x)^2``, the
  ``mean((x - mean)^2)`` form, ``nnx.RMSNorm``, hand-written ones; with or without scale/bias) ->
  ``aten.layer_norm.default`` / ``aten.rms_norm.default``: a run of equations reading one
  activation and constants, containing ``rsqrt(. + eps)``, whose intermediates are read only
  inside it, checked numerically against the norm with least-squares scale and bias (taken from
  the run's own constants when they match);
- ``pjit`` / ``closed_call`` / ``custom_jvp_call`` / ``custom_vjp_call`` are inlined.

Not mapped (they raise): ``cumsum``, ``sort``, gathers with indices computed from inputs into an
activation or of other shapes (scatter), batch-grouped convolutions.
``jax.nn.dot_product_attention`` is not kept whole as ``aten.scaled_dot_product_attention``: its
jaxpr is written out (no named call to recognise) and imports as batched matmuls, a where on the
mask and a softmax, whose relevance equals torch's SDPA (tests/test_jax_transformers.py).

Values computed from parameters and literals only are folded on the host (eagerly, with the
primitive itself) and enter the program as constants. Parameters are named by their pytree path
(``layers.0.kernel``); each equation's ``Source.module_path`` is its jaxpr name stack. A primitive
without a mapping raises :class:`dlbjax.UnsupportedOperationError` naming every such primitive
with its name stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dlbjax._errors import ExportError, UnsupportedOp, UnsupportedOperationError
from dlbjax.ir import DTYPES, Eqn, Program, Source, Var

from ._names import path_name

__all__ = ["import_jax", "bind_jax_inputs", "keystr_name"]

_UNARY = {
    "exp": "aten.exp.default", "tanh": "aten.tanh.default", "logistic": "aten.sigmoid.default",
    "log": "aten.log.default", "rsqrt": "aten.rsqrt.default", "sqrt": "aten.sqrt.default",
    "erf": "aten.erf.default", "neg": "aten.neg.default", "abs": "aten.abs.default",
    "sin": "aten.sin.default", "cos": "aten.cos.default", "sign": "aten.sign.default",
    "floor": "aten.floor.default", "ceil": "aten.ceil.default",
}
_BINARY = {"add": "aten.add.Tensor", "sub": "aten.sub.Tensor", "mul": "aten.mul.Tensor",
           "div": "aten.div.Tensor", "max": "aten.maximum.default",
           "min": "aten.minimum.default"}
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
# jitted / custom_jvp activations of jax.nn recognised by name as their layer-level ATen op
# (one array in, one out, same shape)
_NAMED = {"relu": "aten.relu.default", "silu": "aten.silu.default", "swish": "aten.silu.default",
          "sigmoid": "aten.sigmoid.default", "relu6": "aten.relu6.default"}
_HINT = ("dlbjax has no mapping of this JAX primitive onto its IR; rewrite that code with "
         "supported operations (dense, conv, pooling, element-wise arithmetic and activations, "
         "reductions, reshapes/transposes/broadcasts), or explain the torch version of the model")


def keystr_name(path) -> str:
    """A pytree key path as a dotted name: ``['layers'][0]['kernel']`` -> ``layers.0.kernel``
    (:func:`importers._names.path_name`, shared with the torch path)."""
    return path_name(path)


def bind_jax_inputs(inputs: Any) -> tuple[list[str], list[np.ndarray], bool]:
    """``(names, arrays, as_kwargs)``: ``x`` for one array, ``input0..`` for a tuple, the keys of
    a dict (passed to ``fn`` as keywords)."""
    if isinstance(inputs, Mapping):
        return [str(k) for k in inputs], [np.asarray(v) for v in inputs.values()], True
    if isinstance(inputs, (tuple, list)):
        return [f"input{i}" for i in range(len(inputs))], [np.asarray(v) for v in inputs], False
    return ["x"], [np.asarray(inputs)], False


def _dtype(d) -> str:
    name = str(np.dtype(d)) if str(d) != "bfloat16" else "bfloat16"
    if name not in DTYPES:
        raise ExportError(f"dtype {d} is not supported by dlbjax")
    return name


class _Folded:
    """A value known at import time (a parameter, a literal, or computed from those)."""

    def __init__(self, value, origin=None):
        self.value = np.asarray(value)
        self.origin = origin


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"


def _is_drop(v) -> bool:
    return type(v).__name__ == "DropVar"


_SOFTMAX = ("reduce_max", "max", "broadcast_in_dim", "stop_gradient", "sub", "exp", "reduce_sum",
            "broadcast_in_dim", "div")


def _match_softmax(eqns, i, counts):
    """``jax.nn.softmax`` as written out in a jaxpr (max-subtracted exp over its sum, one axis):
    ``(input jaxpr var, axis, index of the last equation)`` or None. Every intermediate value
    must be read only inside the pattern."""
    names = [e.primitive.name for e in eqns[i:i + len(_SOFTMAX)]]
    full = list(_SOFTMAX)
    if names[:2] == ["reduce_max", "broadcast_in_dim"]:  # no max(-inf, .) guard
        full.remove("max")
    if names[:len(full)] != full:
        return None
    seq = eqns[i:i + len(full)]
    rmax, rsum, div = seq[0], seq[-3], seq[-1]
    axes = tuple(rmax.params["axes"])
    if len(axes) != 1 or tuple(rsum.params["axes"]) != axes:
        return None
    x = rmax.invars[0]
    sub, exp = seq[-5], seq[-4]
    if sub.invars[0] is not x or exp.invars[0] is not sub.outvars[0] \
            or rsum.invars[0] is not exp.outvars[0] or div.invars[0] is not exp.outvars[0] \
            or div.invars[1] is not seq[-2].outvars[0] or sub.invars[1] is not seq[-6].outvars[0]:
        return None
    expected = {exp.outvars[0]: 2}
    for e in seq[:-1]:
        v = e.outvars[0]
        if counts.get(v, 0) != expected.get(v, 1):
            return None
    return x, int(axes[0]), i + len(full) - 1


# jax.nn.gelu written out in a jaxpr: (primitive[:integer_pow exponent], operands) with "x" the
# input, an int the output of that step, a float a literal of that value (either order for add/mul)
_GELU_TANH = [("integer_pow:3", ["x"]), ("mul", [0.044715, 0]), ("add", ["x", 1]),
              ("mul", [0.7978845608, 2]), ("tanh", [3]), ("add", [1.0, 4]), ("mul", [0.5, 5]),
              ("mul", ["x", 6])]
_GELU_ERF = [("mul", [0.5, "x"]), ("neg", ["x"]), ("mul", [1, 0.7071067812]), ("erfc", [2]),
             ("mul", [0, 3])]
_PATTERNS = ((_GELU_TANH, "aten.gelu.default", {"approximate": "tanh"}),
             (_GELU_ERF + [("copy", [4])], "aten.gelu.default", {"approximate": "none"}),
             (_GELU_ERF, "aten.gelu.default", {"approximate": "none"}))


def _match(eqns, i, counts, pattern):
    """``(input jaxpr var, index of the last equation)`` when ``eqns[i:]`` starts with
    ``pattern`` and its intermediate values are read only inside it, else None."""
    steps = eqns[i:i + len(pattern)]
    if len(steps) < len(pattern):
        return None
    bound: dict = {}

    def check(v, spec, outs):
        if spec == "x":
            if _is_literal(v):
                return False
            bound.setdefault("x", v)
            return bound["x"] is v
        if isinstance(spec, float):
            return _is_literal(v) and np.size(v.val) == 1 and \
                abs(float(v.val) - spec) <= 1e-6 * max(1.0, abs(spec))
        return v is outs[spec]

    outs = []
    for e, (prim, operands) in zip(steps, pattern):
        name, _, exponent = prim.partition(":")
        if e.primitive.name != name or len(e.invars) != len(operands) or len(e.outvars) != 1:
            return None
        if exponent and e.params.get("y") != int(exponent):
            return None
        orders = [list(e.invars)] + ([list(e.invars)[::-1]] if name in ("add", "mul") else [])
        for order in orders:
            saved = dict(bound)
            if all(check(v, spec, outs) for v, spec in zip(order, operands)):
                break
            bound.clear()
            bound.update(saved)
        else:
            return None
        outs.append(e.outvars[0])
    inside: dict = {}
    for e in steps:
        for v in e.invars:
            if not _is_literal(v):
                inside[v] = inside.get(v, 0) + 1
    if any(counts.get(v, 0) != inside.get(v, 0) for v in outs[:-1]):
        return None
    return bound["x"], i + len(pattern) - 1


def _match_wrap(eqns, i, counts):
    """The negative-index wrap ``where(i < 0, i + n, i)`` that ``x[i]`` / ``jnp.take`` put in
    front of a gather (``lt``, ``add``, ``select_n``, the last maybe in a ``jit`` named
    ``_where``): ``(index jaxpr var, index of the last equation)`` or None. Indices valid for an
    embedding are in range, so the wrap is the identity on them."""
    if i + 2 >= len(eqns):
        return None
    lt, add, sel = eqns[i:i + 3]
    if lt.primitive.name != "lt" or add.primitive.name != "add" or _is_literal(lt.invars[0]):
        return None
    x = lt.invars[0]
    if not (_is_literal(lt.invars[1]) and np.size(lt.invars[1].val) == 1
            and int(lt.invars[1].val) == 0 and add.invars[0] is x and _is_literal(add.invars[1])):
        return None
    args = list(sel.invars)
    if sel.primitive.name in ("jit", "pjit") and str(sel.params.get("name")) == "_where":
        inner = sel.params["jaxpr"].jaxpr
        if len(inner.eqns) != 1 or inner.eqns[0].primitive.name != "select_n":
            return None
        env = dict(zip(inner.invars, sel.invars))
        args = [env.get(v, v) for v in inner.eqns[0].invars]
        if inner.outvars[0] is not inner.eqns[0].outvars[0]:
            return None
    elif sel.primitive.name != "select_n":
        return None
    if args != [lt.outvars[0], x, add.outvars[0]] or counts.get(lt.outvars[0], 0) != 1 \
            or counts.get(add.outvars[0], 0) != 1:
        return None
    return x, i + 2


class _Translator:
    def __init__(self):
        self.inputs: list[Var] = []
        self.constants: list[Var] = []
        self.const_values: dict[str, np.ndarray] = {}
        self.const_kinds: dict[str, str] = {}
        self.eqns: list[Eqn] = []
        self.problems: list[UnsupportedOp] = []
        self.counter = 0
        self.const_cache: dict[int, tuple] = {}  # id -> (the _Folded kept alive, its Var)
        self.relaid_cache: dict = {}  # (id(value), layout) -> (value kept alive, relaid value)
        # the last affine equation emitted, so that a following "+ bias" folds into it
        self.pending = None
        self.view_of: dict = {}  # a reshaped value -> the value it was reshaped from

    # ---- helpers --------------------------------------------------------------------------------
    def fresh(self, shape, dtype) -> Var:
        self.counter += 1
        return Var(f"v{self.counter}", tuple(int(d) for d in shape), _dtype(dtype))

    def emit(self, op, args, kwargs, shape, dtype, stack, out=None) -> Var:
        out = out if out is not None else self.fresh(shape, dtype)
        self.eqns.append(Eqn(op, tuple(args), dict(kwargs), (out,),
                             Source(module_path=stack, module_type="")))
        self.pending = None
        return out

    def constant(self, folded: _Folded, name: str | None = None) -> Var:
        key = id(folded)
        if key in self.const_cache:  # the cache holds ``folded`` itself: its id is not reused
            return self.const_cache[key][1]
        value = np.ascontiguousarray(folded.value)
        base = name or folded.origin or "const"
        nm, i = base, 0
        while nm in self.const_values:
            i += 1
            nm = f"{base}_{i}"
        var = Var(nm, tuple(value.shape), _dtype(value.dtype))
        self.constants.append(var)
        self.const_values[nm] = value
        self.const_kinds[nm] = "parameter" if folded.origin else "constant"
        self.const_cache[key] = (folded, var)
        return var

    def relaid(self, folded: _Folded, tag, fn) -> Var:
        """``folded`` in the layout an IR op reads (a dense kernel [in, out] as [out, in], a conv
        kernel as OIHW), one constant per (value, layout): a tied weight stays one constant."""
        key = (id(folded), tag)
        if key not in self.relaid_cache:
            self.relaid_cache[key] = (folded, _Folded(np.ascontiguousarray(fn(folded.value)),
                                                      folded.origin))
        return self.constant(self.relaid_cache[key][1])

    def as_var(self, x) -> Var:
        return self.constant(x) if isinstance(x, _Folded) else x

    def permute(self, x: Var, perm, stack) -> Var:
        perm = [int(p) for p in perm]
        if perm == list(range(len(perm))):
            return x
        shape = [x.shape[p] for p in perm]
        return self.emit("aten.permute.default", (x, perm), {}, shape, x.dtype, stack)

    # ---- the walk -------------------------------------------------------------------------------
    def run(self, jaxpr, consts, args, stack: str, uses=None):
        env: dict = {}

        def read(v):
            if _is_literal(v):
                return _Folded(v.val)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c if isinstance(c, (_Folded, Var)) else _Folded(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        counts: dict = {}
        for e in jaxpr.eqns:
            for v in e.invars:
                if not _is_literal(v):
                    counts[v] = counts.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not _is_literal(v):
                counts[v] = counts.get(v, 0) + 1
        eqns, i = list(jaxpr.eqns), 0
        while i < len(eqns):
            e = eqns[i]
            inner = str(e.source_info.name_stack)
            where = "/".join(s for s in (stack, inner) if s)
            norm = self.match_norm(eqns, i, counts, env)
            if norm is not None:
                end, op, args = norm
                x = args[0]
                env[eqns[end].outvars[0]] = self.emit(op, args, {}, x.shape, x.dtype, where)
                i = end + 1
                continue
            wrap = _match_wrap(eqns, i, counts)
            if wrap is not None and isinstance(env.get(wrap[0]), Var):
                env[eqns[wrap[1]].outvars[0]] = env[wrap[0]]
                i = wrap[1] + 1
                continue
            soft = _match_softmax(eqns, i, counts)
            if soft is not None and isinstance(env.get(soft[0]), Var):
                x_var, axis, end = soft
                x = env[x_var]
                last = eqns[end]
                env[last.outvars[0]] = self.emit("aten.softmax.int", (x, axis), {}, x.shape,
                                                 x.dtype, where)
                i = end + 1
                continue
            hit = None
            for pattern, op, kwargs in _PATTERNS:
                m = _match(eqns, i, counts, pattern)
                if m is not None and isinstance(env.get(m[0]), Var):
                    hit = m, op, kwargs
                    break
            if hit is not None:
                (x_var, end), op, kwargs = hit
                x = env[x_var]
                env[eqns[end].outvars[0]] = self.emit(op, (x,), kwargs, x.shape, x.dtype, where)
                i = end + 1
                continue
            i += 1
            ins = [read(v) for v in e.invars]
            outs = self.equation(e, ins, where, counts)
            for v, o in zip(e.outvars, outs):
                if not _is_drop(v):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def equation(self, e, ins, where, counts):
        prim = e.primitive.name
        params = e.params
        if prim in _INLINE:
            closed = params.get(_INLINE[prim])
            if closed is None:
                return self.unsupported(e, where, f"'{prim}' without an inner jaxpr")
            named = _NAMED.get(str(params.get("name")))
            if named and len(ins) == 1 and isinstance(ins[0], Var) and len(e.outvars) == 1 \
                    and tuple(e.outvars[0].aval.shape) == tuple(ins[0].shape):
                out = e.outvars[0].aval
                return [self.emit(named, (ins[0],), {}, out.shape, out.dtype, where)]
            inner_stack = where  # the inner equations' name stacks are relative to it
            jaxpr = getattr(closed, "jaxpr", closed)
            consts = getattr(closed, "consts", ())
            n = len(jaxpr.invars)
            return self.run(jaxpr, consts, ins[len(ins) - n:], inner_stack)
        if all(isinstance(a, _Folded) for a in ins):
            return self.fold(e, ins, where)
        handler = getattr(self, f"p_{prim}", None)
        if handler is None:
            return self.unsupported(e, where, _HINT)
        out = e.outvars[0].aval
        return handler(e, ins, params, out, where, counts)

    def fold(self, e, ins, where):
        try:
            vals = e.primitive.bind(*[jax.numpy.asarray(a.value) for a in ins], **e.params)
        except Exception as exc:  # noqa: BLE001
            return self.unsupported(e, where, f"could not be evaluated on constants ({exc})")
        vals = vals if e.primitive.multiple_results else [vals]
        origins = {a.origin for a in ins if a.origin}
        origin = origins.pop() if len(origins) == 1 else None
        return [_Folded(np.asarray(v), origin) for v in vals]

    def unsupported(self, e, where, hint):
        self.problems.append(UnsupportedOp(f"jax primitive '{e.primitive.name}'", where,
                                           "jax", hint))
        return [self.fresh(v.aval.shape, v.aval.dtype) if hasattr(v.aval, "shape") else None
                for v in e.outvars]

    # ---- norms written out ---------------------------------------------------------------------
    _NORM_START = ("square", "integer_pow", "reduce_sum", "mul")

    def match_norm(self, eqns, i, counts, env, max_len=28):
        """A LayerNorm / RMSNorm over the last axis written out in the jaxpr (flax's
        ``mean(x^2) - mean(x)^2`` or ``mean((x - mean)^2)`` forms, a hand-written one, with or
        without scale and bias): ``(index of the last equation, op, args)`` or None.

        The run ``eqns[i:j+1]`` must read one activation ``x`` and otherwise only constants and
        its own values, contain ``rsqrt(. + eps)`` and a reduce_sum, and have one value read
        outside it (its last, of x's shape). It is then evaluated on random inputs and compared
        with ``w * norm(x) + b``; scale and bias are identified by least squares and taken from
        the run's own constants when they match one (else None / a new constant)."""
        e0 = eqns[i]
        if e0.primitive.name not in self._NORM_START:
            return None
        acts = [v for v in e0.invars if not _is_literal(v) and isinstance(env.get(v), Var)]
        if len(set(map(id, acts))) != 1:
            return None
        xv = acts[0]
        x = env[xv]
        p0 = e0.primitive.name
        if (p0 == "integer_pow" and e0.params.get("y") != 2) or (p0 == "mul" and (
                len(e0.invars) != 2 or e0.invars[1] is not xv or e0.invars[0] is not xv)) or (
                p0 == "reduce_sum" and tuple(e0.params["axes"]) != (len(x.shape) - 1,)):
            return None
        if x.dtype not in ("float32", "float64") or not x.shape or x.shape[-1] < 2:
            return None
        names = [e.primitive.name for e in eqns[i:i + max_len]]
        if "rsqrt" not in names:
            return None
        defined, inside, consts, candidates = set(), {}, {}, []
        for j in range(i, min(i + max_len, len(eqns))):
            e = eqns[j]
            closed = len(e.outvars) == 1
            for v in e.invars:
                if _is_literal(v) or v is xv or v in defined:
                    pass
                elif isinstance(env.get(v), _Folded):
                    consts[v] = env[v]
                else:
                    closed = False
                    break
                if not _is_literal(v):
                    inside[v] = inside.get(v, 0) + 1
            if not closed:
                break
            defined.add(e.outvars[0])
            out = e.outvars[0]
            if tuple(getattr(out.aval, "shape", ())) != tuple(x.shape) or "rsqrt" not in names[:j - i + 1]:
                continue
            live = [v for v in defined if counts.get(v, 0) != inside.get(v, 0)]
            if live != [out]:
                continue
            candidates.append((j, dict(consts)))
        for j, cs in reversed(candidates):  # the longest run that is a norm
            m = self._fit_norm(eqns[i:j + 1], xv, x, cs, j)
            if m is not None:
                return m
        return None

    def _fit_norm(self, run, xv, x, consts, end):
        eps = None
        for k, e in enumerate(run):
            if e.primitive.name == "add" and any(_is_literal(v) for v in e.invars) and \
                    any(r.primitive.name == "rsqrt" and r.invars[0] is e.outvars[0] for r in run):
                eps = float(next(v for v in e.invars if _is_literal(v)).val)
        if eps is None or not any(e.primitive.name == "reduce_sum" for e in run):
            return None
        rng = np.random.default_rng(0)
        zs = [rng.normal(size=x.shape).astype(x.dtype) * 2.0 + 0.5 for _ in range(3)]

        def evaluate(z):
            local = {xv: jax.numpy.asarray(z)}
            for v, c in consts.items():
                local[v] = jax.numpy.asarray(c.value)
            for e in run:
                vals = [v.val if _is_literal(v) else local[v] for v in e.invars]
                r = e.primitive.bind(*vals, **e.params)
                local[e.outvars[0]] = r[0] if e.primitive.multiple_results else r
            return np.asarray(local[run[-1].outvars[0]], np.float64)

        try:
            ys = np.concatenate([evaluate(z).reshape(-1, x.shape[-1]) for z in zs])
        except Exception:  # noqa: BLE001
            return None
        zf = np.concatenate([z.reshape(-1, x.shape[-1]).astype(np.float64) for z in zs])
        D = x.shape[-1]
        for op in ("aten.layer_norm.default", "aten.rms_norm.default"):
            if op == "aten.layer_norm.default":
                c = zf - zf.mean(-1, keepdims=True)
                n = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps)
            else:
                n = zf / np.sqrt((zf ** 2).mean(-1, keepdims=True) + eps)
            nm, ym = n.mean(0), ys.mean(0)
            var = ((n - nm) ** 2).sum(0)
            if np.any(var <= 1e-9):
                return None
            w = ((n - nm) * (ys - ym)).sum(0) / var
            b = ym - w * nm
            scale = max(1.0, np.abs(ys).max())
            if np.abs(w * n + b - ys).max() > 1e-4 * scale:
                continue
            if op == "aten.rms_norm.default" and np.abs(b).max() > 1e-5 * scale:
                return None
            weight = self._snap(w, consts, D, 1.0)
            bias = self._snap(b, consts, D, 0.0)
            if op == "aten.layer_norm.default":
                return end, op, (x, [D], weight, bias, eps, False)
            return end, op, (x, [D], weight, eps)
        return None

    def _snap(self, fitted, consts, D, neutral):
        """The constant of the run equal to ``fitted`` (broadcast to [D]), None when it is the
        neutral value everywhere, else a new constant."""
        tol = 1e-4 * max(1.0, np.abs(fitted).max())
        for c in consts.values():
            if c.value.size in (1, D) and c.value.dtype.kind == "f":
                vec = np.broadcast_to(c.value.reshape(-1), (D,))
                if np.abs(vec - fitted).max() <= tol:
                    if c.value.size == D:
                        return self.relaid(c, "vector", lambda v: v.reshape(D))
        if np.abs(fitted - neutral).max() <= tol:
            return None
        return self.constant(_Folded(fitted.astype(np.float32)))

    # ---- primitives -----------------------------------------------------------------------------
    def _binary(self, e, ins, params, out, where, counts):
        prim = e.primitive.name
        a, b = ins
        if prim == "max":
            for x, y in ((a, b), (b, a)):
                if isinstance(y, _Folded) and y.value.size == 1 and float(y.value) == 0.0 \
                        and isinstance(x, Var) and tuple(x.shape) == tuple(out.shape):
                    return [self.emit("aten.relu.default", (x,), {}, out.shape, out.dtype, where)]
        if prim == "add" and self.pending is not None:
            folded = self.fold_bias(e, a, b, out)
            if folded is not None:
                return [folded]
        args = []
        for x in (a, b):
            if isinstance(x, _Folded) and x.value.ndim == 0:
                args.append(x.value.item())
            else:
                args.append(self.as_var(x))
        if prim in ("max", "min") and not all(isinstance(x, Var) for x in args):
            args = [self.as_var(x) if isinstance(x, _Folded) else x for x in (a, b)]
        op = _BINARY[prim]
        if not isinstance(args[0], Var):  # scalar on the left: ATen wants the tensor first
            if prim in ("add", "mul"):
                args = args[::-1]
            elif prim == "sub":
                op, args = "aten.rsub.Scalar", args[::-1]
            else:
                args[0] = self.as_var(a)
        return [self.emit(op, args, {}, out.shape, out.dtype, where)]

    p_add = p_sub = p_mul = p_div = p_max = p_min = _binary

    def fold_bias(self, e, a, b, out):
        """``affine(x) + b`` with b constant along the affine output's channel axis: the bias
        becomes the affine equation's own bias (as torch's Linear/Conv keep it), when the add is
        the affine output's only use (in the same jaxpr)."""
        kind, idx, result, axis, (jvar, counts) = self.pending
        if jvar not in e.invars or counts.get(jvar, 0) != 1:
            return None
        if isinstance(a, _Folded):
            a, b = b, a
        if a is not result or not isinstance(b, _Folded) or tuple(out.shape) != tuple(result.shape):
            return None
        if b.origin is None:
            # only a parameter (or a value computed from one parameter) is a layer's bias: a
            # constant computed from several (e.g. a recurrent term W_hh h_0 + b_hh with h_0 = 0)
            # or a literal stays its own addition (spec §10 R1 keeps b_hh in the recurrent part)
            return None
        value = b.value
        if value.ndim > len(result.shape):
            return None
        value = value.reshape((1,) * (len(result.shape) - value.ndim) + value.shape)
        ax = axis % len(result.shape)
        if any(s != 1 for i, s in enumerate(value.shape) if i != ax):
            return None
        n = result.shape[ax]
        # one constant per (value, length): the same bias added at every step of an unrolled
        # loop stays one constant
        bias = self.relaid(b, ("bias", n), lambda v: np.broadcast_to(
            np.asarray(v).reshape(-1), (n,)).astype(v.dtype))
        eq = self.eqns[idx]
        args = list(eq.args)
        args[2] = bias
        self.eqns[idx] = Eqn(eq.op, tuple(args), eq.kwargs, eq.outputs, eq.source)
        self.pending = None
        return result

    def _unary(self, e, ins, params, out, where, counts):
        return [self.emit(_UNARY[e.primitive.name], (self.as_var(ins[0]),), {}, out.shape,
                          out.dtype, where)]

    def p_integer_pow(self, e, ins, params, out, where, counts):
        return [self.emit("aten.pow.Tensor_Scalar", (ins[0], int(params["y"])), {}, out.shape,
                          out.dtype, where)]

    def p_square(self, e, ins, params, out, where, counts):
        return [self.emit("aten.pow.Tensor_Scalar", (ins[0], 2), {}, out.shape, out.dtype, where)]

    def p_reshape(self, e, ins, params, out, where, counts):
        if params.get("dimensions") not in (None, ()):
            return self.unsupported(e, where, "reshape with a dimensions permutation")
        x = self.as_var(ins[0])
        if tuple(x.shape) == tuple(out.shape):
            return [x]
        y = self.emit("aten.view.default", (x, list(out.shape)), {}, out.shape, out.dtype, where)
        self.view_of[y] = x
        return [y]

    def p_transpose(self, e, ins, params, out, where, counts):
        return [self.permute(self.as_var(ins[0]), params["permutation"], where)]

    def p_squeeze(self, e, ins, params, out, where, counts):
        x = self.as_var(ins[0])
        return [self.emit("aten.view.default", (x, list(out.shape)), {}, out.shape, out.dtype,
                          where)]

    def p_broadcast_in_dim(self, e, ins, params, out, where, counts):
        x = self.as_var(ins[0])
        shape, dims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
        inter = [1] * len(shape)
        for d, s in zip(dims, x.shape):
            inter[d] = s
        if tuple(inter) != tuple(x.shape):
            src, x = x, self.emit("aten.view.default", (x, inter), {}, inter, x.dtype, where)
            self.view_of[x] = src
        if tuple(inter) == shape:
            return [x]
        return [self.emit("aten.expand.default", (x, list(shape)), {}, shape, x.dtype, where)]

    def p_convert_element_type(self, e, ins, params, out, where, counts):
        x = self.as_var(ins[0])
        if _dtype(out.dtype) == x.dtype:
            return [x]
        return [self.emit("aten._to_copy.default", (x,), {"dtype": _dtype(out.dtype)}, out.shape,
                          out.dtype, where)]

    def p_copy(self, e, ins, params, out, where, counts):
        return [self.as_var(ins[0])]

    p_copy_p = p_copy

    def p_reduce_sum(self, e, ins, params, out, where, counts):
        return [self.emit("aten.sum.dim_IntList", (self.as_var(ins[0]), list(params["axes"]), False),
                          {}, out.shape, out.dtype, where)]

    def p_reduce_max(self, e, ins, params, out, where, counts):
        return [self.emit("aten.amax.default", (self.as_var(ins[0]), list(params["axes"]), False),
                          {}, out.shape, out.dtype, where)]

    def p_dot_general(self, e, ins, params, out, where, counts):
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
        a, b = ins
        if not lb and isinstance(b, _Folded) and isinstance(a, Var) and len(lc) >= 1:
            # a dense layer (an einsum-style kernel of any rank): contract a's dims lc (moved last)
            # with the kernel's dims rc; the kernel becomes [out, in] of a linear on a flattened a
            a = self.permute(a, [d for d in range(len(a.shape)) if d not in lc] + list(lc), where)
            rest = [d for d in range(b.value.ndim) if d not in rc]
            n_in = int(np.prod([b.value.shape[d] for d in rc]))
            n_out = int(np.prod([b.value.shape[d] for d in rest]))
            weight = self.relaid(b, ("linear", rc), lambda v: np.transpose(v, list(rc) + rest)
                                 .reshape(n_in, n_out).T)
            lead = list(a.shape[:len(a.shape) - len(lc)])
            if len(lc) != 1:
                a = self.emit("aten.view.default", (a, lead + [n_in]), {}, lead + [n_in], a.dtype,
                              where)
            y = self.emit("aten.linear.default", (a, weight, None), {}, lead + [n_out], out.dtype,
                          where)
            if len(rest) == 1:
                self.pending = ("linear", len(self.eqns) - 1, y, -1, (e.outvars[0], counts))
                return [y]
            return [self.emit("aten.view.default", (y, list(out.shape)), {}, out.shape, out.dtype,
                              where)]
        a, b = self.as_var(a), self.as_var(b)
        lf = [d for d in range(len(a.shape)) if d not in lc and d not in lb]
        rf = [d for d in range(len(b.shape)) if d not in rc and d not in rb]
        if not lb and len(lc) == 1 and len(rc) == 1 and len(a.shape) <= 2 and len(b.shape) <= 2:
            a = self.permute(a, lf + list(lc), where)
            b = self.permute(b, list(rc) + rf, where)
            return [self.emit("aten.matmul.default", (a, b), {}, out.shape, out.dtype, where)]
        # batched (attention's Q K^T, P V): [batch, lhs free, contracted] @ [batch, contracted,
        # rhs free] with the free and contracted dims each flattened to one, as torch's matmul
        bshape = [a.shape[d] for d in lb]
        m = int(np.prod([a.shape[d] for d in lf]))
        k = int(np.prod([a.shape[d] for d in lc]))
        n = int(np.prod([b.shape[d] for d in rf]))
        a = self.permute(a, list(lb) + lf + list(lc), where)
        b = self.permute(b, list(rb) + list(rc) + rf, where)
        if len(lf) != 1 or len(lc) != 1:
            a = self.emit("aten.view.default", (a, bshape + [m, k]), {}, bshape + [m, k], a.dtype,
                          where)
        if len(rf) != 1 or len(rc) != 1:
            b = self.emit("aten.view.default", (b, bshape + [k, n]), {}, bshape + [k, n], b.dtype,
                          where)
        y = self.emit("aten.matmul.default", (a, b), {}, bshape + [m, n], out.dtype, where)
        if tuple(y.shape) != tuple(out.shape):
            y = self.emit("aten.view.default", (y, list(out.shape)), {}, out.shape, out.dtype, where)
        return [y]

    def p_conv_general_dilated(self, e, ins, params, out, where, counts):
        x, w = ins
        if not isinstance(w, _Folded) or not isinstance(x, Var):
            return self.unsupported(e, where, "a convolution whose kernel is not a constant")
        dn = params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        nd = len(lhs_spec) - 2
        if params.get("batch_group_count", 1) != 1:
            return self.unsupported(e, where, "a batch-grouped conv")
        pads = [tuple(p) for p in params["padding"]]
        xin = self.permute(x, lhs_spec, where)
        if any(d != 1 for d in params["lhs_dilation"]):
            return self.transposed_conv(e, xin, w, params, out, where, counts)
        if any(lo != hi for lo, hi in pads):
            widths = []
            for lo, hi in reversed(pads):
                widths += [int(lo), int(hi)]
            shape = list(xin.shape[:2]) + [s + lo + hi for s, (lo, hi) in zip(xin.shape[2:], pads)]
            xin = self.emit("aten.constant_pad_nd.default", (xin, widths, 0.0), {}, shape, xin.dtype,
                            where)
            pads = [(0, 0)] * nd
        weight = self.relaid(w, ("conv", tuple(rhs_spec)),
                             lambda v: np.transpose(v, rhs_spec))  # OI + spatial
        nchw = [out.shape[out_spec[0]], out.shape[out_spec[1]]] + [out.shape[d] for d in out_spec[2:]]
        y = self.emit("aten.convolution.default",
                      (xin, weight, None, [int(s) for s in params["window_strides"]],
                       [int(lo) for lo, _ in pads], [int(d) for d in params["rhs_dilation"]],
                       False, [0] * nd, int(params["feature_group_count"])),
                      {}, nchw, out.dtype, where)
        conv_idx = len(self.eqns) - 1
        inverse = [0] * len(out_spec)
        for i, d in enumerate(out_spec):
            inverse[d] = i
        res = self.permute(y, inverse, where)
        self.pending = ("conv", conv_idx, res, out_spec[1], (e.outvars[0], counts))
        return [res]

    def transposed_conv(self, e, xin, w, params, out, where, counts):
        """``conv_general_dilated`` with ``lhs_dilation`` s (``jax.lax.conv_transpose``) as
        torch's transposed convolution: stride s, the kernel flipped and stored [in, out, k..],
        padding d(k-1) - lo and output padding hi - lo."""
        dn = params["dimension_numbers"]
        rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
        nd = len(rhs_spec) - 2
        strides = [int(s) for s in params["lhs_dilation"]]
        dil = [int(d) for d in params["rhs_dilation"]]
        ks = [w.value.shape[d] for d in rhs_spec[2:]]
        pads = [tuple(int(v) for v in p) for p in params["padding"]]
        crop = [(d * (k - 1) - lo, d * (k - 1) - hi) for d, k, (lo, hi) in zip(dil, ks, pads)]
        if params["feature_group_count"] != 1 or any(s != 1 for s in params["window_strides"]) \
                or any(c < 0 for c in sum(crop, ())):
            return self.unsupported(e, where, f"a transposed conv with padding {pads}")
        tpad = [min(c) for c in crop]  # torch's symmetric padding, the rest sliced off
        flip = tuple(range(2, 2 + nd))
        weight = self.relaid(w, ("conv_t", tuple(rhs_spec)), lambda v: np.ascontiguousarray(
            np.flip(np.transpose(v, rhs_spec), flip).swapaxes(0, 1)))  # [in, out, k..]
        nchw = [out.shape[out_spec[0]], out.shape[out_spec[1]]] + [out.shape[d] for d in out_spec[2:]]
        full = list(nchw[:2]) + [n + lo - p + hi - p for n, (lo, hi), p in
                                 zip(nchw[2:], crop, tpad)]
        y = self.emit("aten.convolution.default",
                      (xin, weight, None, strides, tpad, dil, True, [0] * nd, 1), {}, full,
                      out.dtype, where)
        conv_idx = len(self.eqns) - 1
        starts = [0, 0] + [lo - p for (lo, _), p in zip(crop, tpad)]
        y = self.slices(y, starts, [a + n for a, n in zip(starts, nchw)], [1] * len(nchw), where)
        if y is not self.eqns[conv_idx].outputs[0]:
            conv_idx = None
        conv_idx = len(self.eqns) - 1
        inverse = [0] * len(out_spec)
        for i, d in enumerate(out_spec):
            inverse[d] = i
        res = self.permute(y, inverse, where)
        if conv_idx is not None:
            self.pending = ("conv", conv_idx, res, out_spec[1], (e.outvars[0], counts))
        return [res]

    def _pool(self, e, ins, params, out, where, counts):
        x = ins[0]
        if not isinstance(x, Var) or not all(isinstance(a, _Folded) for a in ins[1:]):
            return self.unsupported(e, where, "a pooling window over constants")
        win, strides = tuple(params["window_dimensions"]), tuple(params["window_strides"])
        pads = [tuple(p) for p in params["padding"]]
        wdil = tuple(int(d) for d in params.get("window_dilation", ())) or (1,) * len(win)
        is_max = e.primitive.name == "reduce_window_max"
        if any(d != 1 for d in tuple(params.get("base_dilation", ()))) or \
                (not is_max and any(d != 1 for d in wdil)):
            return self.unsupported(e, where, "base-dilated pooling, or a dilated sum window")
        spatial = [i for i, k in enumerate(win) if k != 1 or strides[i] != 1 or pads[i] != (0, 0)]
        if not spatial or len(spatial) > 3 or any(lo < 0 or hi < 0 for lo, hi in pads):
            return self.unsupported(e, where, f"pooling window {win} with padding {pads}")
        rest = [i for i in range(len(win)) if i not in spatial]
        perm = rest + spatial
        xp = self.permute(x, perm, where)
        nd = len(spatial)
        k = [int(win[i]) for i in spatial]
        s = [int(strides[i]) for i in spatial]
        p = [int(pads[i][0]) for i in spatial]
        if any(lo != hi for lo, hi in pads):  # asymmetric: pad with the reduction's identity
            widths = []
            for i in reversed(spatial):
                widths += [int(pads[i][0]), int(pads[i][1])]
            shape = list(xp.shape[:len(rest)]) + [x.shape[i] + sum(pads[i]) for i in spatial]
            xp = self.emit("aten.constant_pad_nd.default",
                           (xp, widths, float("-inf") if is_max else 0.0), {}, shape, xp.dtype,
                           where)
            p = [0] * nd
        pshape = [out.shape[i] for i in perm]
        if is_max:
            y = self.emit(f"aten.max_pool{nd}d.default",
                          (xp, k, s, p, [int(wdil[i]) for i in spatial], False), {}, pshape,
                          out.dtype, where)
        else:
            y = self.emit(f"aten.avg_pool{nd}d.default", (xp, k, s, p, False, True), {}, pshape,
                          out.dtype, where)
            y = self.emit("aten.mul.Tensor", (y, float(np.prod(k))), {}, pshape, out.dtype, where)
        inverse = [0] * len(perm)
        for i, d in enumerate(perm):
            inverse[d] = i
        return [self.permute(y, inverse, where)]

    p_reduce_window_max = p_reduce_window_sum = _pool


    # ---- indexing, joining, masks (issue 12) ----------------------------------------------------
    def slices(self, x: Var, starts, limits, steps, where) -> Var:
        """``x[start:limit:step]`` per dim as a chain of ``aten.slice.Tensor`` (unchanged dims
        skipped)."""
        for d, (lo, hi, st) in enumerate(zip(starts, limits, steps)):
            lo, hi, st = int(lo), int(hi), int(st)
            if (lo, hi, st) == (0, x.shape[d], 1):
                continue
            shape = list(x.shape)
            shape[d] = len(range(lo, hi, st))
            x = self.emit("aten.slice.Tensor", (x, d, lo, hi, st), {}, shape, x.dtype, where)
        return x

    def p_slice(self, e, ins, params, out, where, counts):
        x = self.as_var(ins[0])
        steps = params.get("strides") or (1,) * len(x.shape)
        return [self.slices(x, params["start_indices"], params["limit_indices"], steps, where)]

    def _starts(self, idx, shape, sizes):
        if not all(isinstance(i, _Folded) and i.value.size == 1 for i in idx):
            return None
        return [min(max(int(i.value), 0), int(n) - int(k)) for i, n, k in zip(idx, shape, sizes)]

    def p_dynamic_slice(self, e, ins, params, out, where, counts):
        x = self.as_var(ins[0])
        sizes = params["slice_sizes"]
        starts = self._starts(ins[1:], x.shape, sizes)
        if starts is None:
            return self.unsupported(e, where, "dynamic_slice with indices computed from inputs")
        return [self.slices(x, starts, [s + k for s, k in zip(starts, sizes)], [1] * len(sizes),
                            where)]

    def p_dynamic_update_slice(self, e, ins, params, out, where, counts):
        x, upd = self.as_var(ins[0]), self.as_var(ins[1])
        starts = self._starts(ins[2:], x.shape, upd.shape)
        differ = [d for d in range(len(x.shape)) if upd.shape[d] != x.shape[d]]
        if starts is None or len(differ) > 1:
            return self.unsupported(e, where, "dynamic_update_slice with indices computed from "
                                              "inputs or an update smaller in several dims")
        if not differ:
            return [upd]
        d = differ[0]
        return [self.emit("aten.slice_scatter.default",
                          (x, upd, d, starts[d], starts[d] + upd.shape[d], 1), {}, out.shape,
                          out.dtype, where)]

    def p_concatenate(self, e, ins, params, out, where, counts):
        return [self.emit("aten.cat.default", ([self.as_var(a) for a in ins],
                                               int(params["dimension"])), {}, out.shape, out.dtype,
                          where)]

    def p_split(self, e, ins, params, out, where, counts):
        x, axis = self.as_var(ins[0]), int(params["axis"])
        res, start = [], 0
        for n in params["sizes"]:
            lo, hi = [0] * len(x.shape), list(x.shape)
            lo[axis], hi[axis] = start, start + int(n)
            res.append(self.slices(x, lo, hi, [1] * len(x.shape), where))
            start += int(n)
        return res

    def p_rev(self, e, ins, params, out, where, counts):
        return [self.emit("aten.flip.default", (self.as_var(ins[0]), [int(d) for d in
                                                                       params["dimensions"]]),
                          {}, out.shape, out.dtype, where)]

    def p_pad(self, e, ins, params, out, where, counts):
        x, value = self.as_var(ins[0]), ins[1]
        cfg = [tuple(int(c) for c in p) for p in params["padding_config"]]
        if not isinstance(value, _Folded) or any(lo < 0 or hi < 0 or it != 0 for lo, hi, it in cfg):
            return self.unsupported(e, where, "pad with negative or interior padding, or a "
                                              "padding value computed from inputs")
        widths = []
        for lo, hi, _ in reversed(cfg):
            widths += [lo, hi]
        return [self.emit("aten.constant_pad_nd.default", (x, widths, float(value.value)), {},
                          out.shape, out.dtype, where)]

    def p_select_n(self, e, ins, params, out, where, counts):
        if len(ins) != 3:
            return self.unsupported(e, where, "select_n with more than two cases")
        pred, on_false, on_true = ins  # select_n(pred, *cases): case[pred]
        if _dtype(getattr(pred, "dtype", None) if isinstance(pred, Var) else pred.value.dtype) \
                != "bool":
            return self.unsupported(e, where, "select_n on an integer selector")
        return [self.emit("aten.where.self", (self.as_var(pred), self.as_var(on_true),
                                              self.as_var(on_false)), {}, out.shape, out.dtype,
                          where)]

    def _compare(self, e, ins, params, out, where, counts):
        a, b = ins
        name = e.primitive.name
        if isinstance(a, _Folded):  # constant on the left: flip the comparison
            a, b = b, a
            name = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le"}.get(name, name)
        if isinstance(b, _Folded) and b.value.ndim == 0:
            return [self.emit(f"aten.{name}.Scalar", (a, b.value.item()), {}, out.shape,
                              out.dtype, where)]
        return [self.emit(f"aten.{name}.Tensor", (a, self.as_var(b)), {}, out.shape, out.dtype,
                          where)]

    p_eq = p_ne = p_lt = p_le = p_gt = p_ge = _compare

    def _logical(self, e, ins, params, out, where, counts):
        name = e.primitive.name
        kind = "logical" if _dtype(out.dtype) == "bool" else "bitwise"
        if name == "not":
            return [self.emit(f"aten.{kind}_not.default", (self.as_var(ins[0]),), {}, out.shape,
                              out.dtype, where)]
        return [self.emit(f"aten.{kind}_{name}.Tensor", tuple(self.as_var(a) for a in ins), {},
                          out.shape, out.dtype, where)]

    p_and = p_or = p_not = _logical

    def p_gather(self, e, ins, params, out, where, counts):
        operand, idx = ins
        dn = params["dimension_numbers"]
        sizes = tuple(int(s) for s in params["slice_sizes"])
        if getattr(dn, "operand_batching_dims", ()) or len(dn.start_index_map) != 1 \
                or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map):
            return self.unsupported(e, where, f"gather with dimension numbers {dn}")
        axis = int(dn.start_index_map[0])
        oshape = operand.value.shape if isinstance(operand, _Folded) else operand.shape
        idx_shape = idx.value.shape if isinstance(idx, _Folded) else idx.shape
        full = all(s == (1 if d == axis else n) for d, (s, n) in enumerate(zip(sizes, oshape)))
        batch = tuple(idx_shape[:-1])
        # the layout of x.take(i, axis): operand dims before axis, the index dims, dims after
        expect = tuple(range(axis)) + tuple(range(axis + len(batch), len(oshape) - 1 + len(batch)))
        if not full or idx_shape[-1:] != (1,) or tuple(dn.offset_dims) != expect:
            return self.unsupported(e, where, f"gather with dimension numbers {dn}")
        if isinstance(operand, _Folded) and isinstance(idx, Var):
            if axis != 0 or len(oshape) != 2:
                return self.unsupported(e, where, "a lookup into a constant that is not a 2-d "
                                                  "table indexed along its rows")
            src = self.view_of.get(idx)
            if src is not None and tuple(src.shape) == batch:
                if self.eqns and self.eqns[-1].outputs[0] is idx \
                        and counts.get(e.invars[1], 0) == 1:
                    self.eqns.pop()  # the index's own reshape, now unused
                ids = src
            else:
                ids = self.emit("aten.view.default", (idx, list(batch)), {}, batch, idx.dtype,
                                where)
            table = self.constant(operand)
            return [self.emit("aten.embedding.default", (table, ids), {}, out.shape, out.dtype,
                              where)]
        if isinstance(operand, Var) and isinstance(idx, _Folded):
            values = idx.value.reshape(batch).astype(np.int64)
            if np.any(values < 0) or np.any(values >= oshape[axis]):
                return self.unsupported(e, where, "gather with out-of-range constant indices")
            flat = self.constant(_Folded(values.reshape(-1)))
            mid = list(oshape)
            mid[axis] = int(values.size)
            y = self.emit("aten.index_select.default", (operand, axis, flat), {}, mid,
                          out.dtype, where)
            if tuple(mid) != tuple(out.shape):
                y = self.emit("aten.view.default", (y, list(out.shape)), {}, out.shape,
                              out.dtype, where)
            return [y]
        return self.unsupported(e, where, "gather with indices computed from inputs into an "
                                          "activation")


for _p in _UNARY:
    setattr(_Translator, f"p_{_p}", _Translator._unary)
del _p


def import_jax(fn, params: Any, example_inputs: Any) -> Program:
    """Trace ``fn(params, *inputs)`` (``fn(params, **inputs)`` for a dict) on ``example_inputs``
    and translate it (module docstring). Parameters become constants named by pytree path."""
    names, arrays, as_kwargs = bind_jax_inputs(example_inputs)
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    treedef = jax.tree_util.tree_structure(params)

    def flat_fn(leaves, *xs):
        p = jax.tree_util.tree_unflatten(treedef, list(leaves))
        if as_kwargs:
            return fn(p, **dict(zip(names, xs)))
        return fn(p, *xs)

    leaves = [np.asarray(v) for _, v in leaves_with_path]
    closed, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, *arrays)
    t = _Translator()
    param_vals = []
    for (path, _), value in zip(leaves_with_path, leaves):
        param_vals.append(_Folded(value, keystr_name(path) or "param"))
    inputs = []
    for name, arr in zip(names, arrays):
        var = Var(name, tuple(arr.shape), _dtype(arr.dtype))
        inputs.append(var)
    t.inputs = inputs
    outs = t.run(closed.jaxpr, closed.consts, param_vals + inputs, "")
    if t.problems:
        raise UnsupportedOperationError(t.problems)
    out_vars = []
    for o in outs:
        if isinstance(o, _Folded):
            raise ExportError("an output of the function does not depend on its inputs")
        out_vars.append(o)
    out_names = tuple(keystr_name(p) or "output"
                      for p, _ in jax.tree_util.tree_flatten_with_path(out_shapes)[0])
    if len(out_names) != len(out_vars) or len(set(out_names)) != len(out_names):
        out_names = ("output",) if len(out_vars) == 1 else tuple(map(str, range(len(out_vars))))
    program = Program(tuple(inputs), tuple(t.constants), tuple(t.eqns), tuple(out_vars),
                      out_names, t.const_values, t.const_kinds)
    return program.validate()


# what each handled lax primitive becomes (README's "lax primitives" table, tools/ops_table.py;
# tests/test_jax_import.py checks these keys are exactly the handled primitives)
PRIMITIVE_MAP = {
    "dot_general": "aten.linear (constant kernel, any rank; a following bias folded in), "
                   "aten.matmul (two activations, batch dims included)",
    "conv_general_dilated": "aten.convolution (any layout via permutes; lhs_dilation -> "
                            "transposed; feature groups)",
    "reduce_window_max": "aten.max_pool{1,2,3}d (padding, window dilation)",
    "reduce_window_sum": "aten.avg_pool{1,2,3}d x window size",
    "add": "aten.add (or the bias of the affine op before)", "sub": "aten.sub / aten.rsub",
    "mul": "aten.mul", "div": "aten.div", "max": "aten.maximum (max(x, 0): aten.relu)",
    "min": "aten.minimum", "integer_pow": "aten.pow", "square": "aten.pow",
    **{p: op.replace(".default", "") for p, op in _UNARY.items()},
    "reduce_sum": "aten.sum", "reduce_max": "aten.amax",
    "reshape": "aten.view", "squeeze": "aten.view", "broadcast_in_dim": "aten.view + aten.expand",
    "transpose": "aten.permute", "convert_element_type": "aten._to_copy",
    "copy": "identity", "copy_p": "identity",
    "slice": "aten.slice", "dynamic_slice": "aten.slice (constant starts)",
    "dynamic_update_slice": "aten.slice_scatter (constant starts)", "split": "aten.slice",
    "concatenate": "aten.cat", "stack": "aten.stack", "rev": "aten.flip",
    "pad": "aten.constant_pad_nd (non-negative, no interior)",
    "gather": "aten.embedding (constant table, integer ids), aten.index_select (constant "
              "indices)",
    "select_n": "aten.where", "eq": "aten.eq", "ne": "aten.ne", "lt": "aten.lt",
    "le": "aten.le", "gt": "aten.gt", "ge": "aten.ge",
    "and": "aten.logical_and / bitwise_and", "or": "aten.logical_or / bitwise_or",
    "not": "aten.logical_not / bitwise_not",
    "scan": "unrolled over its static length (aten.select per step, aten.stack of ys)",
    "while": "unrolled when its trip count is static; a data-dependent bound raises",
    "cond": "the branch of a constant predicate; a data-dependent predicate raises",
    **{p: "inlined" for p in _INLINE},
    **{f"{p} (jax.nn)": op.replace(".default", "") for p, op in _NAMED.items()},
    "softmax (written out)": "aten.softmax", "gelu (written out, both forms)": "aten.gelu",
    "layer norm / RMS norm (written out, flax forms)": "aten.layer_norm / aten.rms_norm",
}
