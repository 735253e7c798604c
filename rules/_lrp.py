"""LRP unit formulas (the LRP family of rule methods) and the methods' declarations.

Every affine op (dense, conv of any stride/padding/dilation/groups, transposed conv, a product
with a constant) is ``z = L_W(x) + b`` with ``L`` linear in x and in W; a rule here takes ``lin``
(``lin(x, W) = L_W(x)``), x, W, the bias broadcast to the output (or None), the output relevance R
and the method's parameters, and returns (input relevance, relevance kept by the bias). The
transposed products are ``jax.linear_transpose`` of ``lin``, so every conv variant is exact.

Notation: ``x+ = max(x, 0)``, ``x- = min(x, 0)`` (same for W and b), ``T_W(g)`` the transpose of
``x -> L_W(x)`` applied to g, and ``stab(z) = z + s * sign(z)`` with ``sign(0) = +1``, the
stabiliser of Zennit (Anders et al. 2021), whose presets the tests compare with:

* ``lrp-0`` (Bach et al. 2015): ``R_x = x * T_W(R / z)`` (0 where z = 0);
* ``lrp-epsilon`` (Bach et al. 2015): ``R_x = x * T_W(R / stab_eps(z))``;
* ``lrp-alpha-beta`` (Bach et al. 2015; alpha - beta = 1, alpha=1, beta=0 is z-plus,
  Montavon et al. 2017): ``z+ = L_W+(x+) + L_W-(x-) + b+``, ``z- = L_W-(x+) + L_W+(x-) + b-``,
  ``R_x = alpha [x+ T_W+(R/z+) + x- T_W-(R/z+)] - beta [x+ T_W-(R/z-) + x- T_W+(R/z-)]``;
* ``lrp-gamma`` (Montavon et al. 2019, generalised to signed inputs as Andéol et al. 2021 and
  Zennit do): with ``W^+_g = W + g W+`` and ``W^-_g = W + g W-`` (the bias alike), units whose
  output is positive distribute ``R / (L_{W^+_g}(x+) + L_{W^-_g}(x-) + b^+_g)`` through
  ``x+ T_{W^+_g} + x- T_{W^-_g}``, negative ones ``R / (L_{W^-_g}(x+) + L_{W^+_g}(x-) + b^-_g)``
  through ``x+ T_{W^-_g} + x- T_{W^+_g}``;
* ``flat`` (Lapuschkin et al. 2019): ``R_x = T_1(R / L_1(1))`` (weights and inputs set to one,
  no bias): relevance spread uniformly over each unit's receptive field;
* ``w-square`` (Montavon et al. 2017): ``R_x = T_{W^2}(R / (L_{W^2}(1) + b^2))``;
* ``zb`` (z^B, Montavon et al. 2017) for inputs bounded in [low, high]:
  ``z = L_W(x) - L_W+(low) - L_W-(high)``, ``R_x = x T_W(R/z) - low T_W+(R/z) - high T_W-(R/z)``;
* the z-rule of sums, average pools and mean/sum reductions (Zennit's ``Norm``):
  ``R_i = x_i * T_f(R / stab(f(x)))`` for the op f, each operand's share of the output.

Decision (the LRP papers write the formulas per unit, not the zero case): a unit whose
(stabilised) denominator is exactly 0 passes nothing; its relevance is lost and shows in the
conservation report. The bias share (``R b / z`` summed) is reported as absorbed; the epsilon
and stabiliser leak is what the report calls lost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._registry import DLB, declare_method

__all__ = ["LRP", "ATTNLRP", "LRP_METHODS", "FIRST_LAYER_METHODS", "UNITS", "stabilize", "lrp_divide",
           "z_rule"]

LRP = "lrp"  # the family's base: z-rule sums and pools, method-independent DLB rules
declare_method(LRP, parent=DLB, dlb="shared",
               doc="base of the LRP family: z-rule for sums, average pools and reductions")
LRP_METHODS = ("lrp-0", "lrp-epsilon", "lrp-gamma", "lrp-alpha-beta", "flat", "w-square", "zb")
# rules meant for the layer that reads the input (a composite places them there)
FIRST_LAYER_METHODS = ("flat", "w-square", "zb")
for _name in LRP_METHODS:
    declare_method(_name, parent=LRP, dlb="shared", doc=f"LRP rule {_name} on every affine op")
# AttnLRP (Achtibat et al., ICML 2024): LRP-epsilon for affine layers plus its own rules for
# softmax, attention's products, layer/RMS norm (registered beside those ops)
ATTNLRP = "attnlrp"
declare_method(ATTNLRP, parent="lrp-epsilon", dlb="shared",
               doc="AttnLRP: epsilon for affine ops, softmax/attention/norm rules for transformers")


def stabilize(z, s):
    """``z + s * sign(z)`` with sign(0) = +1 (Zennit's stabiliser)."""
    return z + s * jnp.where(z >= 0, 1, -1).astype(z.dtype)


def lrp_divide(R, z, s):
    """R / stab_s(z), and 0 where the denominator is exactly 0."""
    d = stabilize(z, s) if s else z
    ok = d != 0
    return jnp.where(ok, R / jnp.where(ok, d, 1), 0)


def _pos(a):
    return None if a is None else jnp.maximum(a, 0)


def _neg(a):
    return None if a is None else jnp.minimum(a, 0)


def _plus(z, b):
    return z if b is None else z + b


def _kept(b, g):
    return None if b is None else jnp.sum(b * g)


def _transpose(lin, x, w):
    """g -> T_w(g): the transpose of ``u -> lin(u, w)`` at x's shape."""
    t = jax.linear_transpose(lambda u: lin(u, w), jax.ShapeDtypeStruct(x.shape, x.dtype))
    return lambda g: t(g.astype(x.dtype))[0]


def _epsilon(lin, x, w, b, R, p, eps=None):
    eps = p.get("epsilon", 1e-6) if eps is None else eps
    g = lrp_divide(R, _plus(lin(x, w), b), eps)
    return x * _transpose(lin, x, w)(g), _kept(b, g)


def _lrp0(lin, x, w, b, R, p):
    return _epsilon(lin, x, w, b, R, p, eps=0.0)


def _alpha_beta(lin, x, w, b, R, p):
    alpha, beta = float(p.get("alpha", 1.0)), float(p.get("beta", 0.0))
    s = p.get("stabilizer", 1e-6)
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
    tp, tn = _transpose(lin, x, wp), _transpose(lin, x, wn)
    gp = lrp_divide(R, _plus(lin(xp, wp) + lin(xn, wn), _pos(b)), s)
    rel = alpha * (xp * tp(gp) + xn * tn(gp))
    kept = None if b is None else alpha * jnp.sum(_pos(b) * gp)
    if beta:
        gn = lrp_divide(R, _plus(lin(xp, wn) + lin(xn, wp), _neg(b)), s)
        rel = rel - beta * (xp * tn(gn) + xn * tp(gn))
        if b is not None:
            kept = kept - beta * jnp.sum(_neg(b) * gn)
    return rel, kept


def _gamma(lin, x, w, b, R, p):
    gamma, s = float(p.get("gamma", 0.25)), p.get("stabilizer", 1e-6)
    xp, xn = _pos(x), _neg(x)
    wup, wdn = w + gamma * _pos(w), w + gamma * _neg(w)
    bup = None if b is None else b + gamma * _pos(b)
    bdn = None if b is None else b + gamma * _neg(b)
    z = _plus(lin(x, w), b)
    tup, tdn = _transpose(lin, x, wup), _transpose(lin, x, wdn)
    gu = jnp.where(z > 0, lrp_divide(R, _plus(lin(xp, wup) + lin(xn, wdn), bup), s), 0)
    gd = jnp.where(z < 0, lrp_divide(R, _plus(lin(xp, wdn) + lin(xn, wup), bdn), s), 0)
    rel = xp * tup(gu) + xn * tdn(gu) + xp * tdn(gd) + xn * tup(gd)
    kept = None if b is None else jnp.sum(bup * gu) + jnp.sum(bdn * gd)
    return rel, kept


def _flat(lin, x, w, b, R, p):
    ones_x, ones_w = jnp.ones_like(x), jnp.ones_like(w)
    g = lrp_divide(R, lin(ones_x, ones_w), p.get("stabilizer", 1e-6))
    return _transpose(lin, x, ones_w)(g), None


def _w_square(lin, x, w, b, R, p):
    w2 = w * w
    g = lrp_divide(R, _plus(lin(jnp.ones_like(x), w2), None if b is None else b * b),
                   p.get("stabilizer", 1e-6))
    return _transpose(lin, x, w2)(g), _kept(None if b is None else b * b, g)


def _zb(lin, x, w, b, R, p):
    low = jnp.broadcast_to(jnp.asarray(p.get("low", 0.0), x.dtype), x.shape)
    high = jnp.broadcast_to(jnp.asarray(p.get("high", 1.0), x.dtype), x.shape)
    wp, wn = _pos(w), _neg(w)
    # the bias cancels: b - b+ - b- = 0 (Zennit's ZBox keeps it in all three terms)
    g = lrp_divide(R, lin(x, w) - lin(low, wp) - lin(high, wn), p.get("stabilizer", 1e-6))
    rel = x * _transpose(lin, x, w)(g) - low * _transpose(lin, x, wp)(g) \
        - high * _transpose(lin, x, wn)(g)
    return rel, None


# method -> unit rule of an affine op
UNITS = {"lrp-0": _lrp0, "lrp-epsilon": _epsilon, "lrp-gamma": _gamma,
         "lrp-alpha-beta": _alpha_beta, "flat": _flat, "w-square": _w_square, "zb": _zb}


def z_rule(f, xs, R, s):
    """Zennit's ``Norm`` for an op f linear in its operands ``xs`` (a tuple): each operand gets
    ``x * T_f(R / stab_s(f(xs)))``. Returns one relevance map per operand."""
    out, vjp = jax.vjp(f, *xs)
    g = lrp_divide(R, out, s)
    return tuple(x * t for x, t in zip(xs, vjp(g.astype(out.dtype))))
