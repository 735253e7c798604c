"""Recurrent layers kept whole (``aten.lstm.input``, ``aten.gru.input``).

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

With a projection (``proj_size > 0``, h_t = W_hr (o ⊙ tanh c_t)) step 1 is preceded by the ungated,
bias-free dense rule over W_hr, which maps R_h onto o ⊙ tanh c_t (decision: the projection is one
more affine map, §2.1; spec §10 does not cover it).

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

The forward recomputation and the backward pass each run as one ``lax.scan`` per layer, the two
directions of a bidirectional layer vmapped together; the first step's constant-state variant is
selected inside the scan (no unrolled step); the input-side dense rule runs once over all steps
after the scan.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from dlbjax.lowerings import HIGHEST
from dlbjax.lowerings.recurrent import (by_direction, from_directions, gru_step, lstm_step,
                                        rnn_affine, rnn_weights, scan_parts, scan_states,
                                        stack_directions)

from ._math import linear_operator_rule, map_streams, unit_rule
from ._registry import RuleResult, Streams, carried, register
from .elementwise import gate_shares, product_shares

__all__ = []


# ------------------------------------------------------------------------------------------------
# Helpers over one map (default mode) or a Streams pair (contrastive mode)
# ------------------------------------------------------------------------------------------------
_map = map_streams


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


def _where(cond, a, b):
    """Select a (where cond) or b, per stream; ``None`` stands for zeros."""
    ref_ = a if a is not None else b
    a = _map(jnp.zeros_like, ref_) if a is None else a
    b = _map(jnp.zeros_like, ref_) if b is None else b
    return _map(lambda u, v: jnp.where(cond, u, v), a, b)


def _backward_through_time(step, carry, xs):
    """One reverse scan over the steps (processing order); xs["first"] marks the first step."""
    T = xs["xg"].shape[0]
    xs = dict(xs, first=jnp.arange(T) == 0)
    return lax.scan(step, carry, xs, reverse=True)


# ------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------
def _lstm_record(w, x, h0, c0):
    """Forward of one direction in processing order: per step h_{t-1}, c_{t-1}, c_t and h_t."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    xg = rnn_affine(x, w_ih, b_ih)

    def body(carry, xg_t):
        h, c = carry
        h2, c2 = lstm_step(w_hh, b_hh, xg_t, h, c, w_hr)
        return (h2, c2), (h, c, c2, h2)

    _, (h_prev, c_prev, c, h) = lax.scan(body, (h0, c0), xg)
    return dict(x=x, xg=xg, h_prev=h_prev, c_prev=c_prev, c=c), h


