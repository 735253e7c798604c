"""Dense and convolution rules (spec §2.1-2.6, §3.2-3.5, §4.1, §8.1-8.3).

Every op here is an affine map ``y = L_W(x) + b`` of one relevance-carrying operand x with a
constant weight W: ``linear``, ``addmm``/``mm``/``bmm``/``matmul`` with a parameter operand,
convolutions of any stride, padding, dilation and groups, and transposed convolutions. Each output
element is one DLB unit with contributions z_i = W_i x_i and bias b.

Default (§2.1): R_i = sum_j R_j (g+_j [z_ji>0] + g-_j [z_ji<0]) |z_ji| / (g+_j P_j + g-_j N_j + |b_j|),
the gates g from the activation that directly and solely consumes y (§8.1; ReLU's bound 0 gates,
§8.2; conv gates on its own T = P - N + b and renormalises, §8.3). The bias keeps R_j |b_j| / D_j,
which is dropped from the explanation and reported in the conservation totals (§2.5).

Contrastive (§3.2): the larger stream goes to the contributors whose sign matches sign(T), the
smaller to the others; one-sided units send both streams to the only side; no gating, no bias share.

Both are computed in the sign-split GEMM form (§2.6): P and N from two forward products of
[x+, x-] with W+ and W-, and the input relevance from two transposed products; the transposes are
``jax.linear_transpose`` of the op itself, so every conv variant is exact by construction.

The LRP family (``lrp-0``, ``lrp-epsilon``, ``lrp-gamma``, ``lrp-alpha-beta``, ``flat``,
``w-square``, ``zb``; formulas in ``rules/_lrp.py``) registers one rule per method for the same
ops, from the same (lin, x, W, b) parts; a product of two activations has no LRP rule here.
``attnlrp`` (bottom) registers mm/bmm/matmul: the uniform epsilon rule between two activations
(``rules.attention.uniform_bilinear``), LRP-epsilon with a constant operand.
"""

from __future__ import annotations

import jax.numpy as jnp

from dlbjax.lowerings import HIGHEST
from dlbjax.lowerings.affine import conv_nd, conv_transpose_nd

from ._lrp import ATTNLRP, LRP_METHODS, UNITS
from ._math import linear_operator_rule, upcast
from ._registry import RuleResult, Streams, carried, register
from .attention import bilinear_shares, uniform_bilinear

__all__ = []


def _matmul(x, w):
    return jnp.matmul(x, w, precision=HIGHEST)


def _rmatmul(x, w):
    return jnp.matmul(w, x, precision=HIGHEST)


def _linear_lin(x, w):
    return jnp.matmul(x, w.T, precision=HIGHEST)


def _channel_bias(bias, weight, out):
    """Per-channel bias broadcast to every output position (the channel axis precedes the
    ``weight.ndim - 2`` spatial axes, batched or not)."""
    if bias is None:
        return None
    return jnp.broadcast_to(bias.reshape((-1,) + (1,) * (weight.ndim - 2)), out.shape)


def _run(ctx, R, nargs, pos, lin, x, w, b, wpos=None):
    # wpos: the argument position w comes from unchanged (its |w| may be precomputed, ctx.magnitude)
    aw = None if wpos is None else ctx.magnitude(wpos)
    rel, kept = linear_operator_rule(lin, x, w, b, R, ctx.options.contrastive, ctx.gate, y=ctx.out,
                                     aw=aw)
    out = [None] * nargs
    out[pos] = rel
    return RuleResult(tuple(out), None if kept is None else jnp.sum(kept))


def _only_first(carries):
    if any(carried(c) for c in carries[1:]):
        return ("the weight or bias carries relevance (an input-dependent weight); only a constant "
                "weight is supported here")
    return None


def _one_of_two(carries):
    a, b = carried(carries[0]), carried(carries[1])
    if a and b:
        return ("both operands carry relevance (a product of two activations); the bilinear rule "
                "of spec §4.11 is not implemented for this op yet")
    return None


# ---- linear ------------------------------------------------------------------------------------
def _linear(ctx, R, input, weight, bias=None):
    b = None if bias is None else jnp.broadcast_to(bias, ctx.out.shape)
    return _run(ctx, R, 3, 0, _linear_lin, input, weight, b, wpos=1)


