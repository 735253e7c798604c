"""JAX -> dlbjax IR: trace a pure function ``fn(params, *inputs)`` with ``jax.make_jaxpr`` and
translate its jaxpr into the same :class:`dlbjax.ir.Program` the torch importer builds.

Every lax primitive is mapped onto existing ATen op names with their ATen argument conventions, so
the existing lowerings and relevance rules apply unchanged:

- ``dot_general`` with a constant right operand -> ``aten.linear.default`` (the kernel [in, out]
  stored transposed, [out, in], as torch's Linear; a following ``+ bias`` is folded into it);
  between two activations -> ``aten.matmul.default``;
- ``conv_general_dilated`` (any layout, e.g. flax's NHWC/HWIO) -> permutes to NCHW/OIHW,
  ``aten.convolution.default`` (a following per-channel ``+ bias`` folded in), permute back;
- ``reduce_window_max`` / ``reduce_window_sum`` -> ``aten.max_pool{n}d`` / ``aten.avg_pool{n}d``
  (times the window size) between permutes;
- element-wise arithmetic, ``max(x, 0)`` -> ``aten.relu.default``, unary functions, reductions,
  reshapes, transposes, broadcasts and casts as ATen index maps;
- layer-level activations: ``jax.nn.relu``/``silu``/``sigmoid``/``relu6`` by their jit or
  custom_jvp name, ``jax.nn.softmax`` and ``jax.nn.gelu`` (both forms) by their written-out
  equations -> ``aten.softmax.int`` / ``aten.gelu.default``;
- ``pjit`` / ``closed_call`` / ``custom_jvp_call`` / ``custom_vjp_call`` are inlined.

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

from ._bind import path_name

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
    (the torch path's :func:`importers._bind.path_name`)."""
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


class _Translator:
    def __init__(self):
        self.inputs: list[Var] = []
        self.constants: list[Var] = []
        self.const_values: dict[str, np.ndarray] = {}
        self.const_kinds: dict[str, str] = {}
        self.eqns: list[Eqn] = []
        self.problems: list[UnsupportedOp] = []
        self.counter = 0
        self.const_cache: dict[int, Var] = {}
        self.relaid_cache: dict = {}  # (id(value), layout) -> (value kept alive, relaid value)
        # the last affine equation emitted, so that a following "+ bias" folds into it
        self.pending = None

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
        if key in self.const_cache:
            return self.const_cache[key]
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
        self.const_cache[key] = var
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
        value = b.value
        if value.ndim > len(result.shape):
            return None
        value = value.reshape((1,) * (len(result.shape) - value.ndim) + value.shape)
        ax = axis % len(result.shape)
        if any(s != 1 for i, s in enumerate(value.shape) if i != ax):
            return None
        vec = np.broadcast_to(value.reshape(-1), (result.shape[ax],)).astype(value.dtype)
        bias = self.constant(_Folded(np.ascontiguousarray(vec), b.origin))
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
        return [self.emit("aten.view.default", (x, list(out.shape)), {}, out.shape, out.dtype,
                          where)]

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
            x = self.emit("aten.view.default", (x, inter), {}, inter, x.dtype, where)
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
        a, b = ins
        if lb or rb:
            return self.unsupported(e, where, "dot_general with batch dimensions")
        if isinstance(b, _Folded) and isinstance(a, Var) and len(rc) == 1 and b.value.ndim == 2 \
                and tuple(lc) == (len(a.shape) - 1,):
            weight = self.relaid(b, "linear", lambda v: v if rc[0] == 1 else v.T)  # [out, in]
            y = self.emit("aten.linear.default", (a, weight, None), {}, out.shape, out.dtype, where)
            self.pending = ("linear", len(self.eqns) - 1, y, -1, (e.outvars[0], counts))
            return [y]
        a, b = self.as_var(a), self.as_var(b)
        if len(lc) == 1 and len(rc) == 1:
            a = self.permute(a, [i for i in range(len(a.shape)) if i != lc[0]] + [lc[0]], where)
            b = self.permute(b, [rc[0]] + [i for i in range(len(b.shape)) if i != rc[0]], where)
            if len(a.shape) <= 2 and len(b.shape) <= 2:
                return [self.emit("aten.matmul.default", (a, b), {}, out.shape, out.dtype, where)]
        return self.unsupported(e, where, f"dot_general with dimension numbers {params['dimension_numbers']}")

    def p_conv_general_dilated(self, e, ins, params, out, where, counts):
        x, w = ins
        if not isinstance(w, _Folded) or not isinstance(x, Var):
            return self.unsupported(e, where, "a convolution whose kernel is not a constant")
        dn = params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        nd = len(lhs_spec) - 2
        if any(d != 1 for d in params["lhs_dilation"]) or params.get("batch_group_count", 1) != 1:
            return self.unsupported(e, where, "a transposed (lhs-dilated) or batch-grouped conv")
        pads = [tuple(p) for p in params["padding"]]
        xin = self.permute(x, lhs_spec, where)
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

    def _pool(self, e, ins, params, out, where, counts):
        x = ins[0]
        if not isinstance(x, Var) or not all(isinstance(a, _Folded) for a in ins[1:]):
            return self.unsupported(e, where, "a pooling window over constants")
        win, strides = tuple(params["window_dimensions"]), tuple(params["window_strides"])
        pads = [tuple(p) for p in params["padding"]]
        if any(d != 1 for d in tuple(params.get("base_dilation", ())) + tuple(params.get("window_dilation", ()))):
            return self.unsupported(e, where, "dilated pooling windows")
        spatial = [i for i, k in enumerate(win) if k != 1 or strides[i] != 1 or pads[i] != (0, 0)]
        if not spatial or len(spatial) > 3 or any(lo != hi for lo, hi in pads):
            return self.unsupported(e, where, f"pooling window {win} with padding {pads}")
        rest = [i for i in range(len(win)) if i not in spatial]
        perm = rest + spatial
        xp = self.permute(x, perm, where)
        nd = len(spatial)
        k = [int(win[i]) for i in spatial]
        s = [int(strides[i]) for i in spatial]
        p = [int(pads[i][0]) for i in spatial]
        pshape = [out.shape[i] for i in perm]
        if e.primitive.name == "reduce_window_max":
            y = self.emit(f"aten.max_pool{nd}d.default", (xp, k, s, p, [1] * nd, False), {}, pshape,
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


from ._jax_loops import attach as _attach_loops  # noqa: E402  (scan, while, cond, slice, split)

_attach_loops(_Translator)
