"""Static window index maps for pooling, shared by the forward lowerings and the relevance rules.

A pool over the trailing ``d`` spatial axes of ``x`` is described by an integer table
``idx[*out_spatial, K]`` of flat positions into the (unpadded) spatial grid, with ``-1`` where a
window cell lies in the padding or past the end. :func:`gather_windows` turns ``x[..., *spatial]``
into ``x[..., *out_spatial, K]`` (padding cells take ``fill``) and its VJP is the exact scatter-add
back onto the cells, so every pooling rule routes relevance with exact index maps. The tables are
numpy arrays computed once at trace time from static shapes.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["pool_out_size", "sliding_windows", "adaptive_windows", "avg_divisors", "gather_windows",
           "as_tuple"]


def as_tuple(v, d: int) -> tuple[int, ...]:
    if v is None:
        return (None,) * d
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            return (None,) * d
        if len(v) == 1:
            return (int(v[0]),) * d
        return tuple(int(x) for x in v)
    return (int(v),) * d


def pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size formula, including its ceil_mode correction."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return max(out, 0)


def _combine(per_dim: Sequence[list[list[int]]], spatial: Sequence[int]) -> np.ndarray:
    """Cartesian product of per-dimension windows -> flat-index table [*out, K] (-1 = padding)."""
    out_sizes = [len(w) for w in per_dim]
    k_sizes = [max(len(c) for c in w) for w in per_dim]
    strides = np.cumprod([1] + list(spatial[::-1]))[:-1][::-1]
    table = np.full(out_sizes + [int(np.prod(k_sizes))], -1, dtype=np.int64)
    for out_idx in itertools.product(*[range(n) for n in out_sizes]):
        cells = [per_dim[a][o] + [-1] * (k_sizes[a] - len(per_dim[a][o])) for a, o in enumerate(out_idx)]
        for j, combo in enumerate(itertools.product(*cells)):
            if all(c >= 0 for c in combo):
                table[out_idx + (j,)] = int(sum(c * st for c, st in zip(combo, strides)))
    return table


@lru_cache(maxsize=256)
def sliding_windows(spatial: tuple, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
                    ceil_mode: bool) -> np.ndarray:
    """Flat-index table of a max/avg pool (PyTorch semantics; -1 marks padding cells)."""
    per_dim = []
    for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation):
        n = pool_out_size(size, k, s, p, d, ceil_mode)
        wins = []
        for o in range(n):
            start = o * s - p
            wins.append([start + j * d if 0 <= start + j * d < size else -1 for j in range(k)])
        per_dim.append(wins)
    return _combine(per_dim, spatial)


@lru_cache(maxsize=256)
def adaptive_windows(spatial: tuple, out: tuple) -> np.ndarray:
    """PyTorch's adaptive pooling windows: [floor(o*L/O), ceil((o+1)*L/O))."""
    per_dim = []
    for size, n in zip(spatial, out):
        per_dim.append([list(range((o * size) // n, -(-((o + 1) * size) // n))) for o in range(n)])
    return _combine(per_dim, spatial)


@lru_cache(maxsize=256)
def avg_divisors(spatial: tuple, kernel: tuple, stride: tuple, padding: tuple, ceil_mode: bool,
                 count_include_pad: bool, divisor_override) -> np.ndarray:
    """The divisor PyTorch's avg_pool uses for each output position."""
    per_dim_pad, per_dim_valid = [], []
    for size, k, s, p in zip(spatial, kernel, stride, padding):
        n = pool_out_size(size, k, s, p, 1, ceil_mode)
        pad_sizes, valid_sizes = [], []
        for o in range(n):
            start = o * s - p
            end = min(start + k, size + p)
            pad_sizes.append(end - start)
            valid_sizes.append(min(end, size) - max(start, 0))
        per_dim_pad.append(pad_sizes)
        per_dim_valid.append(valid_sizes)
    if divisor_override:
        shape = [len(v) for v in per_dim_pad]
        return np.full(shape, float(divisor_override))
    sizes = per_dim_pad if count_include_pad else per_dim_valid
    grid = np.ones([len(v) for v in sizes])
    for a, v in enumerate(sizes):
        shape = [1] * len(sizes)
        shape[a] = len(v)
        grid = grid * np.asarray(v, dtype=np.float64).reshape(shape)
    return grid


def gather_windows(x: jnp.ndarray, table: np.ndarray, fill) -> jnp.ndarray:
    """x[..., *spatial] -> x[..., *out, K] with padding cells set to ``fill``."""
    d = table.ndim - 1
    lead = x.shape[: x.ndim - d]
    flat = x.reshape(lead + (-1,))
    n = flat.shape[-1]
    padded = jnp.concatenate([flat, jnp.full(lead + (1,), fill, dtype=x.dtype)], axis=-1)
    idx = np.where(table < 0, n, table)
    return jnp.take(padded, jnp.asarray(idx.reshape(-1), dtype=jnp.int32), axis=-1).reshape(
        lead + table.shape)
