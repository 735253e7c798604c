"""Forward of pooling and reductions (window tables shared with the relevance rules).
"""

from __future__ import annotations

import jax.numpy as jnp

from dlbjax._dtypes import jnp_dtype

from . import windows as W
from ._common import _axis, _dim, _dims
from ._table import Kind, lowering, register_lowering



# ------------------------------------------------------------------------------------------------
# Pooling (window tables shared with the relevance rules)
# ------------------------------------------------------------------------------------------------
def pool_table(op_nd: int, x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    nd = op_nd
    kernel = W.as_tuple(kernel_size, nd)
    stride = W.as_tuple(stride, nd)
    stride = tuple(k if s is None else s for s, k in zip(stride, kernel))
    padding = W.as_tuple(padding, nd)
    dilation = W.as_tuple(dilation, nd)
    spatial = tuple(x_shape[-nd:])
    return W.sliding_windows(spatial, kernel, stride, padding, dilation, bool(ceil_mode))


def _first_max(win):
    """Each window's maximum, taken at its first maximal element: the same value as ``max``, and
    under ``jax.grad`` the whole gradient goes to that element, as PyTorch's max pooling routes it
    (``jnp.max`` would split it among ties, e.g. on a constant integrated-gradients baseline)."""
    arg = jnp.argmax(win, axis=-1)
    return jnp.take_along_axis(win, arg[..., None], axis=-1)[..., 0]


def _max_pool(nd):
    def fn(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, dilation, ceil_mode)
        return _first_max(W.gather_windows(self, table, -jnp.inf))

    return fn


def _winner_index(win, table):
    """Flat spatial index of each window's first maximum (PyTorch's returned indices)."""
    arg = jnp.argmax(win, axis=-1)
    tab = jnp.broadcast_to(jnp.asarray(table), win.shape)
    return jnp.take_along_axis(tab, arg[..., None], axis=-1)[..., 0]


def _max_pool_indices(nd):
    def fn(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, dilation, ceil_mode)
        win = W.gather_windows(self, table, -jnp.inf)
        return _first_max(win), _winner_index(win, table)

    return fn


for _nd in (1, 2, 3):
    register_lowering(f"aten.max_pool{_nd}d.default", _max_pool(_nd), keep_whole=True)
    register_lowering(f"aten.max_pool{_nd}d_with_indices.default", _max_pool_indices(_nd))


def _avg_pool(nd):
    def fn(self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
           divisor_override=None):
        kernel = W.as_tuple(kernel_size, nd)
        st = tuple(k if s is None else s for s, k in zip(W.as_tuple(stride, nd), kernel))
        pad = W.as_tuple(padding, nd)
        spatial = tuple(self.shape[-nd:])
        table = W.sliding_windows(spatial, kernel, st, pad, (1,) * nd, bool(ceil_mode))
        div = W.avg_divisors(spatial, kernel, st, pad, bool(ceil_mode), bool(count_include_pad),
                             divisor_override)
        total = jnp.sum(W.gather_windows(self, table, 0.0), axis=-1)
        return total / jnp.asarray(div, dtype=self.dtype)

    return fn


for _nd in (1, 2, 3):
    register_lowering(f"aten.avg_pool{_nd}d.default", _avg_pool(_nd))


def adaptive_table(nd, x_shape, output_size):
    out = tuple(x_shape[-nd + i] if o is None else int(o) for i, o in enumerate(W.as_tuple(output_size, nd)))
    return W.adaptive_windows(tuple(x_shape[-nd:]), out)


def _adaptive_avg(nd):
    def fn(self, output_size):
        table = adaptive_table(nd, self.shape, output_size)
        count = jnp.asarray((table >= 0).sum(-1), dtype=self.dtype)
        return jnp.sum(W.gather_windows(self, table, 0.0), axis=-1) / count

    return fn


def _adaptive_max(nd):
    def fn(self, output_size):
        table = adaptive_table(nd, self.shape, output_size)
        win = W.gather_windows(self, table, -jnp.inf)
        return _first_max(win), _winner_index(win, table)

    return fn


for _nd in (1, 2, 3):
    # kept whole where torch would otherwise decompose them (3-d adaptive pools export whole)
    register_lowering(f"aten.adaptive_avg_pool{_nd}d.default", _adaptive_avg(_nd),
                      keep_whole=_nd < 3)
    register_lowering(f"aten._adaptive_avg_pool{_nd}d.default", _adaptive_avg(_nd))
    register_lowering(f"aten.adaptive_max_pool{_nd}d.default", _adaptive_max(_nd),
                      keep_whole=_nd == 1)


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------
@lowering("aten.sum.dim_IntList", kinds=Kind.SUM)
def sum_dim(self, dim, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.sum(x, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.sum.default")
def sum_all(self, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.sum(x)


@lowering("aten.mean.dim")
def mean_dim(self, dim, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.mean(x, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.mean.default")
def mean_all(self, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.mean(x)


@lowering("aten.amax.default", kinds=Kind.MAX)
def amax(self, dim=(), keepdim=False):
    return jnp.max(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.amin.default")
def amin(self, dim=(), keepdim=False):
    return jnp.min(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.max.dim", kinds=Kind.MAX)
def max_dim(self, dim, keepdim=False):
    axis = _axis(dim, self.ndim)
    return jnp.max(self, axis=axis, keepdims=keepdim), jnp.argmax(self, axis=axis, keepdims=keepdim)


@lowering("aten.min.dim")
def min_dim(self, dim, keepdim=False):
    axis = _axis(dim, self.ndim)
    return jnp.min(self, axis=axis, keepdims=keepdim), jnp.argmin(self, axis=axis, keepdims=keepdim)


@lowering("aten.max.default")
def max_all(self):
    return jnp.max(self)


@lowering("aten.min.default")
def min_all(self):
    return jnp.min(self)


@lowering("aten.argmax.default")
def argmax(self, dim=None, keepdim=False):
    if dim is None:
        flat = jnp.argmax(self.reshape(-1))
        return flat.reshape((1,) * self.ndim) if keepdim else flat
    return jnp.argmax(self, axis=_axis(dim, self.ndim), keepdims=keepdim)


@lowering("aten.argmin.default")
def argmin(self, dim=None, keepdim=False):
    if dim is None:
        flat = jnp.argmin(self.reshape(-1))
        return flat.reshape((1,) * self.ndim) if keepdim else flat
    return jnp.argmin(self, axis=_axis(dim, self.ndim), keepdims=keepdim)


def _bool_reduce_axes(dim, ndim):
    """any/all: None reduces every dim but an empty list reduces none (unlike sum/mean/amax)."""
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        return ()
    return _dims(dim, ndim)


@lowering("aten.any.dim", "aten.any.dims")
def any_dim(self, dim=None, keepdim=False):
    return jnp.any(self, axis=_bool_reduce_axes(dim, self.ndim), keepdims=keepdim)


@lowering("aten.any.default")
def any_all(self):
    return jnp.any(self)


@lowering("aten.all.dim", "aten.all.dims")
def all_dim(self, dim=None, keepdim=False):
    return jnp.all(self, axis=_bool_reduce_axes(dim, self.ndim), keepdims=keepdim)


@lowering("aten.all.default")
def all_all(self):
    return jnp.all(self)


@lowering("aten.cumsum.default")
def cumsum(self, dim, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return x if x.ndim == 0 else jnp.cumsum(x, axis=_dim(dim, x.ndim))
