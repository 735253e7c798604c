"""Shared formulas of the DLB rules: unit coefficients and the sign-split GEMM form.

Every DLB unit (a dense or conv output element, an add, a pooling window, a reduction) has
contributions z_i. With P = sum of the positive z, N = sum of |negative z| and T = P - N + b:

* default mode (spec §2.1) gives every positive contributor R * z / D and every negative one
  R * |z| / D with D = g+ P + g- N + |b|, the gates g from the activation table (§2.2); written as
  per-unit coefficients a (positive side) and c (negative side): R_i = a z_i+ + c z_i-;
* contrastive mode (spec §3.2, §3.5) routes the two streams to the winning or losing side with four
  coefficients, R+_i = a+ z_i+ + c+ z_i- and R-_i = a- z_i+ + c- z_i-.

For a linear operator L with weight W (dense, conv of any stride/padding/dilation/groups,
transposed conv) the per-input sums are computed without any [batch, out, in] tensor by the
sign-split GEMM form of spec §2.6: two forward products for P and N and two transposed products.
Divisions are guarded as spec §7.3 says: ``where(D > 0, R / D, 0)``, no epsilon.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ._registry import GateSpec, Streams

__all__ = ["upcast", "safe_div", "gates", "default_coeffs", "contrastive_coeffs", "unit_rule",
           "linear_operator_rule", "unbroadcast", "relu", "map_streams"]


def map_streams(fn, *Rs):
    """``fn`` applied to one relevance map, or to each stream of Streams pairs alike."""
    if isinstance(Rs[0], Streams):
        return Streams(*(fn(*rs) for rs in zip(*Rs)))
    return fn(*Rs)


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def upcast(*xs):
    """Each bfloat16/float16 array (or Streams of them) as float32; anything else unchanged.

    Under ``compute_dtype="bfloat16"``/``"float16"`` (``dlbjax/passes/precision.py``) the rules
    form their sums, denominators and ratios in float32 from the half-precision values: a product
    of two half numbers is exact in float32, so a float32 product of upcast operands is a half
    GEMM accumulated in float32. A float32 (or float64) program is untouched, bit for bit."""
    def one(x):
        if isinstance(x, Streams):
            return Streams(*(one(s) for s in x))
        if x is not None and getattr(x, "dtype", None) in _HALF:
            return x.astype(jnp.float32)
        return x
    return one(xs[0]) if len(xs) == 1 else tuple(one(x) for x in xs)


def relu(x):
    return jnp.maximum(x, 0)


def safe_div(num, den):
    """num / den where den > 0, else 0 (spec §7.3; den is a sum of non-negative terms)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def unbroadcast(r, shape):
    """Sum relevance over the axes along which an operand of ``shape`` was broadcast."""
    shape = tuple(shape)
    if tuple(r.shape) == shape:
        return r
    lead = r.ndim - len(shape)
    r = jnp.sum(r, axis=tuple(range(lead))) if lead > 0 else r
    axes = tuple(i for i, (a, b) in enumerate(zip(r.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(r, axis=axes, keepdims=True) if axes else r


def gates(T, P, N, b, gate: Optional[GateSpec]):
    """Activation gating of spec §2.1 step 2 (strict inequalities, ``is not None`` bounds).

    Returns boolean masks (g+, g-). The non-monotone test (swish/SiLU/GELU entries) runs only
    where P > 0 and N > 0 and compares f(T) with f(P + b+) and f(-(N + b-)) within ``gate.tol``.
    """
    gp = jnp.ones(T.shape, bool)
    gn = jnp.ones(T.shape, bool)
    if gate is None:
        return gp, gn
    if gate.lower is not None:
        gp = ~(T < gate.lower)
    if gate.upper is not None:
        gn = ~(T > gate.upper)
    if gate.fn is not None:
        both = (P > 0) & (N > 0)
        f = gate.fn
        bp, bn = relu(b), relu(-b)
        same_pos = both & (jnp.abs(f(T) - f(P + bp)) <= gate.tol)
        same_neg = both & ~same_pos & (jnp.abs(f(T) - f(-(N + bn))) <= gate.tol)
        gn = gn & ~same_pos
        gp = gp & ~same_neg
    return gp, gn


def default_coeffs(P, N, b, R, gate: Optional[GateSpec] = None):
    """Default-mode unit coefficients (spec §2.1): (a, c, kept), kept = R |b| / D (the bias share)."""
    T = P - N + b
    gp, gn = gates(T, P, N, b, gate)
    Pt = jnp.where(gp, P, 0)
    Nt = jnp.where(gn, N, 0)
    babs = jnp.abs(b)
    D = Pt + Nt + babs
    rd = safe_div(R, D)
    a = jnp.where(Pt > 0, rd, 0)
    c = jnp.where(Nt > 0, rd, 0)
    return a, c, rd * babs


def contrastive_coeffs(P, N, T, Rp, Rn):
    """Contrastive-mode unit coefficients (spec §3.5): (a+, c+, a-, c-).

    a+ = what each unit of positive contribution receives into R+, c+ = what each unit of negative
    contribution receives into R+; a-, c- likewise for R-. One-sided units send both streams to
    the only side; T = 0 with both sides present passes nothing; a tie R+ = R- is not aligned.
    """
    only_p = (P > 0) & (N == 0)
    only_n = (N > 0) & (P == 0)
    live = (P > 0) & (N > 0) & (T != 0)
    aligned = jnp.sign(T) == jnp.sign(Rp - Rn)
    ap = safe_div(jnp.where(only_p | (live & aligned), Rp, 0), P)
    an = safe_div(jnp.where(only_p | (live & ~aligned), Rn, 0), P)
    cp = safe_div(jnp.where(only_n | (live & ~aligned), Rp, 0), N)
    cn = safe_div(jnp.where(only_n | (live & aligned), Rn, 0), N)
    return ap, cp, an, cn


def unit_rule(zs, b, R, contrastive: bool, gate: Optional[GateSpec] = None, axis=None):
    """Units with unit weights: contributions ``zs`` (a list of arrays, or one array reduced over
    ``axis``) and an additive constant ``b``. Returns (relevance per contribution, kept).

    Used by add/sub (§4.4), average pooling (§4.2), mean/sum reductions and the generic
    contrastive rule of one-input units.
    """
    R, b = upcast(R, b)
    zs = [upcast(z) for z in zs] if axis is None else upcast(zs)
    if axis is None:
        P = sum(relu(z) for z in zs)
        N = sum(relu(-z) for z in zs)
    else:
        P = jnp.sum(relu(zs), axis=axis, keepdims=True)
        N = jnp.sum(relu(-zs), axis=axis, keepdims=True)
    b = jnp.zeros_like(P) if b is None else b

    def apply(a, c):
        if axis is None:
            return [a * relu(z) + c * relu(-z) for z in zs]
        return a * relu(zs) + c * relu(-zs)

    if not contrastive:
        a, c, kept = default_coeffs(P, N, b, R, gate)
        return apply(a, c), kept
    ap, cp, an, cn = contrastive_coeffs(P, N, P - N + b, R.positive, R.negative)
    pos, neg = apply(ap, cp), apply(an, cn)
    if axis is None:
        return [Streams(p, n) for p, n in zip(pos, neg)], None
    return Streams(pos, neg), None


def _transpose(lin: Callable, x, w, cts):
    """Stacked transposed products: [L_w^T ct for ct in cts]."""
    lt = jax.linear_transpose(lambda v: lin(v, w), jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.vmap(lambda ct: lt(ct)[0])(cts)


def linear_operator_rule(lin: Callable, x, w, b, R, contrastive: bool,
                         gate: Optional[GateSpec] = None, y=None, exact: bool = False, aw=None):
    """The dense/conv rule for a linear operator (spec §2.1/§2.6 default, §3.2/§3.5 contrastive).

    ``lin(x, w)`` is linear in x and in w (matmul, conv, transposed conv, ...), ``b`` the bias
    broadcast to the output shape (or None), ``y`` the recorded output ``lin(x, w) + b`` (computed
    if not given). Returns (R_x, kept) where kept is the bias share (an array of output shape in
    default mode; None in contrastive mode, where the bias takes no share).

    Default mode uses the magnitude form: with S = |x| |W|^T = P + N, an ungated unit has
    D = S + |b| and R_x = |x| * ((R / D) |W|) (one extra product and one transposed product; no
    cancellation anywhere). A unit gated by a monotone activation gets P = (S + y - b)/2 and
    N = (S - y + b)/2 (clamped at 0); with a = g+ R/D, c = g- R/D, u = (a + c)/2, v = (a - c)/2 the
    input relevance is |x| * (u |W|) + x * (v W). This equals the per-unit rule exactly in exact
    arithmetic: a coefficient only multiplies contributions of its own sign, and whenever a side is
    gated by a monotone bound D > S/2, so the subtraction loses at most a few ulps of D.
    Non-monotone (experimental) gates, contrastive mode and ``exact=True`` use the sign-split GEMM
    form of §2.6/§3.5 (two forward and two transposed products of [x+, x-] with W+ and W-).
    ``aw``: |w| when the caller has it precomputed (a constant weight's magnitude is computed once
    per Explainer instead of once per call: a full pass over the weights, ~15% of a BERT-base
    explanation at batch 1); used by the magnitude form only.
    """
    x, w, b, R, y, aw = upcast(x, w, b, R, y, aw)
    if not contrastive and not exact and (gate is None or gate.fn is None):
        return _magnitude_rule(lin, x, w, b, R, gate, y, aw)
    xp, xn = relu(x), relu(-x)
    wp, wn = relu(w), relu(-w)
    both = jnp.stack([xp, xn])
    fp = jax.vmap(lin, in_axes=(0, None))(both, wp)  # [x+ W+, x- W+]
    fn = jax.vmap(lin, in_axes=(0, None))(both, wn)  # [x+ W-, x- W-]
    P = fp[0] + fn[1]
    N = fp[1] + fn[0]
    b = jnp.zeros_like(P) if b is None else jnp.broadcast_to(b, P.shape).astype(P.dtype)
    if not contrastive:
        a, c, kept = default_coeffs(P, N, b, R, gate)
        coeffs = jnp.stack([a, c])
        gp_, gn_ = _transpose(lin, x, wp, coeffs), _transpose(lin, x, wn, coeffs)
        return xp * (gp_[0] + gn_[1]) + xn * (gn_[0] + gp_[1]), kept
    ap, cp, an, cn = contrastive_coeffs(P, N, P - N + b, R.positive, R.negative)
    coeffs = jnp.stack([ap, cp, an, cn])
    gp_, gn_ = _transpose(lin, x, wp, coeffs), _transpose(lin, x, wn, coeffs)
    pos = xp * (gp_[0] + gn_[1]) + xn * (gn_[0] + gp_[1])
    neg = xp * (gp_[2] + gn_[3]) + xn * (gn_[2] + gp_[3])
    return Streams(pos, neg), None


def _magnitude_rule(lin, x, w, b, R, gate, y, aw=None):
    ax = jnp.abs(x)
    aw = jnp.abs(w) if aw is None else aw
    S = lin(ax, aw)
    babs = jnp.zeros_like(S) if b is None else jnp.abs(jnp.broadcast_to(b, S.shape)).astype(S.dtype)
    if gate is None:
        rd = safe_div(R, S + babs)
        return ax * _transpose(lin, x, aw, rd[None])[0], rd * babs
    b = jnp.zeros_like(S) if b is None else jnp.broadcast_to(b, S.shape).astype(S.dtype)
    T = lin(x, w) + b if y is None else jnp.asarray(y, S.dtype)
    P = relu((S + (T - b)) / 2)
    N = relu((S - (T - b)) / 2)
    gp, gn = gates(T, P, N, b, gate)
    D = jnp.where(gp, P, 0) + jnp.where(gn, N, 0) + babs
    rd = safe_div(R, D)
    a, c = jnp.where(gp, rd, 0), jnp.where(gn, rd, 0)
    u = _transpose(lin, x, aw, ((a + c) / 2)[None])[0]
    v = _transpose(lin, x, w, ((a - c) / 2)[None])[0]
    # |x| u + x v cancels exactly for an input whose every contribution is gated off; in floats
    # it leaves +-ulp residues, and relevance is non-negative (spec §7.2.4): clamp at 0
    return jnp.maximum(ax * u + x * v, 0), rd * babs
