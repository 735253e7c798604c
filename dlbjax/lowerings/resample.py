"""Forward of interpolation (``F.interpolate``) and pixel (un)shuffle.

Every ``upsample_*`` / ``_upsample_*_aa`` op is a fixed linear map of its input, separable over
the trailing spatial axes: output cell ``o`` of one axis reads a few input cells ``idx[o, k]``
with weights ``w[o, k]`` computed from the sizes, the mode, ``align_corners`` and the scale factors
alone (PyTorch's index and weight formulas, ``ATen/native/UpSample.h``). :func:`axis_taps` builds
those per-axis tables once at trace time in numpy; the forward applies each axis's dense
``[out, in]`` matrix in turn (nearest modes gather instead), and the relevance rule
(``rules/resample.py``) uses :func:`tap_table`, the same taps as one flat table over all axes.

Scale arithmetic follows ATen: the ``.vec`` overloads take ``output_size`` or ``scale_factors``
(then ``out = floor(in * s)`` and the map uses ``1 / s``, as torch does); the ``.default``
overloads take ``output_size`` and optional per-axis scales. Index computations run in float32
for float32/half inputs and in float64 for float64 inputs, like torch's CPU kernels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import jax.numpy as jnp
import numpy as np

from ._common import HIGHEST
from ._table import lowering, register_lowering

__all__ = ["axis_taps", "axis_matrix", "tap_table", "out_sizes", "default_scales", "resample",
           "MODES", "DUST"]

# op name -> (mode, number of spatial axes, whether the schema has align_corners)
MODES = {}
for _nd, _lin in ((1, "upsample_linear1d"), (2, "upsample_bilinear2d"), (3, "upsample_trilinear3d")):
    MODES[_lin] = ("linear", _nd, True)
    MODES[f"upsample_nearest{_nd}d"] = ("nearest", _nd, False)
    MODES[f"_upsample_nearest_exact{_nd}d"] = ("nearest-exact", _nd, False)
MODES["upsample_bicubic2d"] = ("cubic", 2, True)
MODES["_upsample_bilinear2d_aa"] = ("linear-aa", 2, True)
MODES["_upsample_bicubic2d_aa"] = ("cubic-aa", 2, True)


def _scale_value(scale, n_in: int, n_out: int, ft):
    """ATen's compute_scales_value: 1/scale when a positive scale is given, else in/out."""
    if scale is not None and scale > 0:
        return ft(1.0 / scale)
    return ft(n_in) / ft(n_out)


def _area_scale(n_in, n_out, align_corners, scale, ft):
    """ATen's area_pixel_compute_scale."""
    if align_corners:
        return ft(n_in - 1) / ft(n_out - 1) if n_out > 1 else ft(0)
    return _scale_value(scale, n_in, n_out, ft)


def _source(scale, o, align_corners, cubic, ft):
    """ATen's area_pixel_compute_source_index (vectorised over output positions o)."""
    if align_corners:
        return scale * o.astype(ft)
    src = scale * (o.astype(ft) + ft(0.5)) - ft(0.5)
    return src if cubic else np.maximum(src, ft(0))


def _cubic1(x, a):
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic2(x, a):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _aa_filter(mode):
    """torch's antialias filters: the triangle, and Keys' cubic with a = -0.5 (as PIL)."""
    if mode == "linear-aa":
        return lambda x: np.maximum(x.dtype.type(1) - np.abs(x), x.dtype.type(0))

    def cubic(x):
        a = x.dtype.type(-0.5)
        x = np.abs(x)
        return np.where(x < 1, _cubic1(x, a), np.where(x < 2, _cubic2(x, a), x.dtype.type(0)))
    return cubic


def _merge_duplicates(idx, w):
    """Sum the weights of repeated indices within an output row (clamped border taps), so each
    input cell is one contribution per output cell, as in the op's dense matrix."""
    idx, w = idx.copy(), w.copy()
    for k in range(1, idx.shape[1]):
        for j in range(k):
            same = idx[:, k] == idx[:, j]
            w[:, j] = np.where(same, w[:, j] + w[:, k], w[:, j])
            w[:, k] = np.where(same, 0.0, w[:, k])
            idx[:, k] = np.where(same, -1, idx[:, k])
    return idx, w


# Weights below this are rounding dust of an exact 0 (torch's kernels leave ~1e-8 where the
# source position falls exactly on a cell, e.g. 1/3 * 1.5 - 0.5 with a fused multiply-add). They
# are set to 0, so a cell the interpolation does not read is not a (vanishing) contributor: the
# contrastive rule's sides depend on which contributions exist, not on their size.
DUST = 1e-6


