"""Forward of creation ops (constants inside the graph). No relevance rules: their outputs are
constants; ``*_like``/``new_*`` ops depend on their input's shape only (``Kind.NON_VALUE``, §9.1).
"""

from __future__ import annotations

import jax.numpy as jnp

from dlbjax._dtypes import jnp_dtype

from ._table import Kind, lowering



def _default_dtype(dtype, *values):
    if dtype is not None:
        return jnp_dtype(dtype)
    if any(isinstance(v, float) for v in values):
        return jnp.float32
    if all(isinstance(v, bool) for v in values):
        return jnp.bool_
    return jnp_dtype("int64")


@lowering("aten.arange.start_step", "aten.arange.start")
def arange(start, end, step=1, *, dtype=None, **_):
    return jnp.arange(start, end, step, dtype=_default_dtype(dtype, start, end, step))


@lowering("aten.arange.default")
def arange_end(end, *, dtype=None, **_):
    return jnp.arange(end, dtype=_default_dtype(dtype, end))


@lowering("aten.full.default")
def full(size, fill_value, *, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, dtype=_default_dtype(dtype, fill_value))


@lowering("aten.full_like.default", kinds=Kind.NON_VALUE)
def full_like(self, fill_value, *, dtype=None, **_):
    return jnp.full(self.shape, fill_value, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.zeros.default", "aten.empty.memory_format")
def zeros(size, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.ones.default")
def ones(size, *, dtype=None, **_):
    return jnp.ones(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.zeros_like.default", "aten.empty_like.default", kinds=Kind.NON_VALUE)
def zeros_like(self, *, dtype=None, **_):
    return jnp.zeros(self.shape, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.ones_like.default", kinds=Kind.NON_VALUE)
def ones_like(self, *, dtype=None, **_):
    return jnp.ones(self.shape, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.new_zeros.default", "aten.new_empty.default", kinds=Kind.NON_VALUE)
def new_zeros(self, size, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.new_ones.default", kinds=Kind.NON_VALUE)
def new_ones(self, size, *, dtype=None, **_):
    return jnp.ones(tuple(size), dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.scalar_tensor.default", kinds=Kind.NON_VALUE)
def scalar_tensor(s, *, dtype=None, **_):
    return jnp.asarray(s, dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.empty_permuted.default", kinds=Kind.NON_VALUE)
def empty_permuted(size, physical_layout, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)
