"""Pooling and reductions (spec §4.2, §8.6, §8.7, §9.13).

* Max pooling (1-3d, with indices, adaptive): only the window maxima receive relevance, exact ties
  split evenly, padding never wins, cells outside every window get 0; overlapping windows add. The
  same routing for each contrastive stream.
* Average pooling (1-3d, adaptive): each window's relevance is split over its cells in proportion
  to |x| (the dense rule with equal positive weights and no bias); zero padding receives nothing;
  the divisor and ``count_include_pad`` do not change the shares. Contrastive: the §3.2 rule with
  unit weights per window.
* mean/sum over axes: the same |x|-proportional split along the reduced axes (a global average
  pool is a mean over H, W).

Windows come from the same static index tables as the forward (``dlbjax/lowerings/windows.py``): gather the
window cells, compute the shares, scatter-add back with the gather's VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlbjax.lowerings import LOWERINGS
from dlbjax.lowerings import reduce_axes as _dims
from dlbjax.lowerings import windows as W
from dlbjax.lowerings.pooling import adaptive_table, pool_table

from ._lrp import LRP, z_rule
from ._math import unit_rule
from ._registry import Streams, register

__all__ = []


def _scatter(x, table, shares):
    """Transpose of gather_windows: add window-cell shares back onto the cells of x."""
    _, vjp = jax.vjp(lambda v: W.gather_windows(v, table, 0.0), jnp.zeros(x.shape, shares.dtype))
    return vjp(shares)[0]


def _max_share(x, table, R):
    win = W.gather_windows(x, table, -jnp.inf)
    top = jnp.max(win, axis=-1, keepdims=True)
    winners = (win == top) & jnp.asarray(table >= 0)
    count = jnp.sum(winners, axis=-1, keepdims=True)
    shares = jnp.where(winners, R[..., None] / jnp.maximum(count, 1), 0).astype(R.dtype)
    return _scatter(x, table, shares)


def _avg_share(ctx, x, table, R):
    win = W.gather_windows(x, table, 0.0)
    rel, _ = unit_rule(win, None, _expand(R), ctx.options.contrastive, axis=-1)
    if ctx.options.contrastive:
        return Streams(_scatter(x, table, rel.positive), _scatter(x, table, rel.negative))
    return _scatter(x, table, rel)


def _expand(R):
    if isinstance(R, Streams):
        return Streams(R.positive[..., None], R.negative[..., None])
    return R[..., None]


def _first(R):
    return R[0] if isinstance(R, tuple) and not isinstance(R, Streams) else R


def _max_pool(nd):
    def rule(ctx, R, self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, dilation, ceil_mode)
        return (_max_share(self, table, _first(R)),)
    return rule


def _adaptive_max(nd):
    def rule(ctx, R, self, output_size):
        return (_max_share(self, adaptive_table(nd, self.shape, output_size), _first(R)),)
    return rule


def _avg_pool(nd):
    def rule(ctx, R, self, kernel_size, stride=(), padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, 1, ceil_mode)
        return (_avg_share(ctx, self, table, R),)
    return rule


def _adaptive_avg(nd):
    def rule(ctx, R, self, output_size):
        return (_avg_share(ctx, self, adaptive_table(nd, self.shape, output_size), R),)
    return rule


for _nd in (1, 2, 3):
    register(f"aten.max_pool{_nd}d.default", default=_max_pool(_nd), shared=True,
             section="§4.2, §8.6")
    register(f"aten.max_pool{_nd}d_with_indices.default", default=_max_pool(_nd), outputs=(0,), shared=True,
             section="§4.2, §8.6")
    register(f"aten.adaptive_max_pool{_nd}d.default", default=_adaptive_max(_nd), outputs=(0,), shared=True,
             section="§4.2, §8.6")
    register(f"aten.avg_pool{_nd}d.default", default=_avg_pool(_nd), contrastive=_avg_pool(_nd),
             section="§4.2, §8.7")
    register(f"aten.adaptive_avg_pool{_nd}d.default", f"aten._adaptive_avg_pool{_nd}d.default",
             default=_adaptive_avg(_nd), contrastive=_adaptive_avg(_nd), section="§4.2, §8.7")


# ------------------------------------------------------------------------------------------------
# mean / sum over axes
# ------------------------------------------------------------------------------------------------
def _reduce(ctx, R, self, dim=None, keepdim=False, *, dtype=None):
    axes = _dims(dim, self.ndim)
    x = self.astype(jnp.result_type(self.dtype, jnp.float32)) if dtype is not None else self

    def expand(r):
        return r if keepdim else jnp.expand_dims(r, axes)

    R = Streams(expand(R.positive), expand(R.negative)) if isinstance(R, Streams) else expand(R)
    rel, _ = unit_rule(x, None, R, ctx.options.contrastive, axis=axes)
    return (rel,)


def _max_reduce(ctx, R, self, dim=None, keepdim=False):
    """max/amax over axes on the relevance path: a global max pool (winner takes all, exact ties
    split evenly, §4.2). The same for each contrastive stream."""
    axes = _dims(dim, self.ndim)
    r = R[0] if isinstance(R, tuple) else R
    r = r if keepdim else jnp.expand_dims(r, axes)
    top = jnp.max(self, axis=axes, keepdims=True)
    winners = self == top
    count = jnp.sum(winners, axis=axes, keepdims=True)
    return (jnp.where(winners, r / jnp.maximum(count, 1), 0).astype(r.dtype),)


register("aten.max.dim", "aten.amax.default", default=_max_reduce, outputs=(0,), shared=True,
         section="§4.2 (global max pool)")


def _reduce_all(ctx, R, self, *, dtype=None):
    return _reduce(ctx, R, self, None, False, dtype=dtype)


register("aten.mean.dim", "aten.sum.dim_IntList", default=_reduce, contrastive=_reduce,
         section="§4.2, §9.13")
register("aten.mean.default", "aten.sum.default", default=_reduce_all, contrastive=_reduce_all,
         section="§4.2, §9.13")


def _lrp_norm(ctx, R, self, *rest, **kwargs):
    """LRP family (rules/_lrp.py): the z-rule of an average pool or a mean/sum reduction (Zennit's
    ``Norm`` on ``AvgPool``): ``R_x = x * T_f(R / stab(f(x)))``, T_f the transpose of the op's own
    forward, so padding, ceil mode and divisors are exact. ``stabilizer`` (1e-6)."""
    f = LOWERINGS[ctx.op]
    (rel,) = z_rule(lambda u: f(u, *rest, **kwargs), (self,), _first(R),
                    ctx.params.get("stabilizer", 1e-6))
    return (rel,)


def _lrp_max_pool(ctx, R, self, *rest, **kwargs):
    """LRP family: a max pool routes relevance like its gradient, to the first maximum of each
    window (torch's max-pool backward, and so Zennit's unhooked max pools); DLB splits exact
    ties evenly (§4.2). They differ only on tied windows, e.g. all-zero ReLU outputs, where the
    flat and w-square rules still send relevance."""
    f = LOWERINGS[ctx.op]
    def fn(u):
        out = f(u, *rest, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    _, vjp = jax.vjp(fn, self)
    return vjp(_first(R).astype(self.dtype))


register(*(f"aten.max_pool{n}d.default" for n in (1, 2, 3)), default=_lrp_max_pool, method=LRP,
         section="LRP (gradient routing)")
register(*(f"aten.max_pool{n}d_with_indices.default" for n in (1, 2, 3)),
         *(f"aten.adaptive_max_pool{n}d.default" for n in (1, 2, 3)),
         default=_lrp_max_pool, method=LRP, outputs=(0,), section="LRP (gradient routing)")
register(*(f"aten.avg_pool{n}d.default" for n in (1, 2, 3)),
         *(f"aten.adaptive_avg_pool{n}d.default" for n in (1, 2, 3)),
         *(f"aten._adaptive_avg_pool{n}d.default" for n in (1, 2, 3)),
         "aten.mean.dim", "aten.sum.dim_IntList", "aten.mean.default", "aten.sum.default",
         default=_lrp_norm, method=LRP, section="LRP z-rule")
