"""Forward of shape and indexing ops, casts and selection (exact index maps).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dlbjax._dtypes import jnp_dtype

from ._common import _dim
from ._table import Kind, lowering



@lowering("aten.t.default")
def t(self):
    return self.T if self.ndim == 2 else self


@lowering("aten.where.self")
def where(condition, self, other):
    return jnp.where(condition, self, other)


@lowering("aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where_scalar(condition, self, other):
    return jnp.where(condition, self, other)


@lowering("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(self, mask, value):
    return jnp.where(mask, value, self)


# ------------------------------------------------------------------------------------------------
# Shape and indexing
# ------------------------------------------------------------------------------------------------
@lowering("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
          "aten.view_copy.default", kinds=Kind.TRANSPARENT)
def view(self, size):
    return jnp.reshape(self, tuple(size))


@lowering("aten.permute.default", "aten.permute_copy.default")
def permute(self, dims):
    return jnp.transpose(self, [_dim(d, self.ndim) for d in dims])


@lowering("aten.transpose.int")
def transpose(self, dim0, dim1):
    return self if self.ndim == 0 else jnp.swapaxes(self, dim0, dim1)


@lowering("aten.squeeze.default")
def squeeze(self):
    return jnp.squeeze(self)


@lowering("aten.squeeze.dim", "aten.squeeze.dims")
def squeeze_dims(self, dim):
    if self.ndim == 0:  # torch accepts dim 0 / -1 on a 0-d tensor and returns it unchanged
        return self
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = tuple(_dim(d, self.ndim) for d in dims if self.shape[_dim(d, self.ndim)] == 1)
    return jnp.squeeze(self, axis=dims) if dims else self


@lowering("aten.unsqueeze.default")
def unsqueeze(self, dim):
    return jnp.expand_dims(self, _dim(dim, self.ndim + 1))


@lowering("aten.flatten.using_ints")
def flatten(self, start_dim=0, end_dim=-1):
    if self.ndim == 0:
        return self.reshape(1)
    s, e = _dim(start_dim, self.ndim), _dim(end_dim, self.ndim)
    merged = int(np.prod(self.shape[s:e + 1], dtype=np.int64))  # not -1: zero-size inputs
    return self.reshape(self.shape[:s] + (merged,) + self.shape[e + 1:])


@lowering("aten.unflatten.int")
def unflatten(self, dim, sizes):
    d = _dim(dim, self.ndim)
    return self.reshape(self.shape[:d] + tuple(sizes) + self.shape[d + 1:])


@lowering("aten.expand.default", "aten.expand_copy.default",
          kinds=Kind.TRANSPARENT)
def expand(self, size, *, implicit=False):
    lead = len(size) - self.ndim
    shape = tuple(self.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(self, shape)


@lowering("aten.slice.Tensor", "aten.slice_copy.Tensor")
def slice_(self, dim=0, start=None, end=None, step=1):
    d = _dim(dim, self.ndim)
    idx = [slice(None)] * self.ndim
    idx[d] = slice(start, end, step)
    return self[tuple(idx)]


@lowering("aten.slice_scatter.default")
def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
    """self with the slice ``[start:end:step]`` along ``dim`` replaced by src."""
    d = _dim(dim, self.ndim)
    idx = [slice(None)] * self.ndim
    idx[d] = slice(start, end, step)
    return self.at[tuple(idx)].set(src.astype(self.dtype))


@lowering("aten.select_scatter.default")
def select_scatter(self, src, dim, index):
    """self with entry ``index`` along ``dim`` replaced by src."""
    d = _dim(dim, self.ndim)
    idx = [slice(None)] * self.ndim
    idx[d] = index
    return self.at[tuple(idx)].set(src.astype(self.dtype))


@lowering("aten.copy.default")
def copy(self, src, non_blocking=False):
    """The functional form of ``self.copy_(src)``: src broadcast to self's shape, in self's dtype."""
    return jnp.broadcast_to(src, self.shape).astype(self.dtype)


@lowering("aten.select.int", "aten.select_copy.int")
def select(self, dim, index):
    return jnp.take(self, index, axis=_dim(dim, self.ndim))


@lowering("aten.cat.default")
def cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or list(tensors)
    return jnp.concatenate(tensors, axis=_dim(dim, tensors[0].ndim))


@lowering("aten.stack.default")
def stack(tensors, dim=0):
    return jnp.stack(tensors, axis=_dim(dim, tensors[0].ndim + 1))


@lowering("aten.split.Tensor")
def split(self, split_size, dim=0):
    d = _dim(dim, self.ndim)
    n = self.shape[d]
    if split_size == 0:  # torch allows it only on an empty dim: one empty piece
        return (self,)
    points = list(range(split_size, n, split_size))
    return tuple(jnp.split(self, points, axis=d))


@lowering("aten.split_with_sizes.default")
def split_with_sizes(self, split_sizes, dim=0):
    d = _dim(dim, self.ndim)
    return tuple(jnp.split(self, list(np.cumsum(split_sizes)[:-1]), axis=d))


@lowering("aten.chunk.default")
def chunk(self, chunks, dim=0):
    d = _dim(dim, self.ndim)
    size = -(-self.shape[d] // chunks)
    if size == 0:  # an empty dim: torch returns `chunks` empty pieces
        return tuple(self for _ in range(chunks))
    return split(self, size, d)


@lowering("aten.unbind.int")
def unbind(self, dim=0):
    d = _dim(dim, self.ndim)
    return tuple(jnp.moveaxis(self, d, 0)[i] for i in range(self.shape[d]))


@lowering("aten.clone.default", "aten.alias.default", "aten.contiguous.default",
          "aten.detach.default", "aten.lift_fresh_copy.default", "aten.alias_copy.default",
          kinds=Kind.TRANSPARENT)
def identity(self, *, memory_format=None):
    return self


@lowering("aten._to_copy.default", kinds=Kind.TRANSPARENT)
def _to_copy(self, *, dtype=None, **_):
    return self if dtype is None else self.astype(jnp_dtype(dtype))


@lowering("aten.to.dtype", kinds=Kind.TRANSPARENT)
def to_dtype(self, dtype, non_blocking=False, copy=False, memory_format=None):
    return self.astype(jnp_dtype(dtype))


@lowering("aten.type_as.default", kinds=Kind.TRANSPARENT)
def type_as(self, other):
    return self.astype(other.dtype)


@lowering("aten.constant_pad_nd.default")
def constant_pad_nd(self, pad, value=0):
    cfg = [(0, 0, 0)] * self.ndim
    for i in range(len(pad) // 2):
        axis = self.ndim - 1 - i
        cfg[axis] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(self, jnp.asarray(value, self.dtype), cfg)


@lowering("aten.repeat.default")
def repeat(self, repeats):
    lead = len(repeats) - self.ndim
    x = self.reshape((1,) * lead + self.shape)
    return jnp.tile(x, tuple(repeats))


@lowering("aten.flip.default")
def flip(self, dims):
    return jnp.flip(self, axis=tuple(dims))


@lowering("aten.roll.default")
def roll(self, shifts, dims=()):
    if not dims:
        return jnp.roll(self.reshape(-1), shifts).reshape(self.shape)
    return jnp.roll(self, tuple(shifts), axis=tuple(dims))


@lowering("aten.narrow.default")
def narrow(self, dim, start, length):
    d = _dim(dim, self.ndim)
    start = start + self.shape[d] if start < 0 else start  # negative: counted from the end
    return slice_(self, d, start, start + length)


@lowering("aten.index_select.default")
def index_select(self, dim, index):
    # a 0-d index selects one entry but keeps the dim (size 1), unlike jnp.take
    return jnp.take(self, jnp.atleast_1d(index), axis=_dim(dim, self.ndim))


@lowering("aten.index.Tensor")
def index(self, indices):
    idx = tuple(slice(None) if i is None else i for i in indices)
    return self[idx]


@lowering("aten.gather.default")
def gather(self, dim, index, *, sparse_grad=False):
    d = _dim(dim, self.ndim)
    src = self[tuple(slice(0, s) if a != d else slice(None) for a, s in enumerate(index.shape))]
    return jnp.take_along_axis(src, index, axis=d)
