"""Forward lowering of ``aten.scaled_dot_product_attention`` kept whole (PyTorch's math path).

``softmax(q k^T * scale + mask) v`` with a boolean mask (True = attend), a float additive mask,
``is_causal`` (lower-triangular, aligned at the top-left as in PyTorch) and grouped-query
attention (``enable_gqa``: key/value heads repeated to the query heads). Query rows whose every
key is masked give zeros, as the decomposed math path does, instead of NaN.
The pieces are exposed for the relevance rule (``rules/attention.py``), which must see the same
scaled scores, additive mask and probabilities as the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import HIGHEST
from ._table import lowering

__all__ = ["sdpa_parts", "repeat_kv"]


def repeat_kv(x, n_q_heads: int):
    """Repeat key/value heads (axis -3) so that each query head has its own (GQA)."""
    n_kv = x.shape[-3]
    if n_kv == n_q_heads:
        return x
    return jnp.repeat(x, n_q_heads // n_kv, axis=-3)


def additive_mask(attn_mask, is_causal, L, S, dtype):
    """The additive mask (0 / -inf / float values) of shape broadcastable to [..., L, S], or None."""
    mask = None
    if is_causal:
        causal = jnp.tril(jnp.ones((L, S), bool))
        mask = jnp.where(causal, 0.0, -jnp.inf).astype(dtype)
    if attn_mask is not None:
        m = attn_mask
        m = jnp.where(m, 0.0, -jnp.inf).astype(dtype) if m.dtype == jnp.bool_ else m.astype(dtype)
        mask = m if mask is None else mask + m
    return mask


def sdpa_parts(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """(scaled scores, additive mask or None, probabilities, key, value after GQA repetition)."""
    E = query.shape[-1]
    scale = 1.0 / jnp.sqrt(E).astype(query.dtype) if scale is None else scale
    if min(query.ndim, key.ndim) >= 3 and key.shape[-3] != query.shape[-3]:  # grouped-query
        key = repeat_kv(key, query.shape[-3])
        value = repeat_kv(value, query.shape[-3])
    scores = jnp.matmul(query, jnp.swapaxes(key, -1, -2), precision=HIGHEST) * scale
    mask = additive_mask(attn_mask, is_causal, query.shape[-2], key.shape[-2], scores.dtype)
    logits = scores if mask is None else scores + mask
    row_dead = jnp.all(jnp.isneginf(logits), axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(row_dead, 0.0, logits), axis=-1)
    probs = jnp.where(row_dead, 0.0, probs)
    return scores, mask, probs, key, value


@lowering("aten.scaled_dot_product_attention.default", keep_whole=True)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 *, scale=None, enable_gqa=False):
    if dropout_p:
        raise NotImplementedError("scaled_dot_product_attention with dropout_p > 0 (training mode)")
    _, _, probs, _, value = sdpa_parts(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return jnp.matmul(probs, value, precision=HIGHEST)