def _lstm_direction(w, rec, R_ext, R_hn, R_cn, *, const_h, const_c, rule, contrastive):
    """Relevance of one LSTM direction (steps 1-5 of the module docstring, processing order).

    Returns (R_x, R_h0, R_c0, kept)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    rg = rnn_affine(rec["h_prev"], w_hh, b_hh)
    a = rec["xg"] + rg
    ai, af, ag, ao = jnp.split(a, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(ai), jax.nn.sigmoid(af), jnp.tanh(ag), jax.nn.sigmoid(ao)
    xs = dict(R_ext=R_ext, xg=rec["xg"], rg=rg, h_prev=rec["h_prev"], c_prev=rec["c_prev"],
              i=i, f=f, g=g, o=o, tc=jnp.tanh(rec["c"]))

    def step(carry, s):
        R_hrec, R_c, kept = carry
        first = s["first"]
        R_h = _plus(s["R_ext"], R_hrec)
        k_proj = 0.0
        if w_hr is not None:  # h_t = W_hr m_t, m_t = o ⊙ tanh c_t: the ungated dense rule (no bias)
            R_h, k_proj = _dense(s["o"] * s["tc"], w_hr, None, R_h, contrastive)
        R_o, R_tc = gate_shares(s["o"], s["tc"], R_h, rule)
        (R_fc, R_ig), _ = _add([s["f"] * s["c_prev"], s["i"] * s["g"]], None, _plus(R_tc, R_c),
                               contrastive)
        R_f, R_cprev = gate_shares(s["f"], s["c_prev"], R_fc, rule)
        if const_c:  # f ⊙ c_0 with a constant c_0: identity to f
            R_f, R_cprev = _where(first, R_fc, R_f), _where(first, None, R_cprev)
        R_i, R_g = gate_shares(s["i"], s["g"], R_ig, rule)
        R_a = _cat([R_i, R_f, R_g, R_o])
        (R_xg, R_rg), k = _add([s["xg"], s["rg"]], None, R_a, contrastive)
        if const_h:  # U h_0 + b_hh is a constant: a bias of the add rule at the first step (R3)
            (R_xg0,), k0 = _add([s["xg"]], s["rg"], R_a, contrastive)
            R_xg, R_rg, k = _where(first, R_xg0, R_xg), _where(first, None, R_rg), \
                jnp.where(first, k0, k)
        R_hprev, k2 = _dense(s["h_prev"], w_hh, b_hh, R_rg, contrastive)
        return (R_hprev, R_cprev, kept + k + k2 + k_proj), R_xg

    (R_h0, R_c0, kept), R_xg = _backward_through_time(
        step, (R_hn, R_cn, jnp.zeros((), a.dtype)), xs)
    R_x, k = _dense(rec["x"], w_ih, b_ih, R_xg, contrastive)
    return R_x, R_h0, R_c0, kept + k


# ------------------------------------------------------------------------------------------------
# GRU
# ------------------------------------------------------------------------------------------------
def _gru_record(w, x, h0):
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    xg = rnn_affine(x, w_ih, b_ih)

    def body(h, xg_t):
        h2 = gru_step(w_hh, b_hh, xg_t, h)
        return h2, (h, h2)

    _, (h_prev, h) = lax.scan(body, h0, xg)
    return dict(x=x, xg=xg, h_prev=h_prev), h


def _gru_direction(w, rec, R_ext, R_hn, *, const_h, rule, contrastive):
    """Relevance of one GRU direction (steps 1-6 of the GRU part of the module docstring)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    hg = rnn_affine(rec["h_prev"], w_hh, b_hh)
    xr, xz, xn = jnp.split(rec["xg"], 3, axis=-1)
    hr, hz, hn = jnp.split(hg, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    xs = dict(R_ext=R_ext, xg=rec["xg"], xr=xr, xz=xz, xn=xn, hr=hr, hz=hz, hn=hn, r=r, z=z, n=n,
              h_prev=rec["h_prev"])

    def step(carry, s):
        R_hrec, kept = carry
        first, z, h_prev = s["first"], s["z"], s["h_prev"]
        (R_u, R_v), _ = _add([(1 - z) * s["n"], z * h_prev], None, _plus(s["R_ext"], R_hrec),
                             contrastive)
        R_1mz, R_n = gate_shares(1 - z, s["n"], R_u, rule)
        R_zv, R_hdirect = gate_shares(z, h_prev, R_v, rule)
        (R_xn, R_rh), _ = _add([s["xn"], s["r"] * s["hn"]], None, R_n, contrastive)
        R_r, R_hn_ = gate_shares(s["r"], s["hn"], R_rh, rule)
        if const_h:  # z ⊙ h_0 and r ⊙ h_n with a constant h_0: identity to z and r
            R_zv, R_hdirect = _where(first, R_v, R_zv), _where(first, None, R_hdirect)
            R_r, R_hn_ = _where(first, R_rh, R_r), _where(first, None, R_hn_)
        R_z = _plus(R_1mz, R_zv)  # 1 - z is identity to z
        (R_xr, R_hr), k1 = _add([s["xr"], s["hr"]], None, R_r, contrastive)
        (R_xz, R_hz), k2 = _add([s["xz"], s["hz"]], None, R_z, contrastive)
        k = k1 + k2
        if const_h:  # h_r, h_z are constants at the first step: biases of the add rule (R3)
            (R_xr0,), k10 = _add([s["xr"]], s["hr"], R_r, contrastive)
            (R_xz0,), k20 = _add([s["xz"]], s["hz"], R_z, contrastive)
            R_xr, R_xz = _where(first, R_xr0, R_xr), _where(first, R_xz0, R_xz)
            R_hr, R_hz = _where(first, None, R_hr), _where(first, None, R_hz)
            k = jnp.where(first, k10 + k20, k)
        R_h, k3 = _dense(h_prev, w_hh, b_hh, _cat([R_hr, R_hz, R_hn_]), contrastive)
        return (_plus(R_h, R_hdirect), kept + k + k3), _cat([R_xr, R_xz, R_xn])

    (R_h0, kept), R_xg = _backward_through_time(step, (R_hn, jnp.zeros((), hg.dtype)), xs)
    R_x, k = _dense(rec["x"], w_ih, b_ih, R_xg, contrastive)
    return R_x, R_h0, None, kept + k


# ------------------------------------------------------------------------------------------------
# The rule of a whole (multi-layer, bidirectional) recurrent op
# ------------------------------------------------------------------------------------------------
def _recurrent(kind):
    def rule(ctx, R, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first):
        """Relevance of ``aten.{lstm,gru}.input`` (module docstring; §4.7, §10 R1-R12): R is
        (R_output, R_h_n[, R_c_n]); returns (R_input, R_hx) with R_hx None for constant states."""
        contrastive = ctx.options.contrastive
        Rs = list(R) if isinstance(R, tuple) and not isinstance(R, Streams) else [R]
        first = next(r for r in Rs if r is not None)
        dtype = (first.positive if contrastive else first).dtype
        cast = lambda v: v.astype(dtype)  # noqa: E731  (relevance runs in the relevance dtype)
        states = [cast(s) for s in (hx if kind == "lstm" else [hx])]
        state_carries = list(ctx.carries[1]) if kind == "lstm" else [ctx.carries[1]]
        const = [not carried(c) for c in state_carries]  # R3
        layers = [stack_directions([tuple(None if p is None else cast(p) for p in w) for w in layer])
                  for layer in rnn_weights(params, has_biases, num_layers, bidirectional)]
        D = 2 if bidirectional else 1
        x = cast(jnp.swapaxes(input, 0, 1) if batch_first else input)  # [T, B, I]
        record = _lstm_record if kind == "lstm" else _gru_record
        if kind == "lstm":
            direction = partial(_lstm_direction, const_h=const[0], const_c=const[1],
                                rule=ctx.options.product_rule, contrastive=contrastive)
        else:
            direction = partial(_gru_direction, const_h=const[0], rule=ctx.options.product_rule,
                                contrastive=contrastive)

        # forward: record every layer, its directions vmapped (reverse ones on flipped time)
        records = []
        for li, W in enumerate(layers):
            init = [s[li * D:(li + 1) * D] for s in states]
            rec, hs = jax.vmap(record)(W, by_direction(x, D), *init)
            records.append(rec)
            x = from_directions(hs)

        def external(i, shape):
            r = Rs[i] if i < len(Rs) else None
            return _zeros(shape, dtype, contrastive) if r is None else _map(cast, r)

        R_seq = external(0, ctx.outputs[0].shape)  # the op's own layout (batch-first or not)
        R_seq = _map(lambda r: jnp.swapaxes(r, 0, 1), R_seq) if batch_first else R_seq
        R_fin = [external(1 + j, s.shape) for j, s in enumerate(states)]
        R_init, kept = [[] for _ in states], 0.0
        H = states[0].shape[-1]
        for li in reversed(range(len(layers))):  # top-down (R7)
            # R8: the output relevance splits by feature position, each direction in its own order
            R_ext = _map(lambda r: jnp.stack([r[..., :H], jnp.flip(r[..., H:], 0)][:D]), R_seq)
            fin = [_map(lambda r: r[li * D:(li + 1) * D], rf) for rf in R_fin]
            R_x, R_h0, R_c0, kp = jax.vmap(direction)(layers[li], records[li], R_ext, *fin)
            R_seq = _map(lambda r: r[0] + (jnp.flip(r[1], 0) if D == 2 else 0), R_x)
            kept = kept + jnp.sum(kp)
            R_init[0].insert(0, R_h0)
            if kind == "lstm":
                R_init[1].insert(0, R_c0)
        R_input = _map(lambda r: jnp.swapaxes(r, 0, 1), R_seq) if batch_first else R_seq

        def initial(j):
            if not carried(state_carries[j]):
                return None
            return _map(lambda *rs: jnp.concatenate(rs, axis=0), *R_init[j])

        R_hx = [initial(0), initial(1)] if kind == "lstm" else initial(0)
        return RuleResult((R_input if ctx.carrying(0) else None, R_hx) + (None,) * 7,
                          None if contrastive else kept)

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
# Selective scan (Mamba)
# ------------------------------------------------------------------------------------------------
def _sum(R, axis):
    return _map(lambda r: jnp.sum(r, axis=axis), R)


def _both(a, b, R, rule):
    """Product of two gates (dt ⊙ B): each stream split by the product rule; ``"signal_take_all"``
    (which sends them nothing) splits whatever arrives in halves."""
    rule = "half" if rule == "signal_take_all" else rule
    if isinstance(R, Streams):
        (ap, bp), (an, bn) = (product_shares(a, b, r, rule) for r in R)
        return Streams(ap, an), Streams(bp, bn)
    return product_shares(a, b, R, rule)


def _selective_scan(ctx, R, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                    delta_softplus=False):
    """Relevance of ``dlbjax.selective_scan`` (Mamba's selective scan; decision, in the spirit of
    spec §10 for LSTMs: the scan is a recurrence whose *content* is u, and whose transitions
    exp(A dt), selections dt, B, C and output gate silu(z) are multiplicative gates).

    Forward per channel d and state n: dt = softplus(delta + delta_bias), dA_t = exp(A dt_t),
    h_t = dA_t h_{t-1} + (dt_t B_t) u_t with h_{-1} = 0, y_t = Σ_n C_t[n] h_t[n] + D u_t,
    out_t = y_t ⊙ silu(z_t). Backward through time from t = L-1 to 0 with R_h the relevance
    h_t receives from step t+1:

    1. (R_z, R_y) = product(silu z_t, y_t; R_out_t), silu identity (§10 R4: gate first).
    2. Add rule (§4.4) over the n + 1 terms of y_t: C_t[n] h_t[n] for every n and D u_t;
       D u_t is a product with a constant, identity to u_t (§4.8).
    3. (R_C, R_h') = product(C_t[n], h_t[n]; share of term n); R_C sums over channels.
    4. Add rule over (dA_t h_{t-1}, dt_t B_t u_t) with R_h' + R_h; the first step's transition
       term is 0 and takes nothing (the zero initial state gets no relevance, §10 R3).
    5. (R_dA, R_h{t-1}) = product(dA_t, h_{t-1}); R_dA passes exp (identity, the spec §2.2 table's
       null entry) and A dt (A constant) to dt; (R_dtB, R_u) = product(dt_t B_t, u_t), R_u sums
       over states; R_dtB splits between dt and B by the product rule (two gates; halves under
       "signal_take_all", where it is 0 anyway).
    6. dt's relevance passes softplus (identity) and the add rule over (delta, delta_bias): the
       bias keeps its |b| share in default mode (absorbed, reported as bias), none in
       contrastive mode (§3.2).

    Products use ``options.product_rule`` with the roles above: "half" (R/2 each, default),
    "dlb", or "signal_take_all" (the gates get nothing: all relevance flows along the content
    path u -> h -> y, a linear-attention-like decomposition of y_t over u_s, s ≤ t). Every
    step conserves, so Σ R[u] + Σ R[delta] + Σ R[B] + Σ R[C] + Σ R[z] + bias share = Σ R[out]
    (zero totals pass nothing, §10 R10). A gate operand that is a constant (no relevance) makes
    its product identity to the other factor. Contrastive mode: §3.2 at each add (unit weights),
    each product splitting both streams alike (as for LSTMs). The float32 forward is recomputed
    in the relevance dtype.
    """
    contrastive, rule = ctx.options.contrastive, ctx.options.product_rule
    first = R.positive if contrastive else R
    dtype = first.dtype
    cast = lambda v: None if v is None else jnp.asarray(v).astype(dtype)  # noqa: E731
    carry_dt, carry_B, carry_C = ctx.carrying(1), ctx.carrying(3), ctx.carrying(4)
    carry_z = z is not None and ctx.carrying(6)
    dt, dA, dBu = (cast(v) for v in scan_parts(u, delta, A, B, delta_bias, delta_softplus))
    h = scan_states(dA, dBu)                                                  # [L, b, d, n]
    h_prev = jnp.concatenate([jnp.zeros_like(h[:1]), h[:-1]], axis=0)
    time = lambda v: jnp.moveaxis(cast(v), -1, 0)  # noqa: E731  [.., L] -> [L, ..]
    ut, Bt, Ct = time(u), time(B), time(C)
    y = jnp.einsum("lbdn,lbn->lbd", h, Ct, precision=HIGHEST)
    Du = None if D is None else ut * cast(D)
    xs = dict(R=_map(time, R), h=h, h_prev=h_prev, dA=dA, dBu=dBu, dt=dt, B=Bt, C=Ct, u=ut,
              y=y if Du is None else y + Du)
    if z is not None:
        xs["sz"] = jax.nn.silu(time(z))
    if Du is not None:
        xs["Du"] = Du

    def step(R_hc, s):
        R_out = s["R"]
        R_z = None
        if carry_z:
            R_z, R_y = gate_shares(s["sz"], s["y"], R_out, rule)
        else:
            R_y = R_out
        terms = s["C"][:, None, :] * s["h"]                                  # [b, d, n]
        n = terms.shape[-1]
        if Du is not None:
            terms = jnp.concatenate([terms, s["Du"][..., None]], axis=-1)
        shares, _ = unit_rule(terms, None, _map(lambda r: r[..., None], R_y), contrastive, axis=-1)
        R_p = _map(lambda r: r[..., :n], shares)
        R_q = _map(lambda r: r[..., n], shares) if Du is not None else None
        if carry_C:
            R_Cg, R_hs = gate_shares(jnp.broadcast_to(s["C"][:, None, :], terms[..., :n].shape),
                                     s["h"], R_p, rule)
            R_C = _sum(R_Cg, 1)
        else:
            R_hs, R_C = R_p, None
        (R_tr, R_in), _ = _add([s["dA"] * s["h_prev"], s["dBu"]], None, _plus(R_hs, R_hc),
                               contrastive)
        dtB = s["dt"][..., None] * s["B"][:, None, :]
        if carry_dt:
            R_dA, R_hprev = gate_shares(s["dA"], s["h_prev"], R_tr, rule)
        else:
            R_dA, R_hprev = None, R_tr
        if carry_dt or carry_B:
            R_dtB, R_us = gate_shares(dtB, s["u"][..., None], R_in, rule)
            if carry_dt and carry_B:
                R_dtg, R_Bg = _both(jnp.broadcast_to(s["dt"][..., None], dtB.shape),
                                    jnp.broadcast_to(s["B"][:, None, :], dtB.shape), R_dtB, rule)
            else:
                R_dtg, R_Bg = (R_dtB, None) if carry_dt else (None, R_dtB)
        else:
            R_us, R_dtg, R_Bg = R_in, None, None
        R_u = _sum(R_us, -1)
        if R_q is not None:
            R_u = _plus(R_u, R_q)
        zeros_d = _map(jnp.zeros_like, R_u)
        R_dt = zeros_d
        for part in (R_dA, R_dtg):
            if part is not None:
                R_dt = _plus(R_dt, _sum(part, -1))
        zeros_n = _map(lambda r: jnp.zeros(r.shape[:-1] + (Bt.shape[-2],), r.dtype), R_u)
        R_B = zeros_n if R_Bg is None else _sum(R_Bg, 1)
        R_C = zeros_n if R_C is None else R_C
        return R_hprev, (R_u, R_dt, R_B, R_C, zeros_d if R_z is None else R_z)

    R0 = _zeros(h.shape[1:], dtype, contrastive)
    _, (R_u, R_dt, R_B, R_C, R_z) = lax.scan(step, R0, xs, reverse=True)
    kept = 0.0
    R_delta = R_dt
    if delta_bias is not None and carry_dt:
        dpre = time(delta)
        (R_delta,), kept = _add([dpre], jnp.broadcast_to(cast(delta_bias), dpre.shape), R_dt,
                                contrastive)
    back = lambda r: _map(lambda v: jnp.moveaxis(v, 0, -1), r)  # noqa: E731
    result = (back(R_u), back(R_delta) if carry_dt else None, None,
              back(R_B) if carry_B else None, back(R_C) if carry_C else None, None,
              back(R_z) if carry_z else None, None, None)
    return RuleResult(result[:len(ctx.carries)], None if contrastive else kept)


def _scan_check(carries):
    if not carried(carries[0]):
        return "the scan's input u must carry relevance (only its gates do)"
    if any(carried(carries[i]) for i in (2, 5, 7) if i < len(carries)):
        return "A, D and delta_bias computed from the inputs are not supported (constants only)"
    return None


register("dlbjax.selective_scan.default", default=_selective_scan, contrastive=_selective_scan,
         check=_scan_check, section="§10 (selective scan, dlbjax decision)")
