"""Recurrent layers and bags (spec §4.7, §10 R1-R12): nn.LSTM, nn.GRU and nn.EmbeddingBag.

* the JAX forward (one ``lax.scan`` per layer and direction) matches torch in float32 under jit and
  vmap, for 1-2 layers, batch_first or not, bidirectional or not, with or without biases;
* the scan-based relevance rules equal a slow per-time-step, per-unit reference written below from
  the spec's formulas (float64; all three product rules, both modes, h_n/c_n seeds, initial states
  passed as inputs);
* conservation under every product rule: per row Σ R[input_ids] + absorbed = M (no bias: Σ R = M);
* padded steps after the selected step get exactly 0 (R11); a 128-step sequence compiles quickly;
* EmbeddingBag (sum/mean/max, offsets, per-sample weights) against a per-unit reference;
* end-to-end models: a trained LSTM sentiment classifier, a bidirectional GRU tagger and an
  EmbeddingBag text classifier, explained with jit and vmap (batch == loop), both modes.
"""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
import reference as ref
from dlbjax.engine.interpret import constants_to_jax, evaluate
from dlbjax.importers import import_model

RULES = ("half", "dlb", "signal_take_all")


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _variant(ex, mode="default", rule="half"):
    """The same imported model with other rule options (saves an export per variant)."""
    return ex.replace(mode=mode, product_rule=rule)


def _relevance(ex, inputs, seeds, mode="default", rule="half"):
    f = jax.jit(_variant(ex, mode, rule).relevance_function())
    out = f(ex.constants, tuple(jnp.asarray(a) for a in inputs), tuple(jnp.asarray(s) for s in seeds))
    return jax.tree_util.tree_map(np.asarray, out)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
class Recurrent(nn.Module):
    """x [B, T, I] -> (output [B, T, D*H], h_n [B, L*D, H][, c_n]) whatever the layer's layout."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        bf = self.rnn.batch_first
        out, state = self.rnn(x if bf else x.transpose(0, 1))
        out = out if bf else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        return (out,) + tuple(s.transpose(0, 1) for s in states)


class AllOutputs(nn.Module):
    """One output vector holding output, h_n (and c_n), so one seed reaches all three (§10 R6);
    optional initial states as forward inputs (R3)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0=None, c0=None):
        lstm = isinstance(self.rnn, nn.LSTM)
        init = None if h0 is None else ((h0, c0) if lstm else h0)
        out, st = self.rnn(x, init)
        parts = [out] + (list(st) if lstm else [st])
        return torch.cat([p.reshape(-1) for p in parts])[None]


def _rnn(kind, layers=1, bidirectional=False, bias=True, batch_first=True, I=3, H=4, seed=0, proj=0):
    torch.manual_seed(seed)
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    extra = {"proj_size": proj} if proj else {}
    rnn = cls(I, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
              batch_first=batch_first, dropout=0.3 if layers > 1 else 0.0, **extra)
    with torch.no_grad():  # larger weights than torch's init: saturated and sign-mixed units
        for p in rnn.parameters():
            p.mul_(2.5)
    return rnn.eval()


