"""Canonization for the LRP family: batch norm folded into the affine op that feeds it.

LRP rules are defined for affine units ``z = W x + b``; a batch norm in inference right after a
dense or conv layer is an affine map of that layer's output, so the pair is one unit with
``W' = W s`` and ``b' = (b - mean) s + beta``, ``s = gamma / sqrt(running_var + eps)`` (per
output channel). This is Zennit's ``SequentialMergeBatchNorm`` (Anders et al. 2021; Montavon et
al. 2019, §10.2 "canonization"), done on the IR: the folded weight and bias are computed *inside
the program* from the original constants (a few constant-only equations before the layer, which
carry no relevance), so replacing the constants (a parameter-randomisation test) still acts on
the folded layer, and the forward equals the unfolded one up to rounding.

A batch norm is folded when its input is the output of ``aten.linear`` or a non-transposed
convolution used by nothing else and not returned, and its statistics outputs are unused;
every other batch norm stays (the LRP family passes relevance through it unchanged).

A Flax BatchNorm arrives written out (``(x - mean) * k + beta``, ``k = scale * rsqrt(var +
eps)`` folded on the host) and fused into one ``dlbjax.fused`` norm equation
(``_plan._flax_batch_norm``): :func:`fold_batch_norm` folds it too when its body is a chain of
``sub``/``mul``/``add``/``div`` by per-channel constants (channel last) and its input is the
output of ``aten.linear``, of a non-transposed convolution, of its channel-last permute
(``[0, 2, .., n-1, 1]``, Flax's NHWC) or of the view that drops its batch axis of one
(Equinox's per-example layers), each used by nothing else: the per-channel map ``y = x a + c``
is built from the body's constants and merged as ``W' = W a``, ``b' = b a + c``; the permute
or view is re-emitted after the folded convolution.
"""

from __future__ import annotations

from typing import Optional

from dlbjax.ir import Eqn, Program, Var
from dlbjax.lowerings.fused import FUSED_OP

__all__ = ["fold_batch_norm", "BATCH_NORMS"]

BATCH_NORMS = ("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default")
_CONVS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
          "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")


def _bias_slot(eqn: Eqn) -> Optional[int]:
    """Position of the bias argument of a foldable affine op, or None when it is not foldable."""
    if eqn.op == "aten.linear.default" or eqn.op in _CONVS:
        return 2
    if eqn.op == "aten.convolution.default" and not eqn.args[6]:
        return 2
    return None


def _bn_parts(eqn: Eqn):
    """(input, gamma, beta, mean, var, eps) of a batch norm in inference, or None."""
    a = eqn.args
    if eqn.op == BATCH_NORMS[0]:
        return a[0], a[1], a[2], a[3], a[4], float(a[6])
    training = a[5] if len(a) > 5 else eqn.kwargs.get("training", False)
    if training:
        return None
    eps = a[7] if len(a) > 7 else eqn.kwargs.get("eps", 1e-5)
    return a[0], a[1], a[2], a[3], a[4], float(eps)


