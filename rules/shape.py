"""Exact index maps (spec §4.3, §4.5, §9.12): reshape, permute, slice, select, expand, cat, split,
pad, gather/index with constant indices, where/masked_fill, slice/select scatter (the written
region's relevance goes to the source, the rest to the tensor written into) and ``copy`` (all of
it to the source, which the destination's old values do not reach).

All these ops are linear in their relevance-carrying operands with 0/1 coefficients, and their
transpose is the exact inverse index map: reshape back, inverse permutation, scatter-add into zeros
for slices and gathers (duplicate indices sum), a sum over broadcast axes for expand, a crop for
padding, the piece of each operand for cat/stack, and the selected operand for where. So the rule is
the VJP of the op's own forward lowering at the recorded inputs: exact by construction, identical
for each contrastive stream, conserving except where the output holds constants (a where/cat/pad
with a constant operand), whose relevance leaves the explanation.

Integer token ids that flow into an embedding (``input_ids.view(...)``) are routed the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlbjax._dtypes import relevance_dtype
from dlbjax.lowerings import LOWERINGS

from ._registry import register

__all__ = ["route"]


def _carry_paths(carries):
    paths = []
    for i, c in enumerate(carries):
        if isinstance(c, (list, tuple)):
            paths += [(i, j) for j, cj in enumerate(c) if cj]
        elif c:
            paths.append((i,))
    return paths


def _get(args, path):
    v = args[path[0]]
    return v[path[1]] if len(path) == 2 else v


def _constant_paths(args, carries):
    """Float array operands that carry no relevance (constants copied into the output)."""
    paths = []
    for i, a in enumerate(args):
        c = carries[i] if i < len(carries) else False
        if isinstance(a, (list, tuple)):
            cs = c if isinstance(c, (list, tuple)) else [False] * len(a)
            paths += [(i, j) for j, (x, cj) in enumerate(zip(a, cs)) if not cj and _is_float(x)]
        elif not c and _is_float(a):
            paths.append((i,))
    return paths


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


def route(ctx, R, *args, **kwargs):
    """VJP of the forward lowering with respect to the relevance-carrying operands, and to the
    float constants it copies into its output (a class token concatenated into the stream): the
    engine books those under the constant's name (``dlbjax.engine.origins``)."""
    paths = _carry_paths(ctx.carries) + _constant_paths(args, ctx.carries)
    fn = LOWERINGS[ctx.op]
    points = []
    for p in paths:
        v = _get(args, p)
        # integer token ids are routed through a float stand-in of the same shape (linear op)
        points.append(v if jnp.issubdtype(v.dtype, jnp.floating) else jnp.zeros(v.shape, relevance_dtype()))

    def f(*vals):
        new = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
        for p, v in zip(paths, vals):
            if len(p) == 2:
                new[p[0]][p[1]] = v
            else:
                new[p[0]] = v
        return fn(*new, **kwargs)

    outs, vjp = jax.vjp(f, *points)
    if isinstance(outs, tuple):
        R = R if isinstance(R, tuple) else (R,)
        ct = tuple(jnp.zeros(o.shape, o.dtype) if r is None else r.astype(o.dtype)
                   for o, r in zip(outs, R))
    else:
        ct = (R[0] if isinstance(R, tuple) else R).astype(outs.dtype)
    grads = vjp(ct)
    result = [None] * len(args)
    for p, g in zip(paths, grads):
        if len(p) == 2:
            if result[p[0]] is None:
                result[p[0]] = [None] * len(args[p[0]])
            result[p[0]][p[1]] = g
        else:
            result[p[0]] = g
    return tuple(result)


register(
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.view_copy.default",
    "aten.permute.default", "aten.permute_copy.default", "aten.transpose.int", "aten.t.default",
    "aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.unsqueeze.default",
    "aten.flatten.using_ints", "aten.unflatten.int", "aten.expand.default", "aten.expand_copy.default",
    "aten.slice.Tensor", "aten.slice_copy.Tensor", "aten.select.int", "aten.select_copy.int",
    "aten.cat.default", "aten.stack.default", "aten.split.Tensor", "aten.split_with_sizes.default",
    "aten.chunk.default", "aten.unbind.int", "aten.clone.default", "aten.alias.default",
    "aten.alias_copy.default", "aten.contiguous.default", "aten.detach.default",
    "aten.lift_fresh_copy.default", "aten.constant_pad_nd.default", "aten.repeat.default",
    "aten.flip.default", "aten.roll.default", "aten.narrow.default", "aten.index_select.default",
    "aten.index.Tensor", "aten.gather.default", "aten.slice_scatter.default",
    "aten.select_scatter.default", "aten.copy.default",
    default=route, route=True, shared=True, section="§4.3, §4.5, §9.12")

# dtype casts and where-style selection: exact routing too, but never for token ids
register("aten._to_copy.default", "aten.to.dtype", "aten.type_as.default",
         "aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther",
         "aten.masked_fill.Scalar", "aten.masked_fill.Tensor",
         default=route, shared=True, section="§4.11, §9.1")