@lru_cache(maxsize=512)
def axis_taps(mode: str, n_in: int, n_out: int, align_corners: bool, scale, dtype: str):
    """Per-axis taps: (idx [n_out, K] int64 with -1 for unused taps, w [n_out, K] float64).
    Weights smaller than DUST in magnitude are 0."""
    idx, w = _axis_taps(mode, n_in, n_out, align_corners, scale, dtype)
    w = np.where(np.abs(w) < DUST, 0.0, w)
    idx = np.where(w == 0, -1, idx)
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _axis_taps(mode, n_in, n_out, align_corners, scale, dtype):
    ft = np.float64 if dtype == "float64" else np.float32
    o = np.arange(n_out)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == n_in:
            src = o
        elif mode == "nearest" and n_out == 2 * n_in:
            src = o >> 1
        else:
            s = _scale_value(scale, n_in, n_out, np.float32)  # torch: float for every dtype
            pos = o.astype(np.float32) + (np.float32(0.5) if mode == "nearest-exact" else 0)
            src = np.minimum(np.floor(pos * s).astype(np.int64), n_in - 1)
        return src[:, None].astype(np.int64), np.ones((n_out, 1))
    if mode == "linear":
        s = _area_scale(n_in, n_out, align_corners, scale, ft)
        real = _source(s, o, align_corners, False, ft)
        i0 = real.astype(np.int64)
        i1 = i0 + (i0 < n_in - 1)
        lam1 = np.clip(real - i0.astype(ft), 0, 1).astype(np.float64)
        idx, w = np.stack([i0, i1], 1), np.stack([1 - lam1, lam1], 1)
        return _merge_duplicates(idx, w)
    if mode == "cubic":
        s = _area_scale(n_in, n_out, align_corners, scale, ft)
        real = _source(s, o, align_corners, True, ft)
        base = np.floor(real)
        t = (real - base).astype(np.float64)
        a = -0.75
        w = np.stack([_cubic2(t + 1, a), _cubic1(t, a), _cubic1(1 - t, a), _cubic2(2 - t, a)], 1)
        idx = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
        return _merge_duplicates(idx, w)
    # antialiased (linear-aa, cubic-aa): a filter whose support widens when downsampling; the
    # arithmetic in torch's precision, so that weights torch computes as exactly 0 stay 0
    s = _area_scale(n_in, n_out, align_corners, scale, ft)
    half = ft(1.0 if mode == "linear-aa" else 2.0)
    support = half * s if s >= 1.0 else half
    inv = ft(1.0) / s if s >= 1.0 else ft(1.0)
    filt = _aa_filter(mode)
    rows = []
    for i in range(n_out):
        center = s * ft(i + 0.5)
        lo = max(int(center - support + ft(0.5)), 0)
        hi = min(int(center + support + ft(0.5)), n_in)
        j = np.arange(lo, hi)
        wj = filt((j.astype(ft) - center + ft(0.5)) * inv).astype(ft)
        total = wj.sum(dtype=ft)
        rows.append((j, (wj / total if total != 0 else wj).astype(np.float64)))
    k = max(1, max(len(j) for j, _ in rows))
    idx = np.full((n_out, k), -1, np.int64)
    w = np.zeros((n_out, k))
    for i, (j, wj) in enumerate(rows):
        idx[i, :len(j)] = j
        w[i, :len(j)] = wj
    return idx, w


def axis_matrix(taps, n_in: int) -> np.ndarray:
    """The dense [n_out, n_in] matrix of one axis's taps."""
    idx, w = taps
    m = np.zeros((idx.shape[0], n_in))
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    keep = idx.reshape(-1) >= 0
    np.add.at(m, (rows[keep], idx.reshape(-1)[keep]), w.reshape(-1)[keep])
    return m


def out_sizes(x_shape, nd: int, output_size, scale_factors):
    """Output spatial sizes and per-axis scales of a ``.vec`` call (ATen's compute_output_size)."""
    spatial = tuple(int(s) for s in x_shape[-nd:])
    if output_size is not None and len(output_size) > 0:
        scales = tuple(None for _ in spatial) if not scale_factors else tuple(scale_factors)
        return tuple(int(s) for s in output_size), scales
    scales = tuple(float(s) for s in scale_factors)
    if len(scales) == 1:
        scales = scales * nd
    return tuple(int(math.floor(n * s)) for n, s in zip(spatial, scales)), scales


def _spec(x, nd, out, scales, mode, align_corners):
    dtype = "float64" if x.dtype == jnp.float64 else "float32"
    spatial = tuple(int(s) for s in x.shape[-nd:])
    return [axis_taps(mode, n, int(m), bool(align_corners), None if s is None else float(s), dtype)
            for n, m, s in zip(spatial, out, scales)], spatial


