"""Embedding lookups and embedding bags (spec §4.4, §4.6, §8.6, §9.3).

``embedding(weight, indices)``: the relevance of output row (.., t, :) goes entirely to position
(.., t) of the indices; the token score is the **sum** over the hidden axis (conserving; the
original's TF path took the mean). The same id at two positions gets two separate scores. The
[.., T, H] map stays available as the embedding output's layer relevance.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dlbjax.lowerings.embedding import embedding_bag_members

from ._math import contrastive_coeffs, default_coeffs, map_streams, relu
from ._registry import Streams, carried, register
from .elementwise import gate_shares

__all__ = []


def _embedding(ctx, R, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return None, jnp.sum(R, axis=-1)


def _check(carries):
    if carried(carries[0]):
        return "the embedding table carries relevance; only a constant table is supported"
    return None


register("aten.embedding.default", default=_embedding, check=_check, shared=True,
         section="§4.6, §9.3")


# ------------------------------------------------------------------------------------------------
# EmbeddingBag
# ------------------------------------------------------------------------------------------------
def _embedding_bag(ctx, R, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """``nn.EmbeddingBag`` (§4.4, §4.6, §4.2): every feature of bag b is a unit over its members'
    contributions v_m = w_m E[idx_m] (w_m = 1 without per-sample weights; the mean's divisor is a
    constant scale and changes nothing). Sum/mean: the add rule, R_m ∝ |v_m| (default) or §3.2
    with unit weights (contrastive); max: the member holding the maximum gets it, ties split
    (§8.6), each stream alike. A member's score is the sum over features (§9.3); members outside
    every bag or equal to ``padding_idx`` get 0. With relevance-carrying per-sample weights, v_m is
    a product of two carriers: its share is split by the product rule between the weight and the
    index (each summed over features); constant weights are identity to the index."""
    R = R[0] if isinstance(R, tuple) and not isinstance(R, Streams) else R
    first = R.positive if isinstance(R, Streams) else R
    n = first.shape[0]
    bag, valid = embedding_bag_members(indices, offsets, n, include_last_offset, padding_idx)
    rows = jnp.take(weight, indices, axis=0).astype(first.dtype)
    psw = None if per_sample_weights is None else per_sample_weights.astype(first.dtype)
    v = jnp.where(valid[:, None], rows if psw is None else rows * psw[:, None], 0)
    seg = partial(jax.ops.segment_sum, segment_ids=bag, num_segments=n)
    if mode == 2:
        masked = jnp.where(valid[:, None], v, -jnp.inf)
        top = jax.ops.segment_max(masked, bag, num_segments=n)
        win = (valid[:, None] & (masked == top[bag])).astype(first.dtype)
        share = map_streams(lambda r: win * (r / jnp.maximum(seg(win), 1))[bag], R)
    elif ctx.options.contrastive:
        P, N = seg(relu(v)), seg(relu(-v))
        ap, cp, an, cn = contrastive_coeffs(P, N, P - N, R.positive, R.negative)
        share = Streams(ap[bag] * relu(v) + cp[bag] * relu(-v), an[bag] * relu(v) + cn[bag] * relu(-v))
    else:
        P, N = seg(relu(v)), seg(relu(-v))
        a, c, _ = default_coeffs(P, N, jnp.zeros_like(P), R)
        share = a[bag] * relu(v) + c[bag] * relu(-v)
    share = map_streams(lambda s: jnp.where(valid[:, None], s, 0), share)
    out = [None] * 9
    if psw is not None and ctx.carrying(6):
        if ctx.options.product_rule == "signal_take_all":
            raise ValueError("product_rule='signal_take_all' is defined only for recurrent gates; "
                             "the per-sample weights of an EmbeddingBag are not a gate")
        w_part, i_part = gate_shares(jnp.broadcast_to(psw[:, None], rows.shape), rows, share,
                                     ctx.options.product_rule)
        out[6] = map_streams(lambda r: jnp.sum(r, -1), w_part)
        share = i_part
    out[1] = map_streams(lambda r: jnp.sum(r, -1), share)
    return tuple(out)


def _bag_check(carries):
    if carried(carries[0]):
        return "the embedding table carries relevance; only a constant table is supported"
    return None


register("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default",
         default=_embedding_bag, contrastive=_embedding_bag, outputs=(0,), check=_bag_check,
         section="§4.4, §4.6, §8.6")
