"""Precomputed |W| of the constant weights of affine ops (a hot-path optimisation).

The default-mode dense/conv rule (``rules/_math.py``, ``_magnitude_rule``) needs |W| for its two extra
products. Computed inside the compiled pass, |W| is a full read and write of every weight on every
call: about 15-20% of a BERT-base explanation at batch 1 on CPU (see benchmarks/RESULTS.md). The
Explainer computes it once, keeps it next to the constants (the dense/conv weights' memory once
more) and passes it to the compiled function as an argument; the relevance pass hands it to the
rule as ``ctx.magnitude(i)``. Results are bit-identical: it is the same ``jnp.abs``.

Only weights that the magnitude form will read are cached: constant operands with two or more
axes of affine ops on the relevance path, in default mode, not gated by a non-monotone
(experimental) activation entry. Contrastive mode uses the sign-split form (W+ and W-) and caches
nothing.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from dlbjax.ir import Program, Var
from dlbjax.lowerings import Kind, is_kind
from dlbjax.lowerings.affine import is_transposed_conv
from dlbjax.rules import Options

__all__ = ["magnitude_names", "precompute_magnitudes", "conv_weight_names", "split_layouts",
           "restore_layouts"]


def magnitude_names(program: Program, analysis, options: Options) -> list[str]:
    if options.contrastive:
        return []
    consts = {c.name for c in program.constants}
    names: list[str] = []
    for i, eqn in enumerate(program.eqns):
        rule = options.rule(i, eqn.op)
        if rule is None or not rule.affine or not any(o in analysis.carries for o in eqn.outputs):
            continue
        gate = analysis.gates.get(i)
        if gate is not None and gate.fn is not None:
            continue
        for a in eqn.args:
            if isinstance(a, Var) and a.name in consts and a.is_float and len(a.shape) >= 2 \
                    and a.name not in names:
                names.append(a.name)
    return names


def precompute_magnitudes(program: Program, analysis, options: Options, consts: dict) -> dict:
    """name -> |value| for every weight the magnitude form reads (computed once, eagerly)."""
    return {n: jnp.abs(consts[n]) for n in magnitude_names(program, analysis, options)}


# ------------------------------------------------------------------------------------------------
# Convolution weights in the CPU's filter layout
# ------------------------------------------------------------------------------------------------
# XLA:CPU runs convolutions with the filter as [*kernel, in, out] (row-major). A PyTorch weight
# [out, in, *kernel] passed as an argument is therefore transposed (copied) inside every call, once
# per use: the forward, the S = |x| * |W| product and its transpose each copy a weight (and |W|).
# On CPU the Explainer passes conv weights (and their |W|) already transposed and undoes the
# transpose at the start of the compiled function, where XLA cancels the pair; the program still
# sees [out, in, *kernel]. Bit-identical results; resnet18 at 224x224 explains ~15% faster.
def conv_weight_names(program: Program) -> list[str]:
    consts = {c.name for c in program.constants}
    names: list[str] = []
    for eqn in program.eqns:
        if not is_kind(eqn.op, Kind.CONV) or is_transposed_conv(eqn):
            continue  # (a transposed convolution's weight has another layout)
        w = eqn.args[1] if len(eqn.args) > 1 else None
        if isinstance(w, Var) and w.name in consts and w.is_float and len(w.shape) >= 3 \
                and w.name not in names:
            names.append(w.name)
    return names


def _perm(ndim: int) -> tuple:
    return tuple(range(2, ndim)) + (1, 0)


def to_filter_layout(w):
    """[out, in, *kernel] -> [*kernel, in, out]."""
    return jnp.transpose(w, _perm(w.ndim))


def from_filter_layout(w):
    """The inverse of :func:`to_filter_layout` (inside the compiled function)."""
    perm = _perm(w.ndim)
    inverse = tuple(sorted(range(w.ndim), key=lambda i: perm[i]))
    return jnp.transpose(w, inverse)


def split_layouts(consts: dict, mags: dict, names) -> tuple[dict, dict, dict]:
    """(consts, mags) without the named conv weights, plus those in the filter layout."""
    names = set(names)
    laid = {"consts": {k: to_filter_layout(consts[k]) for k in names if k in consts},
            "mags": {k: to_filter_layout(mags[k]) for k in names if k in mags}}
    return ({k: v for k, v in consts.items() if k not in names},
            {k: v for k, v in mags.items() if k not in names}, laid)


def restore_layouts(consts: dict, mags: Optional[dict], laid_out: dict) -> tuple[dict, dict]:
    """Inside the compiled function: put the conv weights back as [out, in, *kernel]."""
    consts = dict(consts, **{k: from_filter_layout(v) for k, v in laid_out["consts"].items()})
    mags = dict(mags or {}, **{k: from_filter_layout(v) for k, v in laid_out["mags"].items()})
    return consts, mags
