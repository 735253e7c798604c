"""Attention and products of two activations (spec §4.9 canonical, §4.11, §9.8-9.10, §9.16).

**Bilinear rule** (§4.11, §4.9 step 4). For C = A B between two relevance-carrying tensors, each
C[t, e] is a bias-free unit over the contraction index k with contributions A[t, k] B[k, e]; its
relevance is shared over k in proportion to |A[t, k] B[k, e]| and each pair's share is split between
the two factors with fractions (f_A, f_B):

    G = R / (|A| |B|)   (0 where the total is 0, §9.16)
    R_A = f_A |A| * (G |B|^T),   R_B = f_B |B| * (|A|^T G)

(f_A, f_B) = (1/2, 1/2) for a generic product; in O = A V with A the attention probabilities
(the output of a softmax, through casts/dropout/reshapes) A gets 1 - phi and V gets phi
(§9.8; phi = ``attention_value_fraction``, default 1/2).

**scaled_dot_product_attention kept whole** is exactly the composition of the generic rules over
its math decomposition (§9.8): the bilinear rule for O = A V (A: 1 - phi, V: phi), identity through
softmax, the add rule for the additive mask at score level (scores keep |S| / (|S| + |m|) of the
relevance; the mask's share is dropped and reported as absorbed; for 0/-inf boolean and causal
masks nothing is dropped at attended positions and masked keys get exactly 0, §9.9, §9.10),
identity through the scale, the bilinear rule (1/2, 1/2) for S = Q K^T, and sums over repeated
key/value heads for grouped-query attention. All maps are non-negative and the totals with
phi = 1/2 and no float mask are V 1/2, Q 1/4, K 1/4.

AttnLRP (``method="attnlrp"``, bottom of the file): :func:`uniform_bilinear` (the uniform epsilon
rule of a product of two activations) and :func:`attnlrp_sdpa` (SDPA kept whole as the
composition of AttnLRP's rules over its written-out form).

Contrastive mode (§9.17, experimental): each stream is split with the same shares; the mask add
is a one-sided unit for each stream, so both streams pass to the scores whole (the mask takes no
share, like a bias in §3.2).

**Long sequences: query blocks** (§9.8, issue 15). Every quantity of both rules (the scores,
mask, probabilities, G = R / (|A| |V|), the score-level split and the Q K^T shares) belongs to one
query row given K and V, so both rules run over blocks of ``block`` queries
(:func:`dlbjax.lowerings.attention.over_query_blocks`, a ``lax.scan``): each block recomputes its
[..., block, S] scores and probabilities from Q's rows, K and V, gives its rows' R_Q, and adds its
share of R_K, R_V and the absorbed total to sums carried over the blocks. Temporary memory per
layer is O(block x S) instead of several [..., L, S] tensors. The default ``block="auto"`` is
``dlbjax.lowerings.attention.QUERY_BLOCK`` = 512 queries (read at call time), the forward
lowering's block: a sequence of at most 512 queries is computed whole, bitwise as the unchunked
rule (``block=None``, kept as the reference); longer ones equal it to rounding (the sums over
queries are split across blocks; tests/test_attention_chunks.py).
A last block shorter than ``block`` runs on its own after the scan (no padded rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlbjax.lowerings import HIGHEST
from dlbjax.lowerings.attention import over_query_blocks, sdpa_parts

from ._lrp import ATTNLRP, lrp_divide
from ._math import safe_div, unbroadcast
from ._registry import RuleResult, Streams, register
from .elementwise import attnlrp_softmax

__all__ = ["bilinear_shares", "sdpa_relevance", "uniform_bilinear", "attnlrp_sdpa"]


def _mt(x):
    return jnp.swapaxes(x, -1, -2)


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def bilinear_shares(a, b, R, fa=0.5, fb=0.5):
    """(R_a, R_b) for C = a @ b (both with at least 2 dims; batch dims broadcast)."""
    A, B = jnp.abs(a), jnp.abs(b)
    G = safe_div(R, _mm(A, B))
    ra = fa * A * _mm(G, _mt(B))
    rb = fb * B * _mm(_mt(A), G)
    return unbroadcast(ra, a.shape), unbroadcast(rb, b.shape)


def _fold_heads(r, n_kv):
    """Sum relevance of repeated key/value heads (axis -3) back into their source head."""
    if r.ndim < 3 or r.shape[-3] == n_kv:  # head-less (2-D) or one key/value head per query head
        return r
    h = r.shape[-3]
    if h == n_kv:
        return r
    rep = h // n_kv
    return r.reshape(r.shape[:-3] + (n_kv, rep) + r.shape[-2:]).sum(axis=-3)


def _blocked(rule, R, query, key, value, attn_mask, block):
    """``rule(R, query, attn_mask, q_offset) -> (R_q, R_k, R_v, absorbed)`` over query blocks
    (module docstring: R_q per row, the rest summed)."""
    if query.ndim < 2:
        block = None

    def rows(rq, mask, offset):
        r, q = rq
        R_q, R_k, R_v, absorbed = rule(r, q, mask, offset)
        return (R_q,), (R_k, R_v, absorbed)

    (R_q,), (R_k, R_v, absorbed) = over_query_blocks(rows, (R, query), attn_mask, block)
    return R_q, R_k, R_v, absorbed


def sdpa_relevance(R, query, key, value, attn_mask=None, is_causal=False, scale=None,
                   enable_gqa=False, phi=0.5, contrastive=False, block="auto"):
    """Relevance of (query, key, value) and the mask's absorbed share for one stream, over
    blocks of ``block`` queries (``"auto"``: ``QUERY_BLOCK``, ``None``: all at once; module
    docstring, "Long sequences")."""
    def rule(r, q, mask, offset):
        return _sdpa_rows(r, q, key, value, mask, is_causal, scale, enable_gqa, phi, contrastive,
                          offset)
    return _blocked(rule, R, query, key, value, attn_mask, block)


def _sdpa_rows(R, query, key, value, attn_mask, is_causal, scale, enable_gqa, phi, contrastive,
               q_offset):
    """:func:`sdpa_relevance` of the query rows from position ``q_offset`` (all rows when 0 and
    the query is whole)."""
    scores, mask, probs, k_rep, v_rep = sdpa_parts(query, key, value, attn_mask, is_causal, scale,
                                                  enable_gqa, q_offset)
    R_a, R_v = bilinear_shares(probs, v_rep, R, 1.0 - phi, phi)
    absorbed = jnp.zeros((), R.dtype)
    if mask is None:
        R_s = R_a
    elif contrastive:
        R_s = jnp.where(scores != 0, R_a, 0)
    else:
        s_abs = jnp.abs(scores)
        m_abs = jnp.broadcast_to(jnp.abs(mask), scores.shape)
        rd = safe_div(R_a, s_abs + m_abs)
        R_s = rd * s_abs
        absorbed = jnp.sum(jnp.where(rd > 0, rd * m_abs, 0))
    R_q, R_kt = bilinear_shares(query, _mt(k_rep), R_s)
    R_k = _fold_heads(_mt(R_kt), key.shape[-3] if key.ndim >= 3 else None)
    R_v = _fold_heads(R_v, value.shape[-3] if value.ndim >= 3 else None)
    return (unbroadcast(R_q, query.shape), unbroadcast(R_k, key.shape),
            unbroadcast(R_v, value.shape), absorbed)


def _sdpa_check(carries):
    if len(carries) > 3 and carries[3]:
        return "the attention mask carries relevance; only constant masks are supported"
    return None


def _sdpa(ctx, R, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
          scale=None, enable_gqa=False):
    contrastive = ctx.options.contrastive
    streams = R if contrastive else (R,)
    results, kept = [], None
    for r in streams:
        q, k, v, absorbed = sdpa_relevance(r, query, key, value, attn_mask, is_causal, scale,
                                           enable_gqa, ctx.options.phi, contrastive)
        results.append((q, k, v))
        if not contrastive:
            kept = absorbed
    if contrastive:
        (q1, k1, v1), (q2, k2, v2) = results
        q, k, v = Streams(q1, q2), Streams(k1, k2), Streams(v1, v2)
    else:
        q, k, v = results[0]
    return RuleResult(tuple(r if ctx.carrying(i) else None for i, r in enumerate((q, k, v))), kept)


register("aten.scaled_dot_product_attention.default", default=_sdpa, contrastive=_sdpa,
         check=_sdpa_check, section="§4.9, §9.8-9.10")


# ------------------------------------------------------------------------------------------------
# AttnLRP (Achtibat et al., ICML 2024): the uniform rule for products, SDPA kept whole
# ------------------------------------------------------------------------------------------------
def uniform_bilinear(f, a, b, R, eps):
    """AttnLRP's uniform epsilon rule for a product ``O = f(a, b)`` bilinear in two
    relevance-carrying operands (Sec. 3.3.2: the bilinear form's epsilon-LRP, each factor half):
    for O = A B, ``R_A[i,j] = sum_k A_ij B_jk R_ik / stab(2 O_ik)`` and
    ``R_B[j,k] = sum_i A_ij B_jk R_ik / stab(2 O_ik)``, computed as ``A * (G B^T)`` and
    ``B * (A^T G)`` with ``G = R / stab_eps(2 O)`` (the VJP of f: no [i, j, k] tensor; batch axes
    and broadcasting come with it). ``sum R_A + sum R_B = sum R 2O / stab(2O)``: conserving up to
    the stabiliser (0 where 2O = 0 and eps = 0)."""
    out, vjp = jax.vjp(f, a, b)
    g = lrp_divide(R.astype(out.dtype), 2 * out, eps)
    ga, gb = vjp(g)
    return a * ga, b * gb


def attnlrp_sdpa(R, query, key, value, attn_mask=None, is_causal=False, scale=None,
                 enable_gqa=False, epsilon=1e-6, stabilizer=1e-6, block="auto"):
    """AttnLRP relevance of (query, key, value) through SDPA kept whole, and the additive mask's
    kept share. The rule is the composition of AttnLRP's rules over the written-out form
    ``O = softmax(scale * (Q K^T) + mask) V`` (as Hugging Face's eager attention writes it):

    1. O = A V: :func:`uniform_bilinear` (epsilon) -> R_A, R_V;
    2. A = softmax(L), L the logits: the softmax rule (Prop. 3.1,
       :func:`rules.elementwise.attnlrp_softmax`) -> R_L; masked keys (probability 0) get 0;
    3. L = S + mask: a boolean or causal mask (0 / -inf) passes R_L to S unchanged (its share at
       attended positions is 0 and masked positions already hold 0, exactly as ``masked_fill``
       does written out); a float mask is a constant addend: the epsilon (z-) rule of the add with
       ``stabilizer``, as the LRP base rule of a written-out add does: S gets ``S R_L / stab(L)``,
       the mask keeps ``mask R_L / stab(L)`` (returned as absorbed); -inf entries keep nothing;
    4. S = scale * (Q K^T): identity through the constant scale, then the uniform rule on the
       unscaled product Q K^T (the stabiliser acts on Q K^T, as in the written-out form) ->
       R_Q, R_K; repeated key/value heads of grouped-query attention sum back into their head.

    Every step is per query row given K and V: the rule runs over blocks of ``block`` queries
    like the DLB rule (module docstring, "Long sequences"; ``None``: all at once).
    """
    def rule(r, q, mask, offset):
        return _attnlrp_rows(r, q, key, value, mask, is_causal, scale, enable_gqa, epsilon,
                             stabilizer, offset)
    return _blocked(rule, R, query, key, value, attn_mask, block)


def _attnlrp_rows(R, query, key, value, attn_mask, is_causal, scale, enable_gqa, epsilon,
                  stabilizer, q_offset):
    """:func:`attnlrp_sdpa` of the query rows from position ``q_offset``."""
    scores, mask, probs, k_rep, v_rep = sdpa_parts(query, key, value, attn_mask, is_causal, scale,
                                                  enable_gqa, q_offset)
    R_a, R_v = uniform_bilinear(_mm, probs, v_rep, R, epsilon)
    logits = scores if mask is None else scores + mask
    R_l = attnlrp_softmax(logits, probs, R_a, logits.ndim - 1)
    absorbed = jnp.zeros((), R.dtype)
    if mask is None or (attn_mask is None or attn_mask.dtype == jnp.bool_):
        R_s = R_l
    else:
        m = jnp.broadcast_to(mask, scores.shape)
        fin = jnp.isfinite(logits)
        g = jnp.where(fin, lrp_divide(R_l, jnp.where(fin, logits, 1), stabilizer), 0)
        R_s = scores * g
        absorbed = jnp.sum(jnp.where(jnp.isfinite(m), m, 0) * g)
    R_q, R_kt = uniform_bilinear(_mm, query, _mt(k_rep), R_s, epsilon)
    R_k = _fold_heads(_mt(R_kt), key.shape[-3] if key.ndim >= 3 else None)
    R_v = _fold_heads(R_v, value.shape[-3] if value.ndim >= 3 else None)
    return (unbroadcast(R_q, query.shape), unbroadcast(R_k, key.shape),
            unbroadcast(R_v, value.shape), absorbed)


def _attnlrp_sdpa(ctx, R, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                  scale=None, enable_gqa=False):
    """AttnLRP rule of SDPA kept whole (:func:`attnlrp_sdpa`); ``epsilon`` and ``stabilizer``
    from the method's parameters."""
    q, k, v, kept = attnlrp_sdpa(R, query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                 ctx.params.get("epsilon", 1e-6),
                                 ctx.params.get("stabilizer", 1e-6))
    return RuleResult(tuple(r if ctx.carrying(i) else None for i, r in enumerate((q, k, v))), kept)


register("aten.scaled_dot_product_attention.default", default=_attnlrp_sdpa, check=_sdpa_check,
         method=ATTNLRP, section="AttnLRP Prop. 3.1, Sec. 3.3.2")
