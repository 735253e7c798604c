"""Forward lowering of ``aten.scaled_dot_product_attention`` kept whole (PyTorch's math path).

``softmax(q k^T * scale + mask) v`` with a boolean mask (True = attend), a float additive mask,
``is_causal`` (lower-triangular, aligned at the top-left as in PyTorch) and grouped-query
attention (``enable_gqa``: key/value heads repeated to the query heads). Query rows whose every
key is masked give zeros, as the decomposed math path does, instead of NaN.
The pieces are exposed for the relevance rule (``rules/attention.py``), which must see the same
scaled scores, additive mask and probabilities as the forward.

**Query blocks** (long sequences). The rows of attention are independent given K and V, so the
forward runs over blocks of ``QUERY_BLOCK`` (512) queries (:func:`over_query_blocks`, a
``lax.scan``): each block's [..., block, S] scores and probabilities are computed, used and
dropped, and the forward's temporary memory grows as block x S instead of L x S. A sequence of
at most one block is computed whole, exactly as before (bitwise); longer ones equal the whole
computation to rounding (each row's softmax and products are the same; only XLA's blocking of
the matmuls may differ). The relevance rules chunk the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import HIGHEST
from ._table import lowering

__all__ = ["sdpa_parts", "sdpa_forward", "repeat_kv", "additive_mask", "over_query_blocks",
           "QUERY_BLOCK"]

QUERY_BLOCK = 512  # queries per block of the forward and of the relevance rules


def repeat_kv(x, n_q_heads: int):
    """Repeat key/value heads (axis -3) so that each query head has its own (GQA)."""
    n_kv = x.shape[-3]
    if n_kv == n_q_heads:
        return x
    return jnp.repeat(x, n_q_heads // n_kv, axis=-3)


def additive_mask(attn_mask, is_causal, L, S, dtype, q_offset=0):
    """The additive mask (0 / -inf / float values) of shape broadcastable to [..., L, S], or None.

    ``q_offset``: the position of the first query row (a block of rows of a longer query, for the
    causal mask, which is aligned at the top-left of the whole [L_total, S] matrix)."""
    mask = None
    if is_causal:
        causal = (jnp.arange(L)[:, None] + q_offset) >= jnp.arange(S)[None, :]
        mask = jnp.where(causal, 0.0, -jnp.inf).astype(dtype)
    if attn_mask is not None:
        m = attn_mask
        m = jnp.where(m, 0.0, -jnp.inf).astype(dtype) if m.dtype == jnp.bool_ else m.astype(dtype)
        mask = m if mask is None else mask + m
    return mask


def sdpa_parts(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
               q_offset=0):
    """(scaled scores, additive mask or None, probabilities, key, value after GQA repetition).

    ``query`` (and ``attn_mask``'s rows) may be a block of rows starting at query position
    ``q_offset`` (:func:`over_query_blocks`)."""
    E = query.shape[-1]
    scale = 1.0 / jnp.sqrt(E).astype(query.dtype) if scale is None else scale
    if min(query.ndim, key.ndim) >= 3 and key.shape[-3] != query.shape[-3]:  # grouped-query
        key = repeat_kv(key, query.shape[-3])
        value = repeat_kv(value, query.shape[-3])
    scores = jnp.matmul(query, jnp.swapaxes(key, -1, -2), precision=HIGHEST) * scale
    mask = additive_mask(attn_mask, is_causal, query.shape[-2], key.shape[-2], scores.dtype,
                         q_offset)
    logits = scores if mask is None else scores + mask
    row_dead = jnp.all(jnp.isneginf(logits), axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(row_dead, 0.0, logits), axis=-1)
    probs = jnp.where(row_dead, 0.0, probs)
    return scores, mask, probs, key, value


def over_query_blocks(fn, rows, attn_mask, block="auto"):
    """Run ``fn`` over blocks of query rows and put the pieces together.

    ``rows``: a tuple of arrays whose axis -2 is the query axis (length L), sliced per block;
    ``attn_mask``: sliced along its axis -2 when that axis has length L (a mask broadcast along
    the queries is passed whole); ``fn(rows_block, mask_block, q_offset)`` returns
    ``(per_row, summed)``: two tuples of arrays, the first with the block's rows on axis -2
    (concatenated back into L rows), the second summed over the blocks (relevance of keys and
    values, absorbed totals). ``block="auto"`` reads ``QUERY_BLOCK`` at call time (a test may
    set it smaller). With ``block=None`` or L <= block, ``fn`` runs once on everything
    (offset 0). Otherwise a ``lax.scan`` runs the L // block full blocks (the sums are its carry,
    so no per-block copies are stacked) and a last, shorter block (L % block rows) runs after it
    on its own: no padded rows exist, so nothing can leak from padding."""
    L = rows[0].shape[-2]
    block = QUERY_BLOCK if block == "auto" else block
    if block is None or L <= block:
        return fn(rows, attn_mask, 0)
    by_rows = attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == L

    def piece(start, size):
        rb = tuple(jax.lax.dynamic_slice_in_dim(r, start, size, r.ndim - 2) for r in rows)
        mb = (jax.lax.dynamic_slice_in_dim(attn_mask, start, size, attn_mask.ndim - 2)
              if by_rows else attn_mask)
        return fn(rb, mb, start)

    n, tail = divmod(L, block)
    _, sums = jax.eval_shape(lambda: piece(0, block))

    def body(acc, i):
        per_row, summed = piece(i * block, block)
        return tuple(a + s for a, s in zip(acc, summed)), per_row

    acc, stacked = jax.lax.scan(body, tuple(jnp.zeros(s.shape, s.dtype) for s in sums),
                                jnp.arange(n))
    per_row = [jnp.moveaxis(x, 0, -3).reshape(x.shape[1:-2] + (n * block, x.shape[-1]))
               for x in stacked]
    if tail:
        last, summed = piece(n * block, tail)
        per_row = [jnp.concatenate([a, b], axis=-2) for a, b in zip(per_row, last)]
        acc = tuple(a + s for a, s in zip(acc, summed))
    return tuple(per_row), acc


@lowering("aten.scaled_dot_product_attention.default", keep_whole=True)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 *, scale=None, enable_gqa=False):
    if dropout_p:
        raise NotImplementedError("scaled_dot_product_attention with dropout_p > 0 (training mode)")
    return sdpa_forward(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def sdpa_forward(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                 block="auto"):
    """The attention output, over blocks of ``block`` queries (``"auto"``: ``QUERY_BLOCK``;
    None: all rows at once)."""
    if query.ndim < 2:
        block = None

    def rows(qs, mask, offset):
        _, _, probs, _, v = sdpa_parts(qs[0], key, value, mask, is_causal, scale, enable_gqa,
                                       offset)
        return (jnp.matmul(probs, v, precision=HIGHEST),), ()

    return over_query_blocks(rows, (query,), attn_mask, block)[0][0]
