"""Normalisation layers and dropout (spec §4.8, §8.10, §9.4): identity for the normalised input.

Batch norm in inference, layer/group/RMS norm (with their affine parameters as part of the op)
and dropout in eval pass relevance unchanged to their first operand; the statistics outputs of
``native_layer_norm`` and of the batch-norm kernel (mean, rstd) carry none; a negative scale does
not swap the contrastive streams (§8.10).

``attnlrp`` (bottom): layer/group norm with sigma frozen and LRP-epsilon on the remaining linear
map (beta's share absorbed), RMS norm element-wise epsilon. Written-out norms fused by
``passes/fuse.py`` keep the shared identity under attnlrp: exact up to epsilon for RMS norms
(LlamaRMSNorm, T5LayerNorm); for a written-out mean-subtracting layer norm the identity is not
AttnLRP's centred rule (a known gap: such a module is not recognised as centring).
"""

from __future__ import annotations

import jax.numpy as jnp

from ._lrp import ATTNLRP, lrp_divide
from ._math import upcast
from ._registry import RuleResult, carried, register
from .elementwise import identity

__all__ = []

register("aten._native_batch_norm_legit_no_training.default", "aten.native_layer_norm.default",
         default=identity, outputs=(0,), shared=True, section="§4.8, §8.10, §9.4")
register("aten.batch_norm.default", "aten.layer_norm.default", "aten.group_norm.default",
         "aten.rms_norm.default", "aten.dropout.default", "aten.feature_dropout.default",
         "aten.alpha_dropout.default", default=identity, shared=True, section="§4.8, §8.10, §9.4")


# ---- AttnLRP (Achtibat et al., ICML 2024): layer, group and RMS norm ---------------------------
def attnlrp_centered_norm(x, axes, gain, bias, R, eps_norm, eps):
    """AttnLRP's layer-norm rule (Sec. 3.3.3): the division by the standard deviation takes the
    identity rule, i.e. sigma is frozen at its forward value, which leaves the linear map
    ``y = w * (x - mean(x)) + beta`` with ``w = gamma / sigma``; epsilon-LRP on it:

        g = R / stab_eps(y),  R_x_i = x_i (w_i g_i - mean_j(w_j g_j))   (mean over ``axes``)

    (``x * T(g)``, T the transpose of the centred map). beta is the bias: its share
    ``sum beta g`` is returned as absorbed; ``sum R_x + absorbed = sum R y / stab(y)``.
    ``gain``/``bias``: gamma and beta broadcast to x (None: 1 and 0). Half-precision operands
    are upcast (``compute_dtype="bfloat16"``: the statistics and ratios in float32)."""
    x, gain, bias, R = upcast(x, gain, bias, R)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    sigma = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True) + eps_norm)
    w = 1 / sigma if gain is None else gain / sigma
    z = w * (x - mean)
    y = z if bias is None else z + bias
    g = lrp_divide(R.astype(y.dtype), y, eps)
    wg = w * g
    rel = x * (wg - jnp.mean(wg, axis=axes, keepdims=True))
    return rel, (None if bias is None else jnp.sum(bias * g))


def attnlrp_rms_norm(y, R, eps):
    """AttnLRP's RMS-norm rule (Sec. 3.3.3): with the root mean square frozen (identity rule),
    ``y = gamma x / rms`` is element-wise linear and bias-free, so epsilon-LRP gives
    ``R_x = R y / stab_eps(y)``: the identity up to the stabiliser."""
    y, R = upcast(y, R)
    return R * lrp_divide(jnp.ones_like(y), y, eps) * y


def _ln_axes(x, normalized_shape):
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _attnlrp_layer_norm(ctx, R, *args, **kwargs):
    """AttnLRP layer norm (:func:`attnlrp_centered_norm`) for ``layer_norm``/``native_layer_norm``
    (the mean/rstd outputs of the latter carry nothing)."""
    input, normalized_shape, weight, bias, eps = _bind(args, kwargs, _LN)
    r = R[0] if isinstance(R, tuple) else R
    rel, kept = attnlrp_centered_norm(input, _ln_axes(input, normalized_shape), weight, bias, r,
                                      eps, ctx.params.get("epsilon", 1e-6))
    return RuleResult((rel,) + (None,) * (len(args) - 1), kept)


def _attnlrp_group_norm(ctx, R, *args, **kwargs):
    """AttnLRP group norm: the layer-norm rule over each (sample, group) block, gamma and beta
    per channel (:func:`attnlrp_centered_norm` on ``[N, G, C/G, *]``)."""
    input, num_groups, weight, bias, eps = _bind(args, kwargs, _GN)
    n, c = input.shape[:2]
    shape = (n, num_groups, c // num_groups) + input.shape[2:]
    ch = (1, num_groups, c // num_groups) + (1,) * (input.ndim - 2)
    gain = None if weight is None else jnp.broadcast_to(weight.reshape(ch), shape)
    beta = None if bias is None else jnp.broadcast_to(bias.reshape(ch), shape)
    axes = tuple(range(2, len(shape)))
    rel, kept = attnlrp_centered_norm(input.reshape(shape), axes, gain, beta, R.reshape(shape),
                                      eps, ctx.params.get("epsilon", 1e-6))
    return RuleResult((rel.reshape(input.shape),) + (None,) * (len(args) - 1), kept)


def _attnlrp_rms(ctx, R, *args, **kwargs):
    """AttnLRP RMS norm (:func:`attnlrp_rms_norm`)."""
    return (attnlrp_rms_norm(ctx.out, R, ctx.params.get("epsilon", 1e-6)),) + \
        (None,) * (len(args) - 1)


# (name, default) of the arguments the rules read, in schema order
_LN = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None),
       ("eps", 1e-5))
_GN = (("input", None), ("num_groups", None), ("weight", None), ("bias", None), ("eps", 1e-5))


def _bind(args, kwargs, schema):
    return tuple(args[i] if i < len(args) else kwargs.get(name, d)
                 for i, (name, d) in enumerate(schema))


def _only_input(carries):
    if any(carried(c) for c in carries[1:]):
        return "the norm's weight or bias carries relevance; only constant affine parameters"
    return None


_AL = "AttnLRP Sec. 3.3.3"
register("aten.layer_norm.default", default=_attnlrp_layer_norm, check=_only_input,
         method=ATTNLRP, section=_AL)
register("aten.native_layer_norm.default", default=_attnlrp_layer_norm, outputs=(0,),
         check=_only_input, method=ATTNLRP, section=_AL)
register("aten.group_norm.default", default=_attnlrp_group_norm, check=_only_input,
         method=ATTNLRP, section=_AL)
register("aten.rms_norm.default", default=_attnlrp_rms, check=_only_input, method=ATTNLRP,
         section=_AL)