@lru_cache(maxsize=256)
def _flat_table(taps_key, spatial):
    taps = [axis_taps(*k) for k in taps_key]
    nd = len(taps)
    strides = np.cumprod((1,) + spatial[::-1])[:-1][::-1]
    idx = np.zeros([t[0].shape[0] for t in taps] + [t[0].shape[1] for t in taps], np.int64)
    w = np.ones(idx.shape)
    valid = np.ones(idx.shape, bool)
    for a, (ia, wa) in enumerate(taps):
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = ia.shape
        idx = idx + (np.maximum(ia, 0) * strides[a]).reshape(shape)
        w = w * wa.reshape(shape)
        valid = valid & (ia >= 0).reshape(shape)
    out = idx.shape[:nd]
    idx = np.where(valid, idx, -1).reshape(out + (-1,))
    return idx, w.reshape(out + (-1,))


def tap_table(x, nd, out, scales, mode, align_corners):
    """All taps of the map as one table over the flattened spatial grid: (idx [*out, K] with -1
    for unused taps, w [*out, K]), K the product of the per-axis tap counts."""
    dtype = "float64" if x.dtype == jnp.float64 else "float32"
    spatial = tuple(int(s) for s in x.shape[-nd:])
    key = tuple((mode, n, int(m), bool(align_corners), None if s is None else float(s), dtype)
                for n, m, s in zip(spatial, out, scales))
    return _flat_table(key, spatial)


def resample(x, nd, out, scales, mode, align_corners=False):
    """Apply the map axis by axis (a gather for nearest modes, a matrix product otherwise)."""
    taps, spatial = _spec(x, nd, out, scales, mode, align_corners)
    y = x
    for a, (t, n) in enumerate(zip(taps, spatial)):
        axis = x.ndim - nd + a
        if mode.startswith("nearest"):
            y = jnp.take(y, jnp.asarray(t[0][:, 0], jnp.int32), axis=axis)
            continue
        work = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
        m = jnp.asarray(axis_matrix(t, n), work)
        y = jnp.moveaxis(jnp.tensordot(y.astype(work), m, axes=([axis], [1]), precision=HIGHEST),
                         -1, axis)
    return y.astype(x.dtype)


def _vec(mode, nd, has_ac):
    if has_ac:
        def fn(input, output_size, align_corners, scale_factors):
            out, scales = out_sizes(input.shape, nd, output_size, scale_factors)
            return resample(input, nd, out, scales, mode, align_corners)
    else:
        def fn(input, output_size, scale_factors):
            out, scales = out_sizes(input.shape, nd, output_size, scale_factors)
            return resample(input, nd, out, scales, mode)
    return fn


def _default(mode, nd, has_ac):
    if has_ac:
        def fn(self, output_size, align_corners, *scales, **named):
            scales = default_scales(nd, scales, named)
            return resample(self, nd, tuple(output_size), scales, mode, align_corners)
    else:
        def fn(self, output_size, *scales, **named):
            return resample(self, nd, tuple(output_size), default_scales(nd, scales, named), mode)
    return fn


_SCALE_NAMES = {1: ("scales",), 2: ("scales_h", "scales_w"), 3: ("scales_d", "scales_h", "scales_w")}


def default_scales(nd, positional, named):
    """Per-axis scales of a ``.default`` overload, given positionally or by name (None: unset)."""
    names = _SCALE_NAMES[nd]
    values = list(positional) + [None] * (nd - len(positional))
    for i, n in enumerate(names):
        if n in named:
            values[i] = named[n]
    return tuple(values)


for _name, (_mode, _nd, _ac) in MODES.items():
    register_lowering(f"aten.{_name}.vec", _vec(_mode, _nd, _ac), keep_whole=True)
    register_lowering(f"aten.{_name}.default", _default(_mode, _nd, _ac), keep_whole=True)


# ------------------------------------------------------------------------------------------------
# pixel shuffle: exact permutations
# ------------------------------------------------------------------------------------------------
@lowering("aten.pixel_shuffle.default", keep_whole=True)
def pixel_shuffle(self, upscale_factor):
    r = int(upscale_factor)
    *lead, c, h, w = self.shape
    y = self.reshape(tuple(lead) + (c // (r * r), r, r, h, w))
    n = len(lead)
    y = jnp.transpose(y, tuple(range(n)) + tuple(n + i for i in (0, 3, 1, 4, 2)))
    return y.reshape(tuple(lead) + (c // (r * r), h * r, w * r))


@lowering("aten.pixel_unshuffle.default", keep_whole=True)
def pixel_unshuffle(self, downscale_factor):
    r = int(downscale_factor)
    *lead, c, h, w = self.shape
    y = self.reshape(tuple(lead) + (c, h // r, r, w // r, r))
    n = len(lead)
    y = jnp.transpose(y, tuple(range(n)) + tuple(n + i for i in (0, 2, 4, 1, 3)))
    return y.reshape(tuple(lead) + (c * r * r, h // r, w // r))