register("aten.linear.default", default=_linear, contrastive=_linear, affine=True,
         check=_only_first, section="§2.1, §3.2")


# ---- addmm / mm / bmm / matmul with one constant operand ---------------------------------------
def _addmm(ctx, R, self, mat1, mat2, *, beta=1, alpha=1):
    b = jnp.broadcast_to(self * beta, ctx.out.shape)
    same = alpha == 1  # |mat * alpha| is the precomputed magnitude only for alpha = 1
    if ctx.carrying(1):
        return _run(ctx, R, 3, 1, _matmul, mat1, mat2 * alpha, b, wpos=2 if same else None)
    return _run(ctx, R, 3, 2, _rmatmul, mat2, mat1 * alpha, b, wpos=1 if same else None)


def _addmm_check(carries):
    if carried(carries[0]):
        return "the added term of addmm carries relevance; only a constant bias is supported"
    return _one_of_two(carries[1:])


register("aten.addmm.default", default=_addmm, contrastive=_addmm, affine=True, check=_addmm_check,
         section="§2.1, §3.2")


def _mm(ctx, R, self, other):
    """A product with one constant operand is a dense layer (§2.1/§3.2); between two
    relevance-carrying operands it is the bilinear rule (§4.11; O = A V in attention, §9.8)."""
    if ctx.carrying(0) and ctx.carrying(1):
        phi = ctx.options.phi
        fa, fb = {0: (1 - phi, phi), 1: (phi, 1 - phi)}.get(ctx.info.get("attention"), (0.5, 0.5))
        self, other, R = upcast(self, other, R)  # half compute: the shares in float32
        if ctx.options.contrastive:
            pa, pb = bilinear_shares(self, other, R.positive, fa, fb)
            na, nb = bilinear_shares(self, other, R.negative, fa, fb)
            return Streams(pa, na), Streams(pb, nb)
        return bilinear_shares(self, other, R, fa, fb)
    if ctx.carrying(0):
        return _run(ctx, R, 2, 0, _matmul, self, other, None, wpos=1)
    return _run(ctx, R, 2, 1, _rmatmul, other, self, None, wpos=0)


def _mm_check(carries):
    return None


register("aten.mm.default", "aten.bmm.default", "aten.matmul.default", default=_mm, contrastive=_mm,
         affine=True, check=_mm_check, section="§2.1, §3.2, §4.11")


# ---- convolutions -----------------------------------------------------------------------------
def _dlb_rule(parts):
    """The DLB rule of an affine op from its (lin, x, W, b) parts, W at argument 1."""
    def rule(ctx, R, *args, **kwargs):
        nargs, pos, lin, x, w, b = parts(ctx, *args, **kwargs)
        return _run(ctx, R, nargs, pos, lin, x, w, b, wpos=1)
    return rule


def _convolution(ctx, R, *args, **kwargs):
    return _dlb_rule(_convolution_parts)(ctx, R, *args, **kwargs)


register("aten.convolution.default", default=_convolution, contrastive=_convolution, affine=True,
         check=_only_first, section="§2.6, §4.1, §8.3")


def _conv(ctx, R, *args, **kwargs):
    return _dlb_rule(_conv_parts)(ctx, R, *args, **kwargs)


register("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
         "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding",
         default=_conv, contrastive=_conv, affine=True, check=_only_first,
         section="§2.6, §4.1, §8.3")


def _conv_transpose(ctx, R, *args, **kwargs):
    return _dlb_rule(_conv_transpose_parts)(ctx, R, *args, **kwargs)


register("aten.conv_transpose1d.default", "aten.conv_transpose2d.input",
         "aten.conv_transpose3d.input", default=_conv_transpose, contrastive=_conv_transpose,
         affine=True, check=_only_first, section="§2.6, §4.1")


# ---- the LRP family (rules/_lrp.py): the same ops, one registration per method ------------------
# each op's parts: (number of positional args, relevance-carrying position, lin, x, W, bias or None)
def _linear_parts(ctx, input, weight, bias=None):
    b = None if bias is None else jnp.broadcast_to(bias, ctx.out.shape)
    return 3, 0, _linear_lin, input, weight, b