def fold_batch_norm(program: Program) -> tuple[Program, int]:
    """(the program with every foldable batch norm merged into its producer, how many)."""
    producers = program.producers()
    consumers = program.consumers()
    outputs = set(program.outputs)
    folds: dict[int, tuple] = {}  # id(affine eqn) -> (batch norm eqn, parts)
    dropped: set = set()
    for bn in program.eqns:
        if bn.op not in BATCH_NORMS:
            continue
        parts = _bn_parts(bn)
        if parts is None or not isinstance(parts[0], Var):
            continue
        x, gamma, beta, mean, var = parts[:5]
        if not all(isinstance(t, Var) for t in (mean, var)):
            continue
        prod = producers.get(x)
        if prod is None or _bias_slot(prod) is None or x in outputs \
                or len(consumers.get(x, [])) != 1 or id(prod) in folds:
            continue
        if any(consumers.get(o) or o in outputs for o in bn.outputs[1:]):
            continue
        weight = prod.args[1]
        if not isinstance(weight, Var):
            continue
        folds[id(prod)] = (bn, parts)
        dropped.add(id(bn))
    affines = _fused_affines(program, producers, consumers, outputs, folds)
    if not folds and not affines:
        return program, 0

    new_eqns: list[Eqn] = []
    for e in affines.values():
        dropped.update(id(d) for d in e[1])
    for eqn in program.eqns:
        if id(eqn) in dropped:
            continue
        if id(eqn) in affines:
            new_eqns.extend(_fold_affine(eqn, *affines[id(eqn)]))
            continue
        if id(eqn) not in folds:
            new_eqns.append(eqn)
            continue
        bn, (x, gamma, beta, mean, var, eps) = folds[id(eqn)]
        src = bn.source
        out = bn.outputs[0]
        weight = eqn.args[1]
        slot = _bias_slot(eqn)
        bias = eqn.args[slot] if len(eqn.args) > slot else eqn.kwargs.get("bias")
        c = (mean.shape[0],)
        dt = weight.dtype
        tag = out.name

        def v(suffix, shape):
            return Var(f"{tag}.fold_{suffix}", tuple(shape), dt)

        shifted, inv = v("var_eps", c), v("rstd", c)
        new_eqns.append(Eqn("aten.add.Tensor", (var, eps), {}, (shifted,), src))
        new_eqns.append(Eqn("aten.rsqrt.default", (shifted,), {}, (inv,), src))
        scale = inv
        if isinstance(gamma, Var):
            scale = v("scale", c)
            new_eqns.append(Eqn("aten.mul.Tensor", (inv, gamma), {}, (scale,), src))
        col = v("scale_col", c + (1,) * (len(weight.shape) - 1))
        new_eqns.append(Eqn("aten.view.default", (scale, list(col.shape)), {}, (col,), src))
        w2 = v("weight", weight.shape)
        new_eqns.append(Eqn("aten.mul.Tensor", (weight, col), {}, (w2,), src))
        centred = v("centred", c)
        if isinstance(bias, Var):
            new_eqns.append(Eqn("aten.sub.Tensor", (bias, mean), {}, (centred,), src))
        else:
            new_eqns.append(Eqn("aten.neg.default", (mean,), {}, (centred,), src))
        b_scaled = v("bias_scaled", c)
        new_eqns.append(Eqn("aten.mul.Tensor", (centred, scale), {}, (b_scaled,), src))
        b2 = b_scaled
        if isinstance(beta, Var):
            b2 = v("bias", c)
            new_eqns.append(Eqn("aten.add.Tensor", (b_scaled, beta), {}, (b2,), src))
        args = list(eqn.args)
        args[1] = w2
        if len(args) > slot:
            args[slot] = b2
            kwargs = dict(eqn.kwargs)
        else:
            while len(args) < slot:
                args.append(None)
            args.append(b2)
            kwargs = {k: val for k, val in eqn.kwargs.items() if k != "bias"}
        new_eqns.append(Eqn(eqn.op, tuple(args), kwargs, (out,), eqn.source))
    folded = Program(program.inputs, program.constants, tuple(new_eqns), program.outputs,
                     program.output_names, program.const_values, program.const_kinds)
    return folded.validate(), len(folds) + len(affines)


_AFFINE_STEPS = ("aten.sub.Tensor", "aten.mul.Tensor", "aten.add.Tensor", "aten.div.Tensor")


def _is_flax_batch_norm(eqn: Eqn) -> bool:
    body = eqn.kwargs.get("body") if eqn.op == FUSED_OP else None
    return body is not None and body.kind == "norm" \
        and eqn.source.module_type.rsplit(".", 1)[-1] == "BatchNorm"


def _channel_steps(body, x: Var, constants, channels: int, axis: int):
    """``[(op, constant, constant first)]`` of a fused body that is a chain of per-channel
    affine steps from its variable input ``x`` (channels on ``x``'s axis ``axis``, negative;
    each constant broadcasts along the others), or None."""
    cur = x
    steps = []
    for e in body.eqns:
        if e.op not in _AFFINE_STEPS or len(e.args) != 2 or e.kwargs:
            return None
        a, b = e.args
        if a == cur and isinstance(b, Var) and b in constants:
            k, first = b, False
        elif b == cur and isinstance(a, Var) and a in constants \
                and e.op in ("aten.mul.Tensor", "aten.add.Tensor"):
            k, first = a, True
        else:
            return None
        if len(k.shape) < -axis or k.shape[axis] != channels \
                or any(d != 1 for i, d in enumerate(k.shape) if i != len(k.shape) + axis):
            return None
        steps.append((e.op, k, first))
        cur = e.outputs[0]
    return steps if cur == body.output and steps else None


