"""Recurrent layers kept whole (``aten.lstm.input``, ``aten.gru.input``) and embedding bags.

LSTM (spec §4.7 with the binding decisions §10 R1-R12). Per layer and direction, step t computes
x_g = W_g x_t + b_ih,g and r_g = U_g h_{t-1} + b_hh,g for the gates g = i, f, g, o (rows [0:H],
[H:2H], [2H:3H], [3H:4H], R2), i, f, o = σ(x + r), g = tanh(x + r), c_t = f c_{t-1} + i g,
h_t = o tanh(c_t). Backward through time, from the last processed step to the first, with R_h the
relevance of h_t (what arrives from outside at t, plus h_n's at the last step, plus the recurrent
parts of step t+1; R5, R6) and the carried R_c (c_n's at the last step):

1. (R_o, R_tc) = product(o, tanh c_t; R_h); the cell gets R_tc + R_c (tanh is identity).
2. (R_fc, R_ig) = add rule over (f c_{t-1}, i g) (§4.4): shares ∝ |f c_{t-1}|, |i g|.
3. (R_f, R_c{t-1}) = product(f, c_{t-1}; R_fc); (R_i, R_g) = product(i, g; R_ig). σ and tanh of
   the gates are identity.
4. For each of the 4H rows: the add rule splits R_a between x_a and r_a in proportion to |x_a| and
   |r_a| (R1, each term with its own bias); the input parts go to x_t through the dense rule over
   (W_ih, b_ih), the recurrent parts to h_{t-1} through the dense rule over (W_hh, b_hh), both
   ungated (R9: D = P + N + |b|); each bias keeps its |b|/D share (reported as absorbed).
5. The next (earlier) step's R_h gets the recurrent parts; R_x_t sums the four input parts.

A constant initial state (the in-graph zeros of a call without ``(h_0, c_0)``, or a buffer; R3) makes
the first step's recurrent term U h_0 + b_hh a constant: its add-rule share is kept like a bias
(default mode) and ``f ⊙ c_0`` is a product with a constant, identity to f (so with c_0 = 0 it gets
nothing from step 2). Initial states passed as forward inputs carry relevance to that input.
Multi-layer: top-down, the input relevance of layer l+1 is the external relevance of layer l's
output (R7); bidirectional: the output relevance is split by feature position, the reverse
direction runs backward-through-time from t = 0 and its input relevance is added (R8). Inter-layer
dropout is identity (eval).

GRU (torch gate order r, z, n; the same principles, written in the style of §4.7/§10):
r = σ(x_r + h_r), z = σ(x_z + h_z) with x_g = W_ig x_t + b_ig and h_g = W_hg h_{t-1} + b_hg;
n = tanh(x_n + r ⊙ h_n); h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}. Backward at step t with R_h as above:

1. (R_u, R_v) = add rule over (u, v) = ((1 − z) ⊙ n, z ⊙ h_{t-1}): shares ∝ |u|, |v|.
2. (R_1−z, R_n) = product(1 − z, n; R_u); (R_z', R_h{t-1}) = product(z, h_{t-1}; R_v), z and 1 − z
   being the gates and n, h_{t-1} the signals.
3. **Decision:** ``1 − z`` is identity to z, like σ: 1 − σ(a) = σ(−a) is a gate nonlinearity of the
   same pre-activation and the constant 1 takes no share. So R_z = R_1−z + R_z'. (torch's own
   decomposition writes h_t = (h_{t-1} − n) ⊙ z + n, which subtracts two signals and credits n
   twice; dlbjax explains the convex-combination form above instead, which gives every product a
   gate and a signal, as the "dlb" and "signal_take_all" rules need.)
4. (R_xn, R_rh) = add rule over (x_n, r ⊙ h_n) (§4.4); (R_r, R_hn) = product(r, h_n; R_rh).
5. (R_xr, R_hr) and (R_xz, R_hz) = add rule over (x_r, h_r) with R_r and (x_z, h_z) with R_z.
6. The input parts (R_xr, R_xz, R_xn) go to x_t through the ungated dense rule over (W_ih, b_ih),
   the recurrent parts (R_hr, R_hz, R_hn) to h_{t-1} through the ungated dense rule over
   (W_hh, b_hh); R_h{t-1} also gets the direct share of step 2. Biases keep |b|/D.

A constant initial state at the first step: h_r, h_z and h_n are constants (their add-rule shares
are kept like biases; r ⊙ h_n and z ⊙ h_0 are products with a constant, identity to r and z).

Products (§4.7, §10 R4) use ``options.product_rule``: ``"half"`` (R/2 to each factor, default),
``"dlb"`` (R_gate = R |y − gate| / (|y − gate| + |y − signal|), 0/0 -> 1/2) or
``"signal_take_all"`` (the gate gets 0, the signal R). Under each of them every step conserves
relevance up to the bias shares and zero totals (R10), so per row Σ R[input] + absorbed = seed.

Contrastive mode is implemented as the §9.17-style extension: the §3.2 rule at every add and dense
step (unit weights for adds; biases enter only through the sign of T and keep no share; a constant
first-step recurrent term likewise), and each product splits both streams with the same fractions.

The forward recomputation and the backward pass each run as one ``lax.scan`` per layer and
direction; the input-side dense rule runs once over all steps after the scan.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from .._lowering import (HIGHEST, embedding_bag_members, gru_step, lstm_step, rnn_affine,
                         rnn_weights)
from ._math import contrastive_coeffs, default_coeffs, linear_operator_rule, relu, unit_rule
from ._registry import Streams, carried, register
from .elementwise import product_shares

__all__ = ["gate_shares"]


# ------------------------------------------------------------------------------------------------
# Helpers over one map (default mode) or a Streams pair (contrastive mode)
# ------------------------------------------------------------------------------------------------
def _map(fn, *Rs):
    if isinstance(Rs[0], Streams):
        return Streams(*(fn(*rs) for rs in zip(*Rs)))
    return fn(*Rs)


def _plus(a, b):
    return _map(jnp.add, a, b)


def _cat(Rs):
    return _map(lambda *rs: jnp.concatenate(rs, axis=-1), *Rs)


def _split(R, n):
    if isinstance(R, Streams):
        return [Streams(p, q) for p, q in zip(jnp.split(R.positive, n, -1),
                                              jnp.split(R.negative, n, -1))]
    return jnp.split(R, n, -1)


def _zeros(shape, dtype, contrastive):
    z = jnp.zeros(shape, dtype)
    return Streams(z, z) if contrastive else z


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


def _add(terms, const, R, contrastive):
    """Add rule (§4.4 / §3.2 with unit weights) over ``terms``; ``const`` (or None) is a constant
    addend: a bias keeping its |c| share in default mode. Returns (shares, kept)."""
    rels, kept = unit_rule(list(terms), const, R, contrastive)
    return rels, (jnp.sum(kept) if kept is not None else 0.0)


def _dense(x, w, b, R, contrastive):
    """Ungated dense rule (§2.1 / §3.2, R9) over y = x W^T + b. Returns (R_x, kept)."""
    lin = lambda v, m: jnp.matmul(v, m.T, precision=HIGHEST)  # noqa: E731
    bias = None if b is None else jnp.broadcast_to(b, x.shape[:-1] + b.shape)
    rel, kept = linear_operator_rule(lin, x, w, bias, R, contrastive)
    return rel, (jnp.sum(kept) if kept is not None else 0.0)


def _steps(body, carry, xs, first_body):
    """Backward through time in processing order: ``body`` for steps T-1..1 (a reverse scan),
    ``first_body`` for step 0. Returns (final carry, per-step outputs stacked over all steps)."""
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    head = jax.tree_util.tree_map(lambda a: a[0], xs)
    if T > 1:
        carry, ys = lax.scan(body, carry, jax.tree_util.tree_map(lambda a: a[1:], xs), reverse=True)
    carry, y0 = first_body(carry, head)
    if T > 1:
        ys = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)
    else:
        ys = jax.tree_util.tree_map(lambda a: a[None], y0)
    return carry, ys


# ------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------
def _lstm_record(w, x, h0, c0):
    """Forward of one direction in processing order: per step (h_{t-1}, c_{t-1}, c_t)."""
    w_ih, w_hh, b_ih, b_hh = w
    xg = rnn_affine(x, w_ih, b_ih)

    def body(carry, xg_t):
        h, c = carry
        h2, c2 = lstm_step(w_hh, b_hh, xg_t, h, c)
        return (h2, c2), (h, c, c2, h2)

    _, (h_prev, c_prev, c, h) = lax.scan(body, (h0, c0), xg)
    return dict(x=x, xg=xg, h_prev=h_prev, c_prev=c_prev, c=c), h


def _lstm_direction(w, rec, R_ext, R_hn, R_cn, const_h, const_c, rule, contrastive):
    """Relevance of one LSTM direction (steps 1-5 of the module docstring, processing order).

    Returns (R_x, R_h0, R_c0, kept)."""
    w_ih, w_hh, b_ih, b_hh = w
    rg = rnn_affine(rec["h_prev"], w_hh, b_hh)
    a = rec["xg"] + rg
    ai, af, ag, ao = jnp.split(a, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(ai), jax.nn.sigmoid(af), jnp.tanh(ag), jax.nn.sigmoid(ao)
    xs = dict(R_ext=R_ext, xg=rec["xg"], rg=rg, h_prev=rec["h_prev"], c_prev=rec["c_prev"],
              i=i, f=f, g=g, o=o, tc=jnp.tanh(rec["c"]))

    def step(carry, s, first=False):
        R_hrec, R_c, kept = carry
        R_o, R_tc = gate_shares(s["o"], s["tc"], _plus(s["R_ext"], R_hrec), rule)
        (R_fc, R_ig), _ = _add([s["f"] * s["c_prev"], s["i"] * s["g"]], None, _plus(R_tc, R_c),
                               contrastive)
        if first and const_c:
            R_f, R_cprev = R_fc, None  # f ⊙ c_0 with a constant c_0: identity to f
        else:
            R_f, R_cprev = gate_shares(s["f"], s["c_prev"], R_fc, rule)
        R_i, R_g = gate_shares(s["i"], s["g"], R_ig, rule)
        R_a = _cat([R_i, R_f, R_g, R_o])
        if first and const_h:  # U h_0 + b_hh is a constant: a bias of the add rule (R3)
            (R_xg,), k = _add([s["xg"]], s["rg"], R_a, contrastive)
            R_hprev = None
        else:
            (R_xg, R_rg), k = _add([s["xg"], s["rg"]], None, R_a, contrastive)
            R_hprev, k2 = _dense(s["h_prev"], w_hh, b_hh, R_rg, contrastive)
            k = k + k2
        return (R_hprev, R_cprev, kept + k), R_xg

    (R_h0, R_c0, kept), R_xg = _steps(step, (R_hn, R_cn, jnp.zeros((), a.dtype)), xs,
                                      partial(step, first=True))
    R_x, k = _dense(rec["x"], w_ih, b_ih, R_xg, contrastive)
    return R_x, R_h0, R_c0, kept + k


# ------------------------------------------------------------------------------------------------
# GRU
# ------------------------------------------------------------------------------------------------
def _gru_record(w, x, h0):
    w_ih, w_hh, b_ih, b_hh = w
    xg = rnn_affine(x, w_ih, b_ih)

    def body(h, xg_t):
        h2 = gru_step(w_hh, b_hh, xg_t, h)
        return h2, (h, h2)

    _, (h_prev, h) = lax.scan(body, h0, xg)
    return dict(x=x, xg=xg, h_prev=h_prev), h


def _gru_direction(w, rec, R_ext, R_hn, const_h, rule, contrastive):
    """Relevance of one GRU direction (steps 1-6 of the GRU part of the module docstring)."""
    w_ih, w_hh, b_ih, b_hh = w
    hg = rnn_affine(rec["h_prev"], w_hh, b_hh)
    xr, xz, xn = jnp.split(rec["xg"], 3, axis=-1)
    hr, hz, hn = jnp.split(hg, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    xs = dict(R_ext=R_ext, xr=xr, xz=xz, xn=xn, hr=hr, hz=hz, hn=hn, r=r, z=z, n=n,
              h_prev=rec["h_prev"])

    def step(carry, s, first=False):
        R_hrec, kept = carry
        z, h_prev = s["z"], s["h_prev"]
        (R_u, R_v), _ = _add([(1 - z) * s["n"], z * h_prev], None, _plus(s["R_ext"], R_hrec),
                             contrastive)
        R_1mz, R_n = gate_shares(1 - z, s["n"], R_u, rule)
        const = first and const_h
        R_zv, R_hdirect = (R_v, None) if const else gate_shares(z, h_prev, R_v, rule)
        R_z = _plus(R_1mz, R_zv)  # 1 - z is identity to z
        (R_xn, R_rh), _ = _add([s["xn"], s["r"] * s["hn"]], None, R_n, contrastive)
        R_r, R_hn_ = (R_rh, None) if const else gate_shares(s["r"], s["hn"], R_rh, rule)
        if const:
            (R_xr,), k1 = _add([s["xr"]], s["hr"], R_r, contrastive)
            (R_xz,), k2 = _add([s["xz"]], s["hz"], R_z, contrastive)
            return (None, kept + k1 + k2), _cat([R_xr, R_xz, R_xn])
        (R_xr, R_hr), k1 = _add([s["xr"], s["hr"]], None, R_r, contrastive)
        (R_xz, R_hz), k2 = _add([s["xz"], s["hz"]], None, R_z, contrastive)
        R_h, k3 = _dense(h_prev, w_hh, b_hh, _cat([R_hr, R_hz, R_hn_]), contrastive)
        return (_plus(R_h, R_hdirect), kept + k1 + k2 + k3), _cat([R_xr, R_xz, R_xn])

    (R_h0, kept), R_xg = _steps(step, (R_hn, jnp.zeros((), hg.dtype)), xs,
                                partial(step, first=True))
    R_x, k = _dense(rec["x"], w_ih, b_ih, R_xg, contrastive)
    return R_x, R_h0, None, kept + k


# ------------------------------------------------------------------------------------------------
# The rule of a whole (multi-layer, bidirectional) recurrent op
# ------------------------------------------------------------------------------------------------
def _flip(R):
    return _map(lambda r: jnp.flip(r, 0), R)


def _recurrent(kind):
    def rule(ctx, R, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first):
        contrastive = ctx.options.contrastive
        Rs = list(R) if isinstance(R, tuple) and not isinstance(R, Streams) else [R]
        first = next(r for r in Rs if r is not None)
        dtype = (first.positive if contrastive else first).dtype
        cast = lambda v: v.astype(dtype)  # noqa: E731  (relevance runs in the relevance dtype)
        states = [cast(s) for s in (hx if kind == "lstm" else [hx])]
        state_carries = list(ctx.carries[1]) if kind == "lstm" else [ctx.carries[1]]
        layers = [[tuple(None if p is None else cast(p) for p in w) for w in layer]
                  for layer in rnn_weights(params, has_biases, num_layers, bidirectional)]
        x = cast(jnp.swapaxes(input, 0, 1) if batch_first else input)  # [T, B, I]
        D, H = len(layers[0]), states[0].shape[-1]

        # forward: record every layer and direction (reverse directions run on flipped time)
        records, inputs = [], []
        for li, layer in enumerate(layers):
            inputs.append(x)
            outs, recs = [], []
            for d, w in enumerate(layer):
                k = li * D + d
                xd = jnp.flip(x, 0) if d else x
                if kind == "lstm":
                    rec, h = _lstm_record(w, xd, states[0][k], states[1][k])
                else:
                    rec, h = _gru_record(w, xd, states[0][k])
                recs.append(rec)
                outs.append(jnp.flip(h, 0) if d else h)
            records.append(recs)
            x = jnp.concatenate(outs, axis=-1)

        def external(i, shape):
            r = Rs[i] if i < len(Rs) else None
            return _zeros(shape, dtype, contrastive) if r is None else _map(cast, r)

        R_seq = external(0, x.shape)
        R_seq = _map(lambda r: jnp.swapaxes(r, 0, 1), R_seq) if batch_first else R_seq
        R_fin = [external(1 + j, states[j].shape) for j in range(len(states))]
        R_init = [[None] * states[0].shape[0] for _ in states]
        kept = 0.0
        for li in reversed(range(len(layers))):  # top-down (R7)
            R_in = _zeros(inputs[li].shape, dtype, contrastive)
            for d, w in enumerate(layers[li]):
                k = li * D + d
                R_ext = _map(lambda r: r[..., d * H:(d + 1) * H], R_seq)  # R8: by feature position
                R_ext = _flip(R_ext) if d else R_ext
                const = [not carried(c) for c in state_carries]  # R3
                fin = [_map(lambda r: r[k], rf) for rf in R_fin]
                if kind == "lstm":
                    R_x, R_h0, R_c0, kp = _lstm_direction(w, records[li][d], R_ext, fin[0], fin[1],
                                                          const[0], const[1],
                                                          ctx.options.product_rule, contrastive)
                    R_init[1][k] = R_c0
                else:
                    R_x, R_h0, _, kp = _gru_direction(w, records[li][d], R_ext, fin[0], const[0],
                                                      ctx.options.product_rule, contrastive)
                R_init[0][k] = R_h0
                R_in = _plus(R_in, _flip(R_x) if d else R_x)
                kept = kept + kp
            R_seq = R_in
        if not contrastive:
            ctx.absorb(kept)
        R_input = _map(lambda r: jnp.swapaxes(r, 0, 1), R_seq) if batch_first else R_seq

        def initial(j):
            if not carried(state_carries[j]):
                return None
            parts = [r if r is not None else _zeros(states[j].shape[1:], dtype, contrastive)
                     for r in R_init[j]]
            return _map(lambda *rs: jnp.stack(rs), *parts)

        R_hx = [initial(0), initial(1)] if kind == "lstm" else initial(0)
        return (R_input if ctx.carrying(0) else None, R_hx) + (None,) * 7

    return rule


def _check(carries):
    if not carried(carries[0]):
        return "only the initial state carries relevance; the input sequence must carry it too"
    if carried(carries[2]):
        return "recurrent weights computed from the inputs are not supported (constant weights only)"
    return None


register("aten.lstm.input", default=_recurrent("lstm"), contrastive=_recurrent("lstm"), check=_check,
         section="§4.7, §10")
register("aten.gru.input", default=_recurrent("gru"), contrastive=_recurrent("gru"), check=_check,
         section="§4.7, §10 (GRU)")


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
        share = _map(lambda r: win * (r / jnp.maximum(seg(win), 1))[bag], R)
    elif ctx.options.contrastive:
        P, N = seg(relu(v)), seg(relu(-v))
        ap, cp, an, cn = contrastive_coeffs(P, N, P - N, R.positive, R.negative)
        share = Streams(ap[bag] * relu(v) + cp[bag] * relu(-v), an[bag] * relu(v) + cn[bag] * relu(-v))
    else:
        P, N = seg(relu(v)), seg(relu(-v))
        a, c, _ = default_coeffs(P, N, jnp.zeros_like(P), R)
        share = a[bag] * relu(v) + c[bag] * relu(-v)
    share = _map(lambda s: jnp.where(valid[:, None], s, 0), share)
    out = [None] * 9
    if psw is not None and ctx.carrying(6):
        if ctx.options.product_rule == "signal_take_all":
            raise ValueError("product_rule='signal_take_all' is defined only for recurrent gates; "
                             "the per-sample weights of an EmbeddingBag are not a gate")
        w_part, i_part = gate_shares(jnp.broadcast_to(psw[:, None], rows.shape), rows, share,
                                     ctx.options.product_rule)
        out[6] = _map(lambda r: jnp.sum(r, -1), w_part)
        share = i_part
    out[1] = _map(lambda r: jnp.sum(r, -1), share)
    return tuple(out)


def _bag_check(carries):
    if carried(carries[0]):
        return "the embedding table carries relevance; only a constant table is supported"
    return None


register("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default",
         default=_embedding_bag, contrastive=_embedding_bag, outputs=(0,), check=_bag_check,
         section="§4.4, §4.6, §8.6")
