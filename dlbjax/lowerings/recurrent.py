"""Forward of recurrent layers kept whole (``aten.lstm.input``, ``aten.gru.input``): one
``lax.scan`` per layer and direction. The relevance rules (``rules/recurrent.py``) reuse these cells.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._common import HIGHEST
from ._table import lowering



def rnn_weights(params, has_biases, num_layers, bidirectional):
    """torch's flat ``params`` list -> ``[layer][direction] = (w_ih, w_hh, b_ih, b_hh, w_hr)``.

    torch orders it per layer, per direction (forward, then ``_reverse``): w_ih, w_hh, then with
    biases b_ih, b_hh, then with ``proj_size > 0`` (LSTM) the projection w_hr. Absent entries are
    None."""
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) == num_layers * dirs * (per + 1):
        per += 1  # LSTM projection weight_hr
    elif len(params) != num_layers * dirs * per:
        raise NotImplementedError(f"unexpected recurrent parameter list of length {len(params)}")
    proj = per in (3, 5)
    layers = []
    for k in range(0, len(params), per):
        p = params[k:k + per]
        if (k // per) % dirs == 0:
            layers.append([])
        layers[-1].append((p[0], p[1], p[2] if has_biases else None, p[3] if has_biases else None,
                           p[-1] if proj else None))
    return layers


def rnn_affine(x, w, b):
    """x W^T + b over the last axis (one of the two bracketed terms of a gate pre-activation)."""
    y = jnp.matmul(x, w.T, precision=HIGHEST)
    return y if b is None else y + b


def lstm_step(w_hh, b_hh, xg, h, c, w_hr=None):
    """One LSTM step from the input term xg = W_ih x_t + b_ih; gates i, f, g, o (torch order);
    with a projection (proj_size > 0) h_t = W_hr (o tanh c_t)."""
    a = xg + rnn_affine(h, w_hh, b_hh)
    i, f, g, o = jnp.split(a, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h if w_hr is None else rnn_affine(h, w_hr, None)), c


def gru_step(w_hh, b_hh, xg, h):
    """One GRU step from xg = W_ih x_t + b_ih; gates r, z, n (torch order):
    n = tanh(x_n + r (W_hn h + b_hn)), h' = (1 - z) n + z h."""
    xr, xz, xn = jnp.split(xg, 3, axis=-1)
    hr, hz, hn = jnp.split(rnn_affine(h, w_hh, b_hh), 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def stack_directions(layer):
    """One layer's directions stacked on a leading axis (same shapes), for one vmapped scan."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layer)


def by_direction(x, dirs):
    """[T, ...] -> [dirs, T, ...] in each direction's processing order (reverse: time flipped)."""
    return jnp.stack([x, jnp.flip(x, 0)][:dirs])


def from_directions(hs):
    """[dirs, T, B, H] in processing order -> [T, B, dirs*H] (forward features first)."""
    return jnp.concatenate([hs[0]] + [jnp.flip(h, 0) for h in hs[1:]], axis=-1)


def _rnn(kind, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first):
    if train and dropout:
        raise NotImplementedError("recurrent layer with dropout in training mode")
    if input.ndim != 3:
        raise NotImplementedError("recurrent layer on an unbatched (2-D) input")
    x = jnp.swapaxes(input, 0, 1) if batch_first else input  # [T, B, I]
    states = list(hx) if kind == "lstm" else [hx]
    step = lstm_step if kind == "lstm" else gru_step

    def direction(w, xd, *init):
        w_ih, w_hh, b_ih, b_hh, w_hr = w

        def body(carry, xg_t):
            new = step(w_hh, b_hh, xg_t, *carry, **({} if w_hr is None else {"w_hr": w_hr}))
            new = new if isinstance(new, tuple) else (new,)
            return new, new[0]

        last, hs = lax.scan(body, init, rnn_affine(xd, w_ih, b_ih))
        return hs, last

    finals = []
    for layer_index, layer in enumerate(rnn_weights(params, has_biases, num_layers, bidirectional)):
        D = len(layer)
        init = tuple(s[layer_index * D:(layer_index + 1) * D] for s in states)
        hs, last = jax.vmap(direction)(stack_directions(layer), by_direction(x, D), *init)
        x = from_directions(hs)  # inter-layer dropout: identity in eval
        finals.append(last)
    out = jnp.swapaxes(x, 0, 1) if batch_first else x
    return (out,) + tuple(jnp.concatenate(f, axis=0) for f in zip(*finals))


@lowering("aten.lstm.input", keep_whole=True)
def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``nn.LSTM``: returns (output, h_n, c_n)."""
    return _rnn("lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                batch_first)


@lowering("aten.gru.input", keep_whole=True)
def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``nn.GRU``: returns (output, h_n)."""
    return _rnn("gru", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                batch_first)


# ------------------------------------------------------------------------------------------------
# Selective scan (state-space models, ``importers/_mamba.py``)
# ------------------------------------------------------------------------------------------------
def scan_parts(u, delta, A, B, delta_bias=None, delta_softplus=False):
    """The discretised selective scan in float32, time first: dt [L, b, d], dA = exp(A dt) and
    dBu = dt B u, both [L, b, d, n]."""
    f32 = jnp.float32
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)[:, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    dt = jnp.moveaxis(dt, -1, 0)                                              # [L, b, d]
    Bt = jnp.moveaxis(B.astype(f32), -1, 0)[:, :, None, :]                    # [L, b, 1, n]
    ut = jnp.moveaxis(u.astype(f32), -1, 0)[..., None]                        # [L, b, d, 1]
    dA = jnp.exp(A.astype(f32) * dt[..., None])
    return dt, dA, dt[..., None] * Bt * ut


def scan_states(dA, dBu):
    """h_t = dA_t h_{t-1} + dBu_t from h_{-1} = 0: the states [L, b, d, n]."""
    def body(h, s):
        h = s[0] * h + s[1]
        return h, h

    return lax.scan(body, jnp.zeros_like(dA[0]), (dA, dBu))[1]


@lowering("dlbjax.selective_scan.default", keep_whole=True)
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's selective scan (``importers/_mamba.py`` gives the formula and argument layout)."""
    _, dA, dBu = scan_parts(u, delta, A, B, delta_bias, delta_softplus)
    h = scan_states(dA, dBu)
    Ct = jnp.moveaxis(C.astype(jnp.float32), -1, 0)                          # [L, b, n]
    y = jnp.moveaxis(jnp.einsum("lbdn,lbn->lbd", h, Ct, precision=HIGHEST), 0, -1)
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)[:, None]
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)