def _fused_affines(program: Program, producers, consumers, outputs, folds) -> dict:
    """id(affine eqn) -> (fused batch norm, equations dropped, permute or None, steps)."""
    constants = set(program.constants)
    found: dict = {}
    for bn in program.eqns:
        if not _is_flax_batch_norm(bn):
            continue
        body = bn.kwargs["body"]
        variable = [v for v in body.inputs if v not in constants]
        if len(variable) != 1:
            continue
        x = variable[0]
        if x in outputs or len(consumers.get(x, [])) != 1:
            continue
        prod, perm = producers.get(x), None
        n = len(x.shape)
        axis = -1 if prod is None or prod.op == "aten.linear.default" else 1 - n
        if prod is not None and prod.op in ("aten.permute.default", "aten.view.default"):
            y = prod.args[0]
            if not isinstance(y, Var) or y in outputs or len(consumers.get(y, [])) != 1:
                continue
            if prod.op == "aten.permute.default":  # flax: NCHW conv output to NHWC
                if list(prod.args[1]) != [0] + list(range(2, n)) + [1]:
                    continue
                axis = -1
            elif y.shape[:1] == (1,) and tuple(y.shape[1:]) == tuple(x.shape):
                axis = -n  # equinox: the conv's batch axis of one squeezed away
            else:
                continue
            perm, prod = prod, producers.get(y)
            if prod is None or prod.op == "aten.linear.default":
                continue
        if prod is None or _bias_slot(prod) is None or id(prod) in folds or id(prod) in found \
                or not isinstance(prod.args[1], Var):
            continue
        steps = _channel_steps(body, x, constants, prod.args[1].shape[0], axis)
        if steps is None:
            continue
        found[id(prod)] = (bn, (bn,) + ((perm,) if perm is not None else ()), perm, steps)
    return found


def _fold_affine(eqn: Eqn, bn: Eqn, _dropped, perm, steps) -> list:
    """The affine ``eqn`` with the per-channel map of the fused batch norm ``bn`` merged in,
    then ``perm`` (re-emitted onto the batch norm's output) when there is one."""
    src, out = bn.source, bn.outputs[0]
    weight = eqn.args[1]
    slot = _bias_slot(eqn)
    bias = eqn.args[slot] if len(eqn.args) > slot else eqn.kwargs.get("bias")
    c = (weight.shape[0],)
    dt = weight.dtype
    tag = out.name
    new: list = []
    count = [0]

    def v(suffix, shape=c):
        count[0] += 1
        return Var(f"{tag}.fold_{suffix}{count[0]}", tuple(shape), dt)

    def emit(op, *args, shape=c):
        o = v(op.split(".")[1], shape)
        new.append(Eqn(op, args, {}, (o,), src))
        return o

    scale, shift = None, None  # y = x * scale + shift (None: 1 and 0)
    for op, k, first in steps:
        k = emit("aten.view.default", k, list(c)) if k.shape != c else k
        if op == "aten.mul.Tensor":
            scale = k if scale is None else emit(op, scale, k)
            shift = None if shift is None else emit(op, shift, k)
        elif op == "aten.div.Tensor":
            scale = emit("aten.reciprocal.default", k) if scale is None else emit(op, scale, k)
            shift = None if shift is None else emit(op, shift, k)
        elif op == "aten.add.Tensor":
            shift = k if shift is None else emit(op, shift, k)
        else:  # sub
            shift = emit("aten.neg.default", k) if shift is None else emit(op, shift, k)
    w2 = weight
    if scale is not None:
        col = [c[0]] + [1] * (len(weight.shape) - 1)
        w2 = emit("aten.mul.Tensor", weight, emit("aten.view.default", scale, col, shape=col),
                  shape=weight.shape)
    b2 = bias if isinstance(bias, Var) else None
    if b2 is not None and scale is not None:
        b2 = emit("aten.mul.Tensor", b2, scale)
    if shift is not None:
        b2 = shift if b2 is None else emit("aten.add.Tensor", b2, shift)
    args = list(eqn.args)
    args[1] = w2
    kwargs = dict(eqn.kwargs)
    if len(args) > slot:
        args[slot] = b2
    else:
        while len(args) < slot:
            args.append(None)
        args.append(b2)
        kwargs.pop("bias", None)
    if perm is None:
        new.append(Eqn(eqn.op, tuple(args), kwargs, (out,), eqn.source))
    else:
        new.append(Eqn(eqn.op, tuple(args), kwargs, eqn.outputs, eqn.source))
        new.append(Eqn(perm.op, perm.args, perm.kwargs, (out,), perm.source))
    return new
