"""Helpers shared by the lowering families (and the rules that mirror them)."""

from __future__ import annotations

from jax import lax

__all__ = ["HIGHEST", "reduce_axes"]

# Matrix products and convolutions run at HIGHEST so that GPUs with TF32 match CPU results.
HIGHEST = lax.Precision.HIGHEST


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _axis(dim, ndim):
    """One ATen dim as a JAX axis; torch accepts dim 0 / -1 on a 0-d tensor, which has no axis."""
    return None if ndim == 0 else _dim(dim, ndim)


def _dims(dims, ndim):
    if ndim == 0:  # torch accepts [], [0], [-1] on a 0-d tensor: nothing to reduce
        return ()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(_dim(d, ndim) for d in dims))


reduce_axes = _dims  # ATen's reduction ``dim`` argument as sorted JAX axes (all when empty)