def _addmm_parts(ctx, self, mat1, mat2, *, beta=1, alpha=1):
    b = jnp.broadcast_to(self * beta, ctx.out.shape)
    if ctx.carrying(1):
        return 3, 1, _matmul, mat1, mat2 * alpha, b
    return 3, 2, _rmatmul, mat2, mat1 * alpha, b


def _mm_parts(ctx, self, other):
    if ctx.carrying(0):
        return 2, 0, _matmul, self, other, None
    return 2, 1, _rmatmul, other, self, None


def _convolution_parts(ctx, input, weight, bias, stride, padding, dilation, transposed,
                       output_padding, groups):
    if transposed:
        def lin(x, w):
            return conv_transpose_nd(x, w, stride, padding, output_padding, groups, dilation)
    else:
        def lin(x, w):
            return conv_nd(x, w, stride, padding, dilation, groups)
    return 9, 0, lin, input, weight, _channel_bias(bias, weight, ctx.out)


def _conv_parts(ctx, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    def lin(x, w):
        return conv_nd(x, w, stride, padding, dilation, groups)
    return 7, 0, lin, input, weight, _channel_bias(bias, weight, ctx.out)


def _conv_transpose_parts(ctx, input, weight, bias=None, stride=1, padding=0, output_padding=0,
                          groups=1, dilation=1):
    def lin(x, w):
        return conv_transpose_nd(x, w, stride, padding, output_padding, groups, dilation)
    return 8, 0, lin, input, weight, _channel_bias(bias, weight, ctx.out)


def _lrp_rule(parts, method):
    unit = UNITS[method]

    def rule(ctx, R, *args, **kwargs):
        nargs, pos, lin, x, w, b = parts(ctx, *args, **kwargs)
        rel, kept = unit(lin, x, w, b, R, ctx.params)
        out = [None] * nargs
        out[pos] = rel
        return RuleResult(tuple(out), kept)

    rule.__doc__ = f"The {method} rule of an affine op (rules/_lrp.py)."
    return rule


def _lrp_mm_check(carries):
    if carried(carries[0]) and carried(carries[1]):
        return ("a product of two activations (attention scores, A @ V): the LRP rules of this "
                "method are defined for a constant weight; use method='attnlrp' (its uniform "
                "bilinear rule) or method='dlb'")
    return None


_LRP_OPS = (
    (("aten.linear.default",), _linear_parts, _only_first),
    (("aten.addmm.default",), _addmm_parts, _addmm_check),
    (("aten.mm.default", "aten.bmm.default", "aten.matmul.default"), _mm_parts, _lrp_mm_check),
    (("aten.convolution.default",), _convolution_parts, _only_first),
    (("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.conv1d.padding",
      "aten.conv2d.padding", "aten.conv3d.padding"), _conv_parts, _only_first),
    (("aten.conv_transpose1d.default", "aten.conv_transpose2d.input",
      "aten.conv_transpose3d.input"), _conv_transpose_parts, _only_first),
)
for _method in LRP_METHODS:
    for _ops, _parts, _check in _LRP_OPS:
        register(*_ops, default=_lrp_rule(_parts, _method), check=_check, method=_method,
                 section=f"LRP {_method}")


# ---- AttnLRP (rules/_lrp.py, rules/attention.py): mm / bmm / matmul -----------------------------
_attnlrp_affine_mm = _lrp_rule(_mm_parts, "lrp-epsilon")


def _attnlrp_mm(ctx, R, self, other):
    """AttnLRP on a product: between two relevance-carrying operands (Q K^T, A V written out) the
    uniform epsilon rule (``rules.attention.uniform_bilinear``: each factor half of the bilinear
    form's epsilon-LRP); with one constant operand the op is an affine layer: LRP-epsilon."""
    if ctx.carrying(0) and ctx.carrying(1):
        return uniform_bilinear(_matmul, self, other, R, ctx.params.get("epsilon", 1e-6))
    return _attnlrp_affine_mm(ctx, R, self, other)


register("aten.mm.default", "aten.bmm.default", "aten.matmul.default", default=_attnlrp_mm,
         check=_mm_check, method=ATTNLRP, section="AttnLRP Sec. 3.3.2, LRP-eps")
