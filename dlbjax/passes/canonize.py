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
"""

from __future__ import annotations

from typing import Optional

from dlbjax.ir import Eqn, Program, Var

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
    if not folds:
        return program, 0

    new_eqns: list[Eqn] = []
    for eqn in program.eqns:
        if id(eqn) in dropped:
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
    return folded.validate(), len(folds)
