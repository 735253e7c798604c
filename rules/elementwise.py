"""Element-wise rules: add/sub (spec §4.4), products with constants and between activations
(§4.7, §4.8, §9.5) and activations, softmax and negation (identity plus their gating entry, §2.2,
§8.1, §9.6). Norms and dropout are in ``norm.py``, fused modules in ``fused.py``.
The LRP family's z-rule of sums (safe for -inf masks) follows the DLB add rule; ``attnlrp``
(bottom) adds the softmax rule (AttnLRP Prop. 3.1); its sums use the LRP z-rule, its activations
(identity) and gated products (R/2 each) the shared rules above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._lrp import ATTNLRP, LRP, lrp_divide
from ._math import relu, safe_div, unbroadcast, unit_rule, upcast
from ._registry import GateSpec, RuleResult, Streams, register

__all__ = ["GATES", "EXPERIMENTAL_GATES", "identity", "product_shares", "gate_shares"]


# ------------------------------------------------------------------------------------------------
# Add / subtract
# ------------------------------------------------------------------------------------------------
def _add_terms(op, args, kwargs):
    """(position, signed contribution) of each operand; position None for a Python scalar."""
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    a, b = args[0], args[1]
    if op.startswith("aten.rsub"):
        return [(0, -alpha * a), (1, b)]
    sign = -1 if op.startswith("aten.sub") else 1
    return [(0, a), (1, sign * alpha * b)]


def _add(ctx, R, *args, **kwargs):
    """Add rule (§4.4, §9.1): R_m = R |v_m| / sum_n |v_n| over the signed operand contributions;
    a constant operand is a bias: it keeps its |c| share, which is dropped (reported as absorbed).
    Broadcast operands sum their share over the broadcast axes. Zero total: nothing passes.
    Contrastive: the §3.2 rule with unit weights over the carrying operands, constants entering
    only through the sign of T (no share)."""
    out, R = upcast(ctx.out, R)  # half compute: the shares in float32
    terms = _add_terms(ctx.op, args, kwargs)
    carry_pos = [p for p, _ in terms if ctx.carrying(p)]
    zs = [jnp.broadcast_to(jnp.asarray(v, out.dtype), out.shape) for p, v in terms if p in carry_pos]
    consts = [jnp.broadcast_to(jnp.asarray(v, out.dtype), out.shape) for p, v in terms
              if p not in carry_pos]
    result = [None] * len(args)
    if not ctx.options.contrastive:
        # all operands (constants included) are contributions; constants' shares are kept
        allz = zs + consts
        P = sum(relu(z) for z in allz)
        N = sum(relu(-z) for z in allz)
        rd = safe_div(R, P + N)
        for p, z in zip(carry_pos, zs):
            result[p] = unbroadcast(rd * jnp.abs(z), jnp.shape(args[p]))
        kept = jnp.sum(rd * sum(jnp.abs(c) for c in consts)) if consts else None
        return RuleResult(tuple(result), kept)
    b = sum(consts) if consts else None
    rels, _ = unit_rule(zs, b, R, True)
    for p, r in zip(carry_pos, rels):
        shape = jnp.shape(args[p])
        result[p] = Streams(unbroadcast(r.positive, shape), unbroadcast(r.negative, shape))
    return tuple(result)


register("aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar",
         "aten.rsub.Scalar", "aten.rsub.Tensor", default=_add, contrastive=_add, section="§4.4, §9.1")


def _lrp_add(ctx, R, *args, **kwargs):
    """LRP family (rules/_lrp.py; AttnLRP inherits it): the z-rule of a sum (Zennit's ``Norm`` on
    ``Sum``): operand m gets ``R v_m / stab(sum_n v_n)`` of its signed contribution v_m; a
    constant addend keeps its share (reported as absorbed). ``stabilizer`` from the method's
    parameters (1e-6).

    Decision (written-out attention masks): where the sum is not finite (an additive -inf mask
    on the scores) nothing passes and nothing is kept (0, where the z-rule would give
    ``0 * inf`` = NaN); the softmax rule gives those logits 0 anyway."""
    out = ctx.out
    fin = jnp.isfinite(out)
    g = jnp.where(fin, lrp_divide(R, jnp.where(fin, out, 1), ctx.params.get("stabilizer", 1e-6)),
                  0)
    result, kept = [None] * len(args), None
    for p, v in _add_terms(ctx.op, args, kwargs):
        share = g * jnp.where(fin, jnp.broadcast_to(jnp.asarray(v, out.dtype), out.shape), 0)
        if ctx.carrying(p):
            result[p] = unbroadcast(share, jnp.shape(args[p]))
        else:
            kept = jnp.sum(share) if kept is None else kept + jnp.sum(share)
    return RuleResult(tuple(result), kept)


register("aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar",
         "aten.rsub.Scalar", "aten.rsub.Tensor", default=_lrp_add, method=LRP,
         section="LRP z-rule")


# ------------------------------------------------------------------------------------------------
# Products
# ------------------------------------------------------------------------------------------------
def product_shares(a, b, R, rule: str):
    """Split R over the two factors of y = a * b (spec §4.7, §9.5).

    ``"half"`` (default): R/2 to each factor whatever their values. ``"dlb"`` (MIT parity):
    R_a = R |ab - a| / (|ab - a| + |ab - b|), R_b = R - R_a, with 0/0 -> 1/2 each (§7.3).
    ``"signal_take_all"`` needs to know which factor is a gate: it is defined for the gate products
    of recurrent layers only (``rules.recurrent.gate_shares``), so a generic product of two
    activations raises ValueError with it (decision: no silent fallback to "half").
    """
    if rule == "half":
        return R / 2, R / 2
    if rule == "dlb":
        y = a * b
        da, db = jnp.abs(y - a), jnp.abs(y - b)
        tot = da + db
        fa = jnp.where(tot > 0, da / jnp.where(tot > 0, tot, 1), 0.5)
        return R * fa, R * (1 - fa)
    if rule == "signal_take_all":
        raise ValueError("product_rule='signal_take_all' is defined only for the gates of LSTM/GRU "
                         "layers; this model also multiplies two activations elsewhere (a gated "
                         "MLP, attention, a division by an activation), where no factor is a gate. "
                         "Use product_rule='half' or 'dlb'.")
    raise ValueError(f"unknown product rule {rule!r} (use 'half' or 'dlb')")


def gate_shares(gate, signal, R, rule: str):
    """Product y = gate ⊙ signal (§4.7, §10 R4): (R_gate, R_signal), each stream split alike.

    ``"signal_take_all"``: (0, R); ``"half"``/``"dlb"``: :func:`rules.elementwise.product_shares`
    with the gate as first factor."""
    if isinstance(R, Streams):
        (gp, sp), (gn, sn) = (gate_shares(gate, signal, r, rule) for r in R)
        return Streams(gp, gn), Streams(sp, sn)
    if rule == "signal_take_all":
        return jnp.zeros_like(R), R
    return product_shares(gate, signal, R, rule)


def _mul(ctx, R, self, other):
    """Multiplication: by a constant (a scale, gamma, a 0/1 mask) the relevance goes unchanged to
    the other operand (§4.8, §9.1); between two relevance-carrying operands the product rule
    (§9.5, "half" by default). Broadcast operands sum over the broadcast axes."""
    ca, cb = ctx.carrying(0), ctx.carrying(1)
    shape_a, shape_b = jnp.shape(self), jnp.shape(other)
    if ca and cb:
        ra, rb = product_shares(jnp.broadcast_to(self, R.shape), jnp.broadcast_to(other, R.shape), R,
                                ctx.options.product_rule)
        return unbroadcast(ra, shape_a), unbroadcast(rb, shape_b)
    if ca:
        return unbroadcast(R, shape_a), None
    return None, unbroadcast(R, shape_b)


register("aten.mul.Tensor", "aten.mul.Scalar", default=_mul, section="§4.8, §9.5", shared=True)


def _div(ctx, R, self, other):
    """Division: by a constant it is identity to the numerator (§4.8); by a relevance-carrying
    tensor it is the product with the reciprocal (§4.11, §9.5)."""
    if ctx.carrying(1):
        ca = ctx.carrying(0)
        if not ca:
            return None, unbroadcast(R, jnp.shape(other))
        recip = 1.0 / jnp.broadcast_to(other, R.shape)
        ra, rb = product_shares(jnp.broadcast_to(self, R.shape), recip, R, ctx.options.product_rule)
        return unbroadcast(ra, jnp.shape(self)), unbroadcast(rb, jnp.shape(other))
    return unbroadcast(R, jnp.shape(self)), None


register("aten.div.Tensor", "aten.div.Scalar", default=_div, section="§4.8, §4.11", shared=True)


# ------------------------------------------------------------------------------------------------
# Identities: activations, norms, dropout, softmax, negation
# ------------------------------------------------------------------------------------------------
def identity(ctx, R, *args, **kwargs):
    """R_in = R_out element-wise for the first operand (§4.8): activations act only through the
    gating of their producer; norms (batch norm in inference, layer/group/RMS norm, with their
    affine parameters as part of the op), dropout in eval and softmax heads are identity; a
    negative scale does not swap the contrastive streams (§8.10)."""
    r = R[0] if isinstance(R, tuple) and not isinstance(R, Streams) else R
    return (r,) + (None,) * (len(args) - 1)


# Canonical activation table (spec §2.2): (type, lower, upper) -------------------------------------
def _swish_mit(x):
    return x * jax.nn.sigmoid(0.75 * x)


GATES = {
    "relu": GateSpec("relu", lower=0.0),
    "tanh": GateSpec("tanh", lower=-2.0, upper=2.0),
    "sigmoid": GateSpec("sigmoid", lower=-4.0, upper=4.0),
    "softmax": GateSpec("softmax", lower=-1.0, upper=2.0),
    "swish": GateSpec("swish", lower=-6.0, fn=_swish_mit),
}
EXPERIMENTAL_GATES = {
    "relu6": GateSpec("relu6", lower=0.0, upper=6.0),
    "hardsigmoid": GateSpec("hardsigmoid", lower=-3.0, upper=3.0),
    "silu": GateSpec("silu", lower=-6.0, fn=jax.nn.silu),
    "gelu": GateSpec("gelu", lower=-4.0, fn=lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": GateSpec("gelu_tanh", lower=-4.0, fn=lambda x: jax.nn.gelu(x, approximate=True)),
}


def _gate(name):
    def g(args, kwargs, options):
        return GATES[name]
    return g


def _experimental(name):
    def g(args, kwargs, options):
        return EXPERIMENTAL_GATES[name] if options.experimental_gating else None
    return g


def _hardtanh_gate(args, kwargs, options):
    if not options.experimental_gating:
        return None
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return GateSpec(f"hardtanh({lo},{hi})", lower=float(lo), upper=float(hi))


def _gelu_gate(args, kwargs, options):
    if not options.experimental_gating:
        return None
    return EXPERIMENTAL_GATES["gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu"]


_SECTION = "§2.2, §4.8, §8.1"
register("aten.relu.default", default=identity, shared=True, gate=_gate("relu"), section=_SECTION)
register("aten.tanh.default", default=identity, shared=True, gate=_gate("tanh"), section=_SECTION)
register("aten.sigmoid.default", default=identity, shared=True, gate=_gate("sigmoid"), section=_SECTION)
register("aten.softmax.int", "aten._softmax.default", default=identity, shared=True, gate=_gate("softmax"),
         section=_SECTION)
register("aten.relu6.default", default=identity, shared=True, gate=_experimental("relu6"), section=_SECTION)
register("aten.hardtanh.default", default=identity, shared=True, gate=_hardtanh_gate, section=_SECTION)
register("aten.hardsigmoid.default", default=identity, shared=True, gate=_experimental("hardsigmoid"),
         section=_SECTION)
register("aten.silu.default", default=identity, shared=True, gate=_experimental("silu"), section="§2.2, §9.6")
register("aten.gelu.default", default=identity, shared=True, gate=_gelu_gate, section="§2.2, §9.6")
register("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default",
         default=identity, shared=True, section="§2.2 (null entry), §4.8")
register("aten.leaky_relu.default", "aten.elu.default", "aten.selu.default", "aten.celu.default",
         "aten.softplus.default", "aten.mish.default", "aten.hardswish.default",
         "aten.log_sigmoid.default", "aten.log_softmax.int", "aten._log_softmax.default",
         "aten.neg.default", default=identity, shared=True, section="§2.2 (null entries), §4.8")


# ------------------------------------------------------------------------------------------------
# AttnLRP (Achtibat et al., ICML 2024): softmax
# ------------------------------------------------------------------------------------------------
def attnlrp_softmax(x, s, R, axis):
    """AttnLRP's softmax rule (Prop. 3.1: Taylor decomposition at the input x, the bias term
    dropped): ``R_in_i = x_i (R_i - s_i sum_j R_j)`` over the softmax axis, x the logits and s
    the output.

    Decision (masked logits): an entry whose probability is exactly 0 (a -inf mask, a large
    negative mask such as ``finfo.min``, or a logit whose exp underflows) gets 0, never
    ``0 * inf`` = NaN or ``x * R`` with a huge x: it takes no part in the output, so it is given
    no relevance, and its R_j (0 in a network, where A V's rule gives A_ij = 0 nothing) is left
    out of the sum: masking a logit is the same as removing it. Fully masked rows (all
    probabilities 0) give 0 everywhere."""
    live = (s != 0) & jnp.isfinite(x)
    tot = jnp.sum(jnp.where(live, R, 0), axis=axis, keepdims=True)
    return jnp.where(live, jnp.where(live, x, 0) * (R - s * tot), 0)


def _attnlrp_softmax(ctx, R, self, dim, *args, **kwargs):
    """AttnLRP softmax rule (:func:`attnlrp_softmax`) for ``softmax.int``/``_softmax``."""
    s = ctx.out
    x = self.astype(s.dtype)
    axis = dim % x.ndim if x.ndim else 0
    return (attnlrp_softmax(x, s, R.astype(s.dtype), axis).astype(self.dtype),) + \
        (None,) * (1 + len(args))


register("aten.softmax.int", "aten._softmax.default", default=_attnlrp_softmax, method=ATTNLRP,
         section="AttnLRP Prop. 3.1")