FORWARD_CONFIGS = [  # (kind, layers, bidirectional, bias, batch_first, proj_size): every flag both
    # ways per cell
    ("lstm", 2, True, True, False, 0), ("lstm", 1, False, False, True, 2),
    ("gru", 2, True, False, True, 0), ("gru", 1, False, True, False, 0),
]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("cfg", FORWARD_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_torch_jit_and_vmap(cfg):
    kind, layers, bidir, bias, bf, proj = cfg
    model = Recurrent(_rnn(kind, layers, bidir, bias, bf, proj=proj))
    x = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = [o.numpy() for o in model(x)]
    program, _ = import_model(model, x[:1])
    ops = [e.op for e in program.eqns]
    assert ops.count(f"aten.{kind}.input") == 1 and len(ops) < 12  # one op, not an unrolled loop
    consts = constants_to_jax(program)
    rows = jnp.asarray(x.numpy())[:, None]
    got = jax.jit(jax.vmap(lambda r: tuple(evaluate(program, consts, [r]))))(rows)
    for g, e in zip(got, expected):
        assert _rel_err(np.asarray(g)[:, 0], e) <= 1e-5
    # a batch of 3 inside one program (B > 1 in the scan), jitted
    program3, _ = import_model(model, x)
    got3 = jax.jit(lambda v: tuple(evaluate(program3, constants_to_jax(program3), [v])))(
        jnp.asarray(x.numpy()))
    for g, e in zip(got3, expected):
        assert _rel_err(g, e) <= 1e-5


# ------------------------------------------------------------------------------------------------
# The slow reference: per step, per gate, per unit, in float64 (spec §4.7, §10; GRU as in
# rules/recurrent.py's docstring)
# ------------------------------------------------------------------------------------------------
def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


class Reference:
    """Relevance of one row through a (multi-layer, bidirectional) LSTM/GRU. Relevance arrays have a
    leading stream axis S (1 in default mode, 2 = (R+, R-) in contrastive mode)."""

    def __init__(self, S, rule):
        self.S, self.rule = S, rule

    def unit(self, xv, wv, b, R):
        """One affine unit (§2.1 ungated / §3.2): (relevance per input [S, n], bias share)."""
        if self.S == 1:
            r, k = ref.unit_default(xv, wv, b, R[0])
            return r[None], k
        p, n = ref.unit_contrastive(xv, wv, b, R[0], R[1])
        return np.stack([p, n]), 0.0

    def add(self, vals, const, R):
        """Add rule over scalar operands; a constant addend is a bias (§4.4, §9.1)."""
        r, k = self.unit(np.asarray(vals, np.float64), np.ones(len(vals)),
                         0.0 if const is None else const, R)
        return [r[:, m] for m in range(len(vals))], k

    def prod(self, gate, signal, R):
        """Product rule (§10 R4): (R_gate, R_signal)."""
        if self.rule == "half":
            fr = 0.5
        elif self.rule == "signal_take_all":
            fr = 0.0
        else:
            y = gate * signal
            da, db = abs(y - gate), abs(y - signal)
            fr = da / (da + db) if da + db > 0 else 0.5
        return fr * R, R - fr * R

    def lstm_direction(self, X, w, order, R_ext, R_hn, R_cn, h0, c0, const_h, const_c):
        W_ih, W_hh, b_ih, b_hh, W_hr = w
        H = W_hh.shape[0] // 4
        h, c, rec = h0, c0, {}
        for t in order:  # forward in processing order
            xg, rg = W_ih @ X[t] + b_ih, W_hh @ h + b_hh
            a = xg + rg
            i, f, g, o = _sig(a[:H]), _sig(a[H:2 * H]), np.tanh(a[2 * H:3 * H]), _sig(a[3 * H:])
            c_new = f * c + i * g
            rec[t] = (h, c, xg, rg, i, f, g, o, c_new)
            h, c = o * np.tanh(c_new), c_new
            h = h if W_hr is None else W_hr @ h
        R_X, kept = np.zeros((self.S,) + X.shape), 0.0
        R_h, R_c = R_hn.copy(), R_cn.copy()
        for t in reversed(order):  # backward through time
            h_p, c_p, xg, rg, i, f, g, o, c_t = rec[t]
            first = t == order[0]
            Rh = R_ext[:, t] + R_h
            if W_hr is not None:  # projection h = W_hr m: the dense rule onto m = o tanh(c)
                Rm = np.zeros((self.S, H))
                for q in range(W_hr.shape[0]):
                    r, k = self.unit(o * np.tanh(c_t), W_hr[q], 0.0, Rh[:, q])
                    Rm, kept = Rm + r, kept + k
                Rh = Rm
            R_a, R_cp = np.zeros((self.S, 4 * H)), np.zeros((self.S, H))
            for j in range(H):
                Ro, Rtc = self.prod(o[j], np.tanh(c_t[j]), Rh[:, j])
                (Rfc, Rig), _ = self.add([f[j] * c_p[j], i[j] * g[j]], None, Rtc + R_c[:, j])
                if first and const_c:
                    Rf = Rfc
                else:
                    Rf, R_cp[:, j] = self.prod(f[j], c_p[j], Rfc)
                Ri, Rg = self.prod(i[j], g[j], Rig)
                for q, r in enumerate((Ri, Rf, Rg, Ro)):
                    R_a[:, q * H + j] = r
            R_hp = np.zeros((self.S,) + h_p.shape)
            for u in range(4 * H):
                if first and const_h:
                    (Rx,), k = self.add([xg[u]], rg[u], R_a[:, u])
                else:
                    (Rx, Rr), k = self.add([xg[u], rg[u]], None, R_a[:, u])
                    r, k2 = self.unit(h_p, W_hh[u], b_hh[u], Rr)
                    R_hp, k = R_hp + r, k + k2
                r, k3 = self.unit(X[t], W_ih[u], b_ih[u], Rx)
                R_X[:, t] += r
                kept += k + k3
            R_h, R_c = R_hp, R_cp
        return R_X, R_h, R_c, kept

    def gru_direction(self, X, w, order, R_ext, R_hn, R_cn, h0, c0, const_h, const_c):
        W_ih, W_hh, b_ih, b_hh, _ = w
        H = W_hh.shape[1]
        h, rec = h0, {}
        for t in order:
            xg, hg = W_ih @ X[t] + b_ih, W_hh @ h + b_hh
            r, z = _sig(xg[:H] + hg[:H]), _sig(xg[H:2 * H] + hg[H:2 * H])
            n = np.tanh(xg[2 * H:] + r * hg[2 * H:])
            rec[t] = (h, xg, hg, r, z, n)
            h = (1 - z) * n + z * h
        R_X, kept = np.zeros((self.S,) + X.shape), 0.0
        R_h = R_hn.copy()
        for t in reversed(order):
            h_p, xg, hg, r, z, n = rec[t]
            const = t == order[0] and const_h
            Rh = R_ext[:, t] + R_h
            R_xg, R_hg, R_hp = (np.zeros((self.S, 3 * H)), np.zeros((self.S, 3 * H)),
                                np.zeros((self.S, H)))
            for j in range(H):
                xr, xz, xn, hr, hz, hn = xg[j], xg[H + j], xg[2 * H + j], hg[j], hg[H + j], hg[2 * H + j]
                (Ru, Rv), _ = self.add([(1 - z[j]) * n[j], z[j] * h_p[j]], None, Rh[:, j])
                R1mz, Rn = self.prod(1 - z[j], n[j], Ru)
                if const:
                    Rzv = Rv
                else:
                    Rzv, Rhd = self.prod(z[j], h_p[j], Rv)
                    R_hp[:, j] += Rhd
                Rz = R1mz + Rzv
                (Rxn, Rrh), _ = self.add([xn, r[j] * hn], None, Rn)
                if const:
                    Rr = Rrh
                    (Rxr,), k1 = self.add([xr], hr, Rr)
                    (Rxz,), k2 = self.add([xz], hz, Rz)
                    kept += k1 + k2
                else:
                    Rr, R_hg[:, 2 * H + j] = self.prod(r[j], hn, Rrh)
                    (Rxr, R_hg[:, j]), _ = self.add([xr, hr], None, Rr)
                    (Rxz, R_hg[:, H + j]), _ = self.add([xz, hz], None, Rz)
                R_xg[:, j], R_xg[:, H + j], R_xg[:, 2 * H + j] = Rxr, Rxz, Rxn
            for u in range(3 * H):
                rx, k = self.unit(X[t], W_ih[u], b_ih[u], R_xg[:, u])
                R_X[:, t] += rx
                kept += k
                if not const:
                    rh, k = self.unit(h_p, W_hh[u], b_hh[u], R_hg[:, u])
                    R_hp += rh
                    kept += k
            R_h = R_hp
        return R_X, R_h, None, kept

    def run(self, rnn, x, R_out, R_hn, R_cn, h0, c0, const_state):
        """x [T, I] (one row); R_out [S, T, D*H]; R_hn, R_cn, h0, c0 [L*D, H] (R_cn, c0 LSTM only).
        Returns (R_x [S, T, I], R_h0, R_c0, kept)."""
        lstm = isinstance(rnn, nn.LSTM)
        L, D, H = rnn.num_layers, 2 if rnn.bidirectional else 1, rnn.hidden_size
        Hp = getattr(rnn, "proj_size", 0) or H  # the size of h (projected) and of the output
        T = x.shape[0]
        P = {k: v.detach().numpy().astype(np.float64) for k, v in rnn.named_parameters()}

        def weights(layer, d):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            G = P["weight_hh" + sfx].shape[0]
            zero = np.zeros(G)
            return (P["weight_ih" + sfx], P["weight_hh" + sfx], P.get("bias_ih" + sfx, zero),
                    P.get("bias_hh" + sfx, zero), P.get("weight_hr" + sfx))

        direction = self.lstm_direction if lstm else self.gru_direction
        inputs, seq = [], x
        for layer in range(L):  # forward pass for the layer inputs
            inputs.append(seq)
            outs = []
            for d in range(D):
                W_ih, W_hh, b_ih, b_hh, W_hr = weights(layer, d)
                k = layer * D + d
                h, c = h0[k], (c0[k] if lstm else None)
                out = np.zeros((T, Hp))
                for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                    if lstm:
                        a = W_ih @ seq[t] + b_ih + W_hh @ h + b_hh
                        c = _sig(a[H:2 * H]) * c + _sig(a[:H]) * np.tanh(a[2 * H:3 * H])
                        h = _sig(a[3 * H:]) * np.tanh(c)
                        h = h if W_hr is None else W_hr @ h
                    else:
                        xg, hg = W_ih @ seq[t] + b_ih, W_hh @ h + b_hh
                        r, z = _sig(xg[:H] + hg[:H]), _sig(xg[H:2 * H] + hg[H:2 * H])
                        h = (1 - z) * np.tanh(xg[2 * H:] + r * hg[2 * H:]) + z * h
                    out[t] = h
                outs.append(out)
            seq = np.concatenate(outs, axis=1)
        R_seq, kept = R_out, 0.0
        R_h0, R_c0 = np.zeros((self.S, L * D, Hp)), np.zeros((self.S, L * D, H))
        for layer in reversed(range(L)):  # top-down (R7)
            R_in = np.zeros((self.S,) + inputs[layer].shape)
            for d in range(D):
                k = layer * D + d
                order = list(range(T)) if d == 0 else list(range(T - 1, -1, -1))
                R_x, R_h0[:, k], rc, kp = direction(
                    inputs[layer], weights(layer, d), order, R_seq[:, :, d * Hp:(d + 1) * Hp],
                    R_hn[:, k], R_cn[:, k] if lstm else None, h0[k], c0[k] if lstm else None,
                    const_state, const_state)
                if lstm:
                    R_c0[:, k] = rc
                R_in += R_x
                kept += kp
            R_seq = R_in
        return R_seq, R_h0, R_c0, kept


REF_CONFIGS = {  # (kind, layers, bidirectional, bias, batch_first, proj_size) -> (mode, product
    # rule) variants; together every (cell, mode, rule) combination is compared at least once
    ("lstm", 2, True, True, True, 0): [("default", "half"), ("default", "dlb"),
                                       ("contrastive", "signal_take_all")],
    ("lstm", 1, False, False, False, 0): [("default", "signal_take_all"), ("contrastive", "half"),
                                          ("contrastive", "dlb")],
    ("lstm", 2, True, True, False, 2): [("default", "half"), ("contrastive", "half")],
    ("gru", 2, True, True, False, 0): [("default", "half"), ("default", "signal_take_all"),
                                       ("contrastive", "dlb")],
    ("gru", 1, False, False, True, 0): [("default", "dlb"), ("contrastive", "half"),
                                        ("contrastive", "signal_take_all")],
}


def _check_against_reference(rnn, x, ex, inputs, state_inputs, rng, modes_rules):
    lstm = isinstance(rnn, nn.LSTM)
    L, D, H = rnn.num_layers, 2 if rnn.bidirectional else 1, rnn.hidden_size
    Hp = getattr(rnn, "proj_size", 0) or H
    T = x.shape[0]
    n_out, n_state = T * D * Hp, L * D * Hp
    h0 = state_inputs[0][:, 0] if state_inputs else np.zeros((L * D, Hp))
    c0 = state_inputs[1][:, 0] if state_inputs and lstm else np.zeros((L * D, H))
    for mode, rule in modes_rules:
        S = 2 if mode == "contrastive" else 1
        seeds = [np.abs(rng.normal(size=(1, n_out + n_state + (L * D * H if lstm else 0))))
                 for _ in range(S)]
        seeds[0][0, 2] = 0.0  # an output with no seed
        out = _relevance(ex, inputs, seeds, mode, rule)
        seed = np.stack([s[0] for s in seeds])
        R_out = seed[:, :n_out].reshape(S, T, D * Hp)  # batch of one: time-major either way
        R_hn = seed[:, n_out:n_out + n_state].reshape(S, L * D, Hp)
        R_cn = seed[:, n_out + n_state:].reshape(S, L * D, H) if lstm else None
        R_x, R_h0, R_c0, kept = Reference(S, rule).run(rnn, x, R_out, R_hn, R_cn, h0, c0,
                                                       const_state=not state_inputs)
        names = ex.input_names
        got = np.stack(out.relevance[names[0]]).reshape(R_x.shape)
        np.testing.assert_allclose(got, R_x, rtol=1e-9, atol=1e-11, err_msg=f"{mode} {rule}")
        if mode == "default":
            assert out.absorbed[0] == pytest.approx(kept, rel=1e-9, abs=1e-11)
            # per-row budget: input + initial states + bias shares = seed (zero totals aside)
            total = got.sum() + kept + (R_h0.sum() + R_c0.sum() if state_inputs else 0.0)
            assert total == pytest.approx(seed.sum(), rel=1e-9)
        if state_inputs:
            np.testing.assert_allclose(np.stack(out.relevance[names[1]])[:, :, 0], R_h0,
                                       rtol=1e-9, atol=1e-11)
            if lstm:
                np.testing.assert_allclose(np.stack(out.relevance[names[2]])[:, :, 0], R_c0,
                                           rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cfg", list(REF_CONFIGS), ids=lambda c: "-".join(map(str, c)))
def test_scan_rule_equals_per_step_reference(cfg):
    kind, layers, bidir, bias, bf, proj = cfg
    rng = np.random.default_rng(sum(map(int, cfg[1:])) + len(kind))
    with jax.enable_x64(True):
        rnn = _rnn(kind, layers, bidir, bias, bf, I=3, H=3, proj=proj).double()
        x = rng.normal(size=(5, 3))
        x[1, 0] = 0.0
        xt = torch.from_numpy(x[None] if bf else x[:, None])
        ex = dlbjax.Explainer(AllOutputs(rnn), xt, batch_axis=None, task="regression")
        _check_against_reference(rnn, x, ex, [xt.numpy()], None, rng, REF_CONFIGS[cfg])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_state_inputs_carry_relevance(kind):
    """R3: initial states passed as forward inputs are not constants; they get relevance."""
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        rnn = _rnn(kind, 2, True, True, False, I=3, H=3, seed=3).double()
        x = rng.normal(size=(4, 3))
        states = [rng.normal(size=(4, 1, 3)) for _ in range(2 if kind == "lstm" else 1)]
        args = (torch.from_numpy(x[:, None]),) + tuple(torch.from_numpy(s) for s in states)
        ex = dlbjax.Explainer(AllOutputs(rnn), args, batch_axis=None, task="regression")
        _check_against_reference(rnn, x, ex, [a.numpy() for a in args], states, rng,
                                 [("default", "dlb"), ("contrastive", "half")])


class FinalState(nn.Module):
    """The common classifier pattern ``_, (h_n, c_n) = rnn(x); head(h_n[-1])``: the output is the
    last layer's final state (``which`` = 0 for h_n, 1 for c_n), both directions concatenated
    when bidirectional; the output sequence is unused."""

    def __init__(self, rnn, which=0):
        super().__init__()
        self.rnn, self.which = rnn, which

    def forward(self, x):  # x [B, T, I] whatever the layer's layout
        _, st = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        s = st[self.which] if isinstance(st, tuple) else st
        D = 2 if self.rnn.bidirectional else 1
        return torch.cat([s[k] for k in range(s.shape[0] - D, s.shape[0])], dim=-1)


FINAL_STATE_CONFIGS = [  # (kind, layers, bidirectional, batch_first, which)
    ("lstm", 2, True, True, 1), ("lstm", 2, False, False, 0), ("gru", 2, True, False, 0),
]


@pytest.mark.parametrize("cfg", FINAL_STATE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_heads_on_the_final_state_equal_the_reference(cfg):
    """A batched model that reads only h_n (or c_n) of the last layer: per row, the relevance
    equals the per-step reference seeded at those state positions (nothing at the sequence)."""
    kind, layers, bidir, bf, which = cfg
    rng = np.random.default_rng(len(kind) + 3 * layers + bidir + 2 * which)
    with jax.enable_x64(True):
        rnn = _rnn(kind, layers, bidir, True, bf, I=3, H=3, seed=4).double()
        B, T, L, D, H = 2, 5, layers, 2 if bidir else 1, 3
        x = rng.normal(size=(B, T, 3))
        xt = torch.from_numpy(x)
        ex = dlbjax.Explainer(FinalState(rnn, which), xt, task="regression")
        with torch.no_grad():
            np.testing.assert_allclose(ex(xt).prediction, FinalState(rnn, which)(xt).numpy(),
                                       rtol=1e-12)
        for mode, rule in [("default", "half"), ("contrastive", "dlb")]:
            S = 2 if mode == "contrastive" else 1
            f = jax.jit(_variant(ex, mode, rule).relevance_function())  # one compile per mode
            for b in range(B):  # the pass of one row, in the row layout [1, ...]
                seed = np.abs(rng.normal(size=(S, D * H)))
                out = f(ex.constants, (jnp.asarray(x[b:b + 1]),),
                        tuple(jnp.asarray(s[None]) for s in seed))
                out = jax.tree_util.tree_map(np.asarray, out)
                got = np.stack(out.relevance[ex.input_names[0]]).reshape(S, T, 3)
                R_state = np.zeros((S, L * D, H))
                R_state[:, (L - 1) * D:] = seed.reshape(S, D, H)
                zero = np.zeros((S, L * D, H))
                R_hn, R_cn = (R_state, zero) if which == 0 else (zero, R_state)
                R_x, _, _, kept = Reference(S, rule).run(
                    rnn, x[b], np.zeros((S, T, D * H)), R_hn, R_cn if kind == "lstm" else None,
                    np.zeros((L * D, H)), np.zeros((L * D, H)), const_state=True)
                np.testing.assert_allclose(got, R_x, rtol=1e-9, atol=1e-11,
                                           err_msg=f"{mode} {rule} row {b}")
                if mode == "default":
                    assert R_x.sum() + kept == pytest.approx(seed.sum(), rel=1e-9)
                    assert out.absorbed[0] == pytest.approx(kept, rel=1e-9, abs=1e-11)
        # the public batched call equals one call per row (vmap == loop)
        name = ex.input_names[0]
        batched = np.asarray(ex(xt).relevance[name])
        for b in range(B):
            np.testing.assert_allclose(batched[b], np.asarray(ex(xt[b:b + 1]).relevance[name])[0],
                                       rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Conservation, padding, long sequences
# ------------------------------------------------------------------------------------------------
class TokenRNN(nn.Module):
    """embedding -> recurrent layer(s) -> linear on one time step (the last by default)."""

    def __init__(self, kind="lstm", vocab=12, emb=8, hidden=16, layers=2, bidirectional=False,
                 bias=True, classes=2, step=-1):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(emb, hidden, num_layers=layers, batch_first=True, bias=bias,
                       bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), classes, bias=bias)
        self.step = step

    def forward(self, input_ids):
        out, _ = self.rnn(self.emb(input_ids))
        return self.fc(out[:, self.step])


CONSERVATION = {  # (kind, bias) -> product rules checked in default mode (None: contrastive)
    ("lstm", True): ["half", "dlb", "signal_take_all", None],
    ("lstm", False): ["half"],
    ("gru", True): ["half", "signal_take_all", None],
    ("gru", False): ["dlb"],
}


@pytest.mark.parametrize("case", list(CONSERVATION), ids=lambda c: f"{c[0]}-bias={c[1]}")
def test_conservation_every_product_rule(case):
    """§10 "Conservation under half" (and dlb, signal_take_all): per row Σ R + absorbed = M."""
    kind, bias = case
    torch.manual_seed(5)
    model = TokenRNN(kind, bias=bias).eval()
    ids = torch.randint(0, 12, (4, 9), generator=torch.Generator().manual_seed(2))
    ex = dlbjax.Explainer(model, ids)
    for rule in CONSERVATION[case]:
        if rule is None:  # contrastive: each stream conserved (no bias share; no T = 0 here)
            c = _variant(ex, mode="contrastive")(ids).conservation
            for s in (0, 1):
                np.testing.assert_allclose(c.inputs[s] + c.lost[s], c.seed[s], rtol=1e-5)
                assert np.abs(c.lost[s]).max() <= 1e-3
            continue
        e = _variant(ex, rule=rule)(ids)
        c = e.conservation
        total = e.relevance["input_ids"].sum(axis=1) + c.bias
        np.testing.assert_allclose(total, 100.0, rtol=2e-5)
        assert np.all(e.relevance["input_ids"] >= 0)
        if not bias:
            assert np.all(c.bias == 0)
            np.testing.assert_allclose(e.relevance["input_ids"].sum(axis=1), 100.0, rtol=2e-5)
        print(f"{kind} bias={bias} {rule}: input {e.relevance['input_ids'].sum(1).round(3)} "
              f"bias {c.bias.round(3)} lost {np.abs(c.lost).max():.2e}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_padded_steps_after_the_selected_step_get_exactly_zero(kind):
    """R11: with the head on step t*, a forward direction sends nothing to later (padded) steps;
    a reverse direction does."""
    torch.manual_seed(6)
    ids = torch.randint(1, 12, (3, 9), generator=torch.Generator().manual_seed(3))
    ids[:, 5:] = 0  # padding after the selected step 4
    model = TokenRNN(kind, step=4).eval()
    e = dlbjax.explain(model, ids)
    assert np.all(e.relevance["input_ids"][:, 5:] == 0.0)
    assert np.all(e.relevance["input_ids"][:, :5].sum(1) > 0)
    if kind == "lstm":
        bi = TokenRNN(kind, step=4, bidirectional=True).eval()
        e = dlbjax.explain(bi, ids)
        assert np.all(e.relevance["input_ids"][:, 5:].sum(1) > 0)


class LastRealStep(nn.Module):
    """A head on the last non-padded step, indices computed from input_ids (constants, §9.1)."""

    def __init__(self, kind):
        super().__init__()
        self.inner = TokenRNN(kind)

    def forward(self, input_ids):
        out, _ = self.inner.rnn(self.inner.emb(input_ids))
        last = (input_ids != 0).sum(1) - 1
        return self.inner.fc(out[torch.arange(input_ids.shape[0]), last])


def test_last_real_step_head_with_right_padding():
    torch.manual_seed(7)
    model = LastRealStep("lstm").eval()
    ids = torch.randint(1, 12, (3, 8), generator=torch.Generator().manual_seed(4))
    lengths = [8, 5, 3]
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    ex = dlbjax.Explainer(model, ids)
    e = ex(ids)
    with torch.no_grad():
        np.testing.assert_allclose(e.prediction, model(ids).numpy(), rtol=1e-5, atol=1e-6)
    for i, n in enumerate(lengths):
        assert np.all(e.relevance["input_ids"][i, n:] == 0.0)
        assert e.relevance["input_ids"][i, :n].sum() + e.conservation.bias[i] == \
            pytest.approx(100.0, rel=2e-5)


def test_128_steps_compile_in_seconds():
    torch.manual_seed(8)
    model = TokenRNN("lstm", vocab=50, emb=16, hidden=32, layers=2, bidirectional=True).eval()
    ids = torch.randint(0, 50, (2, 128), generator=torch.Generator().manual_seed(5))
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, ids)
    t1 = time.perf_counter()
    e = ex(ids)
    t2 = time.perf_counter()
    ex(ids)
    t3 = time.perf_counter()
    print(f"128 steps, 2-layer bidirectional LSTM(16->32): import {t1 - t0:.1f} s, first call "
          f"(trace + compile + run) {t2 - t1:.1f} s, second call {1e3 * (t3 - t2):.1f} ms")
    assert t2 - t1 < 60.0
    np.testing.assert_allclose(e.relevance["input_ids"].sum(1) + e.conservation.bias, 100.0, rtol=1e-4)


def test_signal_take_all_rejects_generic_products():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)) * x)

    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="signal_take_all"):
        dlbjax.explain(Gated(), x, product_rule="signal_take_all")
    with pytest.raises(ValueError, match="product_rule"):
        dlbjax.Explainer(Gated(), x, product_rule="gate_take_all")


