"""Forward of embedding lookups and embedding bags.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._table import Kind, lowering



@lowering("aten.embedding.default", kinds=Kind.INDEX_TABLE)
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return jnp.take(weight, indices, axis=0)


def embedding_bag_members(indices, offsets, n_bags, include_last_offset=False, padding_idx=-1):
    """Bag id of every index (offsets mark bag starts) and whether it counts (inside a bag and
    not ``padding_idx``). Works for offsets that are traced values."""
    pos = jnp.arange(indices.shape[0])
    starts = offsets[:n_bags]
    bag = jnp.searchsorted(starts, pos, side="right") - 1
    valid = bag >= 0
    if include_last_offset:
        valid = valid & (pos < offsets[n_bags])
    if padding_idx is not None and padding_idx >= 0:
        valid = valid & (indices != padding_idx)
    return jnp.clip(bag, 0, max(n_bags - 1, 0)), valid


@lowering("aten._embedding_bag.default", kinds=Kind.INDEX_TABLE)
def embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """``nn.EmbeddingBag`` on flat indices: bag b = sum (mode 0), mean (1) or max (2) of the rows
    of its members (times ``per_sample_weights`` in sum mode); empty bags give zeros. The three
    auxiliary outputs (offset2bag, bag_size, max_indices) have torch's shapes; their values are
    the bag ids, member counts and the row index of each maximum (or zeros)."""
    n = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    bag, valid = embedding_bag_members(indices, offsets, n, include_last_offset, padding_idx)
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None].astype(rows.dtype)
    count = jax.ops.segment_sum(valid.astype(jnp.int32), bag, num_segments=n)
    if mode == 2:
        masked = jnp.where(valid[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(masked, bag, num_segments=n)
        out = jnp.where(count[:, None] > 0, out, 0).astype(weight.dtype)
        winner = jnp.where(valid[:, None] & (masked == out[bag]), indices[:, None], -1)
        max_idx = jnp.maximum(jax.ops.segment_max(winner, bag, num_segments=n), 0)
    else:
        out = jax.ops.segment_sum(jnp.where(valid[:, None], rows, 0), bag, num_segments=n)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
        max_idx = jnp.zeros((n,), indices.dtype)
    # torch's CPU kernel (and its meta function) skip offset2bag on the float32/float16 sum path
    fast_sum = mode == 0 and (padding_idx is None or padding_idx < 0) and \
        weight.dtype in (jnp.float32, jnp.float16)
    offset2bag = jnp.zeros((0,), indices.dtype) if fast_sum else bag.astype(indices.dtype)
    return out, offset2bag, count.astype(indices.dtype), max_idx.astype(indices.dtype)


@lowering("aten._embedding_bag_forward_only.default", kinds=Kind.INDEX_TABLE)
def embedding_bag_forward_only(weight, indices, offsets, scale_grad_by_freq=False, mode=0,
                               sparse=False, per_sample_weights=None, include_last_offset=False,
                               padding_idx=-1):
    """As :func:`embedding_bag`; but in sum mode torch sizes bag_size and max_indices by
    ``offsets`` (one more than the bags with ``include_last_offset``), so they are resized here:
    the interpreter checks every output's shape against torch's."""
    out, offset2bag, bag_size, max_idx = embedding_bag(
        weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
        include_last_offset, padding_idx)
    if mode == 0 and include_last_offset:
        extra = jnp.zeros((1,), bag_size.dtype)
        bag_size = jnp.concatenate([bag_size, extra])
        max_idx = jnp.concatenate([max_idx, extra])
    return out, offset2bag, bag_size, max_idx
