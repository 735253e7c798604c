"""Embedding lookup (spec §4.6, §9.3).

``embedding(weight, indices)``: the relevance of output row (.., t, :) goes entirely to position
(.., t) of the indices; the token score is the **sum** over the hidden axis (conserving; the
original's TF path took the mean). The same id at two positions gets two separate scores. The
[.., T, H] map stays available as the embedding output's layer relevance.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._registry import carried, register

__all__ = []


def _embedding(ctx, R, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return None, jnp.sum(R, axis=-1)


def _check(carries):
    if carried(carries[0]):
        return "the embedding table carries relevance; only a constant table is supported"
    return None


register("aten.embedding.default", default=_embedding, check=_check, section="§4.6, §9.3")