# ------------------------------------------------------------------------------------------------
# EmbeddingBag
# ------------------------------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self, mode, padding_idx=None, vocab=10, dim=4):
        super().__init__()
        torch.manual_seed(9)
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx)
        with torch.no_grad():  # small integers: exact ties in max mode, zeros
            self.bag.weight.copy_(torch.randint(-3, 4, self.bag.weight.shape).double())

    def forward(self, indices, offsets, weights=None):
        return self.bag(indices, offsets, per_sample_weights=weights)


def _bag_reference(mode, W, idx, offsets, R, psw=None, pad=None, S=1):
    """Per bag and feature: the add rule over the members (sum/mean), winners (max)."""
    n_bags, H = R.shape[1:]
    out, rw = np.zeros((S, len(idx))), np.zeros((S, len(idx)))
    bounds = list(offsets) + [len(idx)]
    for b in range(n_bags):
        members = [m for m in range(bounds[b], bounds[b + 1]) if idx[m] != pad]
        if not members:
            continue
        for h in range(H):
            v = np.array([W[idx[m], h] * (1.0 if psw is None else psw[m]) for m in members])
            if mode == "max":
                win = v == v.max()
                share = R[:, b, h][:, None] * win[None] / win.sum()
            elif S == 1:
                share = ref.unit_default(v, np.ones(len(v)), 0.0, R[0, b, h])[0][None]
            else:
                share = np.stack(ref.unit_contrastive(v, np.ones(len(v)), 0.0, R[0, b, h], R[1, b, h]))
            for q, m in enumerate(members):
                if psw is None:
                    out[:, m] += share[:, q]
                else:  # "half": the member's share is split between the weight and the index
                    out[:, m] += share[:, q] / 2
                    rw[:, m] += share[:, q] / 2
    return out, rw


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_equals_per_unit_reference(mode):
    rng = np.random.default_rng(12)
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 7, 7])
    offsets = torch.tensor([0, 4, 4, 7])  # an empty bag
    with jax.enable_x64(True):
        for pad in (None, 4):
            model = Bag(mode, pad).double().eval()
            ex = dlbjax.Explainer(model, (idx, offsets), batch_axis=None, task="regression")
            W = model.bag.weight.detach().numpy()
            for m in ("default", "contrastive") if mode != "max" else ("default", "contrastive"):
                S = 2 if m == "contrastive" else 1
                seeds = [np.abs(rng.normal(size=(4, 4))) for _ in range(S)]
                out = _relevance(ex, [idx.numpy(), offsets.numpy()], seeds, mode=m)
                expected, _ = _bag_reference(mode, W, idx.numpy(), offsets.numpy(), np.stack(seeds),
                                             pad=pad, S=S)
                np.testing.assert_allclose(np.stack(out.relevance["indices"]), expected,
                                           rtol=1e-10, atol=1e-12)
                assert np.all(np.stack(out.relevance["offsets"]) == 0)
        # per-sample weights (sum mode) are an input: the product rule splits each member's share
        if mode == "sum":
            model = Bag("sum").double().eval()
            psw = torch.from_numpy(rng.uniform(-1, 2, size=10))
            ex = dlbjax.Explainer(model, (idx, offsets, psw), batch_axis=None, task="regression")
            seeds = [np.abs(rng.normal(size=(4, 4)))]
            out = _relevance(ex, [idx.numpy(), offsets.numpy(), psw.numpy()], seeds)
            exp_i, exp_w = _bag_reference("sum", model.bag.weight.detach().numpy(), idx.numpy(),
                                          offsets.numpy(), np.stack(seeds), psw=psw.numpy())
            np.testing.assert_allclose(out.relevance["indices"][0], exp_i[0], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(out.relevance["weights"][0], exp_w[0], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Models explained end to end
# ------------------------------------------------------------------------------------------------
def _batch_equals_loop(ex, data, key, target=None):
    e = ex.batch(data, target=target, batch_size=4)
    for i in range(len(data)):
        one = ex(data[i:i + 1], target=None if target is None else target[i:i + 1])
        np.testing.assert_allclose(e.relevance[key][i], one.relevance[key][0], rtol=1e-4, atol=1e-5)
    return e


def _report(name, e):
    c = e.conservation
    if isinstance(c.seed, dlbjax.Streams):
        print(f"{name} contrastive (row means): seed+ {c.seed.positive.mean():.3f} inputs+ "
              f"{c.inputs.positive.mean():.3f} lost+ max {np.abs(c.lost.positive).max():.2e}; seed- "
              f"{c.seed.negative.mean():.3f} inputs- {c.inputs.negative.mean():.3f} lost- max "
              f"{np.abs(c.lost.negative).max():.2e}")
    else:
        print(f"{name} default (row means): seed {c.seed.mean():.1f} inputs {c.inputs.mean():.3f} bias "
              f"{c.bias.mean():.3f} lost max {np.abs(c.lost).max():.2e}")


def test_lstm_sentiment_classifier_finds_the_positive_token():
    """embedding -> 2-layer LSTM -> linear on the last step, trained on "label = 1 iff token 1
    occurs". With "signal_take_all" (gates get 0: the cell-state path carries everything back) the
    positive token gets the top relevance in every positive row; with "half" every step gives
    half of the cell relevance to the forget gate, i.e. to the current inputs, so relevance decays
    backward in time (recency) and the positive token only gets more than its uniform share."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    T = 10

    def data(n):
        ids = torch.randint(2, 12, (n, T), generator=g)
        pos = torch.rand(n, generator=g) < 0.5
        where = torch.randint(0, T, (n,), generator=g)
        ids[pos, where[pos]] = 1
        return ids, pos.long()

    model = TokenRNN("lstm", vocab=12, emb=8, hidden=16, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add contention on a shared machine
    try:
        t0 = time.perf_counter()
        for _ in range(300):
            ids, y = data(32)
            loss = nn.functional.cross_entropy(model(ids), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    test_ids, test_y = data(48)
    with torch.no_grad():
        acc = (model(test_ids).argmax(1) == test_y).float().mean().item()
    print(f"sentiment LSTM: trained in {time.perf_counter() - t0:.1f} s, accuracy {acc:.3f}")
    assert acc >= 0.95
    ex = dlbjax.Explainer(model, test_ids[:1])
    positive = (test_y == 1).numpy()
    where = (test_ids[torch.from_numpy(positive)] == 1).numpy()
    shares = {}
    for mode, rule in [("default", "half"), ("default", "signal_take_all"), ("contrastive", "half")]:
        e = _variant(ex, mode, rule).batch(test_ids, batch_size=48)
        if rule == "half" and mode == "default":  # vmapped batch == a loop over rows
            for i in range(3):
                one = ex(test_ids[i:i + 1])
                np.testing.assert_allclose(e.relevance["input_ids"][i], one.relevance["input_ids"][0],
                                           rtol=1e-4, atol=1e-5)
        _report(f"sentiment LSTM ({rule})", e)
        rel = e.relevance["input_ids"]
        rel = (rel.positive if mode == "contrastive" else rel)[positive]
        top = (rel.argmax(1) == where.argmax(1)).mean()
        share = ((rel * where).sum(1) / rel.sum(1)).mean()
        shares[(mode, rule)] = (top, share)
        print(f"sentiment LSTM {mode} {rule}: the positive token has the top relevance in "
              f"{top:.2f} of {positive.sum()} positive rows; its mean share {share:.2f} "
              f"(uniform {1 / T:.2f})")
        if mode == "default":
            np.testing.assert_allclose(e.relevance["input_ids"].sum(1) + e.conservation.bias, 100.0,
                                       rtol=1e-4)
    assert shares[("default", "signal_take_all")][0] >= 0.9
    assert shares[("default", "half")][1] > 1 / T
    assert shares[("contrastive", "half")][1] > 1 / T


class Tagger(nn.Module):
    """Bidirectional GRU tagger: per-token class logits [B, T, C]."""

    def __init__(self, vocab=12, emb=8, hidden=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, input_ids):
        out, _ = self.rnn(self.emb(input_ids))
        return self.fc(out)


class TagAt(nn.Module):
    def __init__(self, tagger, position):
        super().__init__()
        self.tagger, self.position = tagger, position

    def forward(self, input_ids):
        return self.tagger(input_ids)[:, self.position]


def test_bidirectional_gru_tagger():
    torch.manual_seed(1)
    tagger = Tagger().eval()
    ids = torch.randint(0, 12, (6, 7), generator=torch.Generator().manual_seed(6))
    # one position and class of the [B, T, C] output: a regression target (flat index t*C + c)
    t, c = 3, 2
    ex = dlbjax.Explainer(tagger, ids[:1], task="regression")
    target = np.full(6, t * 3 + c)
    e = _batch_equals_loop(ex, ids, "input_ids", target=target)
    _report("GRU tagger", e)
    np.testing.assert_allclose(e.relevance["input_ids"].sum(1) + e.conservation.bias, 100.0, rtol=1e-4)
    assert np.all(e.relevance["input_ids"] > 0)  # both directions reach every token
    # the same position as a classifier (its argmax class), both modes
    at = TagAt(tagger, t).eval()
    ed = dlbjax.explain(at, ids, target=c)
    np.testing.assert_allclose(ed.relevance["input_ids"], e.relevance["input_ids"], rtol=1e-4, atol=1e-5)
    ec = dlbjax.explain(at, ids, mode="contrastive")
    _report("GRU tagger", ec)
    for s in ec.conservation.lost:
        assert np.abs(s).max() <= 1e-3


class BagClassifier(nn.Module):
    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.fc = nn.Linear(dim, classes)

    def forward(self, input_ids):
        return self.fc(torch.relu(self.bag(input_ids)))


def test_embedding_bag_text_classifier():
    torch.manual_seed(2)
    model = BagClassifier().eval()
    ids = torch.randint(0, 20, (6, 9), generator=torch.Generator().manual_seed(7))
    ex = dlbjax.Explainer(model, ids[:1])
    e = _batch_equals_loop(ex, ids, "input_ids")
    assert e.relevance["input_ids"].shape == (6, 9)
    with torch.no_grad():
        np.testing.assert_allclose(e.prediction, model(ids).numpy(), rtol=1e-5, atol=1e-6)
    _report("EmbeddingBag classifier", e)
    np.testing.assert_allclose(e.relevance["input_ids"].sum(1) + e.conservation.bias
                               + e.conservation.lost, 100.0, rtol=1e-5)
    assert np.abs(e.conservation.lost).max() <= 1e-3
    ec = dlbjax.Explainer(model, ids[:1], mode="contrastive").batch(ids)
    _report("EmbeddingBag classifier", ec)
    np.testing.assert_allclose(ec.conservation.inputs.positive + ec.conservation.lost.positive,
                               ec.conservation.seed.positive, rtol=1e-5)
