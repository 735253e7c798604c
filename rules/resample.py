"""Interpolation and pixel (un)shuffle (spec §4.2 and §8.7 applied to a fixed linear map).

* Linear, bilinear, trilinear, bicubic and their antialiased forms: the output is
  ``y_o = sum_k w_ok x_idx(o,k)`` with weights that depend on the shapes only (no bias, no
  activation gate). The rule is the dense rule of that matrix (§2.1 default, §3.2/§3.5
  contrastive), exactly as for average pooling: in default mode each output cell's relevance is
  split over its taps in proportion to ``|w_ok x_idx(o,k)|``; in contrastive mode the winning and
  losing sides get the streams. Linear-family weights are non-negative, so default-mode shares
  are proportional to ``|x|`` times the weight; bicubic weights can be negative and the sign split
  then follows the contribution's sign, as for any dense layer. Repeated border taps of one output
  cell are merged into one contribution first (the matrix entry), so the rule equals the dense rule
  of the op's matrix. Conserving: nothing is absorbed (no bias).
* Nearest and nearest-exact: every output cell copies one input cell, so the map is an exact
  index map (like ``repeat``/``expand``): the rule is its VJP, each input cell receiving the sum of
  the relevance of its copies, in both modes. Decision: an input cell equal to 0 still receives its
  copies' relevance (the index-map convention of §4.3), not 0 as the dense rule would give it.
* pixel_shuffle / pixel_unshuffle: permutations, so exact index maps (§4.3).
"""

from __future__ import annotations

import jax.numpy as jnp

from dlbjax.lowerings import windows as W
from dlbjax.lowerings.resample import MODES, default_scales, out_sizes, tap_table

from ._math import linear_operator_rule
from ._registry import register
from .shape import route

__all__ = []


def _taps_map(x, nd, out, scales, mode, align_corners):
    """The op as lin(v, w): gathered taps times weights, summed (linear in v and in w)."""
    idx, w = tap_table(x, nd, out, scales, mode, align_corners)

    def lin(v, weights):
        return jnp.sum(W.gather_windows(v, idx, 0.0) * weights, axis=-1)
    return lin, jnp.asarray(w, x.dtype)


def _rule(ctx, x, nd, out, scales, mode, align_corners, R):
    lin, w = _taps_map(x, nd, out, scales, mode, align_corners)
    rel, _ = linear_operator_rule(lin, x, w, None, R, ctx.options.contrastive)
    return rel


def _interpolation(ctx, R, x, output_size, align_corners, *scales, **named):
    """Every non-nearest mode, both overloads: ``.vec`` passes ``scale_factors`` (a list or None),
    ``.default`` per-axis scales (floats or None, positional or named); the mode comes from the op."""
    mode, nd, _ = MODES[ctx.op.split(".")[1]]
    if ctx.op.endswith(".vec"):
        out, axis_scales = out_sizes(x.shape, nd, output_size, scales[0] if scales else None)
    else:
        out, axis_scales = tuple(output_size), default_scales(nd, scales, named)
    return (_rule(ctx, x, nd, out, axis_scales, mode, align_corners, R),)


_LINEAR = [f"aten.{n}.{o}" for n, (m, _, _) in MODES.items() if not m.startswith("nearest")
           for o in ("vec", "default")]
_NEAREST = [f"aten.{n}.{o}" for n, (m, _, _) in MODES.items() if m.startswith("nearest")
            for o in ("vec", "default")]
register(*_LINEAR, default=_interpolation, contrastive=_interpolation,
         section="§2.1, §3.2, §8.7 (fixed linear map)")
register(*_NEAREST, default=route, shared=True, section="§4.3 (nearest: an index map)")
register("aten.pixel_shuffle.default", "aten.pixel_unshuffle.default", default=route, shared=True,
         section="§4.3")
