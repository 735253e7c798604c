"""AttnLRP (Achtibat et al., ICML 2024) as ``method="attnlrp"``.

* each rule against a slow per-element reference written here (NumPy loops, float64): the softmax
  rule (Prop. 3.1), the uniform epsilon rule of a product of two activations (Sec. 3.3.2) and
  LRP-epsilon with one constant operand, SDPA kept whole (no mask, causal, padding, float mask,
  GQA), layer norm / native layer norm / group norm with sigma frozen and RMS norm (Sec. 3.3.3);
  activations are identity and gated products split R/2 (inherited rules);
* the uniform rule conserves: sum R_A + sum R_B = sum R up to the stabiliser (exactly with 0);
* end to end: a tiny BERT classifier (sdpa and eager attention) and a tiny LLaMA causal LM run,
  give finite relevance, exactly 0 at padded tokens, batch == per row, eager == SDPA kept whole;
  a one-block transformer equals a reference relevance pass composed of the references here;
* typed errors for what is not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dlbjax
from dlbjax import MethodError, UnsupportedOperationError
from dlbjax.lowerings import TABLE
from dlbjax.rules import Options, RuleContext, RuleResult, get_rule

import hf_zoo

EPS = 1e-6  # attnlrp's default epsilon and stabilizer
M = "attnlrp"


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def call(op, args, kwargs=None, carries=None, R=None, params=None):
    """The attnlrp rule of ``op`` on numpy args: (per-argument relevance, absorbed)."""
    kwargs = kwargs or {}
    rule = get_rule(op, M)
    jargs = [jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    jkw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    outs = TABLE[op].fn(*jargs, **jkw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if carries is None:
        carries = tuple(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in args)
    assert rule.check is None or rule.check(carries) is None
    ctx = RuleContext(carries=carries, outputs=outs, gate=None, options=Options(method=M),
                      op=op, where="test", params=params or {"epsilon": EPS, "stabilizer": EPS})
    res = rule.default(ctx, jnp.asarray(R) if not isinstance(R, tuple) else R, *jargs, **jkw)
    rel, absorbed = (res.relevance, res.absorbed) if isinstance(res, RuleResult) else (res, None)
    return [None if r is None else np.asarray(r) for r in rel], \
        None if absorbed is None else float(absorbed)


def stab(z, s=EPS):
    return z + s * (1.0 if z >= 0 else -1.0)


# ------------------------------------------------------------------------------------------------
# slow references (float64 loops)
# ------------------------------------------------------------------------------------------------
def ref_softmax(x, R):
    """Prop. 3.1 row by row over the last axis; entries with probability 0 get 0."""
    x, R = np.asarray(x, np.float64), np.asarray(R, np.float64)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        live = [j for j in range(len(row)) if np.isfinite(row[j])]
        mx = max(row[j] for j in live) if live else 0.0
        e = {j: np.exp(row[j] - mx) for j in live}
        tot_e = sum(e.values())
        s = {j: e[j] / tot_e for j in live}
        live = [j for j in live if s[j] > 0]
        tot_r = sum(R[idx][j] for j in live)
        for i in live:
            out[idx][i] = row[i] * (R[idx][i] - s[i] * tot_r)
    return out


def ref_uniform(a, b, R, eps=EPS):
    """O = a @ b (2-D): R_a[i,j] = sum_k a_ij b_jk R_ik / stab(2 O_ik), R_b likewise."""
    n, m = a.shape
    p = b.shape[1]
    ra, rb = np.zeros_like(a), np.zeros_like(b)
    for i in range(n):
        for k in range(p):
            o = sum(a[i, j] * b[j, k] for j in range(m))
            d = stab(2 * o, eps)
            for j in range(m):
                c = a[i, j] * b[j, k] * R[i, k] / d
                ra[i, j] += c
                rb[j, k] += c
    return ra, rb


def ref_dense_epsilon(x, W, b, R, eps=EPS):
    """y_k = sum_j x_j W_jk + b_k: R_j = sum_k x_j W_jk R_k / stab(y_k); bias share."""
    rx, kept = np.zeros_like(x), 0.0
    for k in range(W.shape[1]):
        y = sum(x[j] * W[j, k] for j in range(len(x))) + (0 if b is None else b[k])
        for j in range(len(x)):
            rx[j] += x[j] * W[j, k] * R[k] / stab(y, eps)
        if b is not None:
            kept += b[k] * R[k] / stab(y, eps)
    return rx, kept


def ref_sdpa(R, q, k, v, keep=None, bias=None, causal=False, scale=None, eps=EPS):
    """The composition of the references over softmax(scale Q K^T + mask) V, per head; ``keep``
    a boolean mask, ``bias`` a float additive mask. Returns (R_q, R_k, R_v, absorbed)."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = H // Hk
    scale = 1 / np.sqrt(D) if scale is None else scale
    rq, rk, rv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    absorbed = 0.0
    for bi in range(B):
        for h in range(H):
            kh, vh = k[bi, h // rep], v[bi, h // rep]
            qk = q[bi, h] @ kh.T
            scores = qk * scale
            m = np.zeros((T, S))
            if bias is not None:
                m = m + bias
            if keep is not None:
                m = np.where(keep, m, -np.inf)
            if causal:
                m = np.where(np.tril(np.ones((T, S), bool)), m, -np.inf)
            logits = scores + m
            probs = np.zeros((T, S))
            for t in range(T):
                live = np.isfinite(logits[t])
                if live.any():
                    e = np.where(live, np.exp(logits[t] - logits[t][live].max()), 0)
                    probs[t] = e / e.sum()
            ra, rvh = ref_uniform(probs, vh, R[bi, h], eps)
            rl = ref_softmax(logits, ra)
            if bias is None:
                rs = rl
            else:  # z-rule of the add, the float mask a constant addend
                rs = np.zeros_like(rl)
                for t in range(T):
                    for s in range(S):
                        if np.isfinite(logits[t, s]):
                            g = rl[t, s] / stab(logits[t, s])
                            rs[t, s] = scores[t, s] * g
                            absorbed += m[t, s] * g
            rqh, rkth = ref_uniform(q[bi, h], kh.T, rs, eps)  # on the unscaled Q K^T
            rq[bi, h] += rqh
            rk[bi, h // rep] += rkth.T
            rv[bi, h // rep] += rvh
    return rq, rk, rv, absorbed


def ref_layer_norm(x, gamma, beta, R, eps_norm, eps=EPS):
    """One row: y_j = sum_i M_ji x_i + beta_j, M_ji = gamma_j / sigma (delta_ij - 1/n), sigma
    frozen; epsilon-LRP: R_i = sum_j M_ji x_i R_j / stab(y_j); bias share sum_j beta_j R_j/stab."""
    n = len(x)
    mu = sum(x) / n
    sigma = np.sqrt(sum((xi - mu) ** 2 for xi in x) / n + eps_norm)
    rx, kept = np.zeros(n), 0.0
    for j in range(n):
        y = sum(gamma[j] / sigma * ((i == j) - 1 / n) * x[i] for i in range(n)) + beta[j]
        for i in range(n):
            rx[i] += gamma[j] / sigma * ((i == j) - 1 / n) * x[i] * R[j] / stab(y, eps)
        kept += beta[j] * R[j] / stab(y, eps)
    return rx, kept


# ------------------------------------------------------------------------------------------------
# rules against the references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["aten._softmax.default", "aten.softmax.int"])
def test_softmax_rule_equals_prop_3_1(op, x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6)) * 2
    x[0, 0, 4:] = -np.inf  # a -inf mask
    x[0, 1, :2] = np.finfo(np.float64).min  # a finfo.min mask (HF eager)
    x[1, 2, :] = -np.inf  # a fully masked row
    R = rng.normal(size=x.shape)
    args = [x, -1, False] if op == "aten._softmax.default" else [x, -1]
    (r, *rest), _ = call(op, args, R=R)
    assert all(o is None for o in rest)
    assert np.isfinite(r).all()
    np.testing.assert_allclose(r, ref_softmax(x, R), rtol=1e-12, atol=1e-14)
    assert np.all(r[0, 0, 4:] == 0) and np.all(r[0, 1, :2] == 0) and np.all(r[1, 2] == 0)
    # masking a logit = removing it: the masked row equals the rule on its live part
    (r_cut, *_), _ = call(op, [x[:1, :1, :4].copy()] + args[1:], R=R[:1, :1, :4].copy())
    np.testing.assert_allclose(r[0, 0, :4], r_cut[0, 0], rtol=1e-12)
    # a wrong formula (identity, or the sign of the s-term) is far from it
    assert np.abs(r - R).max() > 0.1


def test_softmax_rule_along_an_inner_axis(x64):
    rng = np.random.default_rng(1)
    x, R = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 2))
    (r, *_), _ = call("aten._softmax.default", [x, 1, False], R=R)
    ref = np.moveaxis(ref_softmax(np.moveaxis(x, 1, -1), np.moveaxis(R, 1, -1)), -1, 1)
    np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", ["aten.mm.default", "aten.bmm.default", "aten.matmul.default"])
def test_uniform_rule_of_a_product_of_two_activations(op, x64):
    rng = np.random.default_rng(2)
    batched = op != "aten.mm.default"
    a = rng.normal(size=(2, 3, 4) if batched else (3, 4))
    b = rng.normal(size=(2, 4, 5) if batched else (4, 5))
    R = rng.normal(size=(2, 3, 5) if batched else (3, 5))
    (ra, rb), _ = call(op, [a, b], R=R)
    refs = [ref_uniform(a[i], b[i], R[i]) for i in range(2)] if batched else [ref_uniform(a, b, R)]
    ea, eb = (np.stack(z) for z in zip(*refs)) if batched else refs[0]
    np.testing.assert_allclose(ra, ea, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rb, eb, rtol=1e-10, atol=1e-12)


def test_uniform_rule_broadcasts_and_conserves(x64):
    """matmul of [2, 3, 4] by a shared [4, 5]: the shared operand sums its shares over the batch;
    with epsilon = 0, sum R_A + sum R_B = sum R exactly (each factor half of the bilinear form's
    epsilon-LRP), and with epsilon > 0 up to the stabiliser."""
    rng = np.random.default_rng(3)
    a, b, R = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=(2, 3, 5))
    (ra, rb), _ = call("aten.matmul.default", [a, b], R=R)
    refs = [ref_uniform(a[i], b, R[i]) for i in range(2)]
    np.testing.assert_allclose(ra, np.stack([r[0] for r in refs]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rb, sum(r[1] for r in refs), rtol=1e-10, atol=1e-12)
    (ra0, rb0), _ = call("aten.matmul.default", [a, b], R=R, params={"epsilon": 0.0})
    assert ra0.sum() + rb0.sum() == pytest.approx(R.sum(), rel=1e-12)
    # the two factors share each pair's contribution equally: R_A and R_B have equal totals
    assert ra0.sum() == pytest.approx(rb0.sum(), rel=1e-12)
    O = a @ b
    expected = (R * 2 * O / (2 * O + EPS * np.where(O >= 0, 1, -1))).sum()
    assert ra.sum() + rb.sum() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("side", [0, 1])
def test_a_product_with_a_constant_is_lrp_epsilon(side, x64):
    rng = np.random.default_rng(4)
    x, W = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    if side == 0:  # x @ W, W constant
        R = rng.normal(size=(3, 5))
        (rx, rw), kept = call("aten.mm.default", [x, W], carries=(True, False), R=R)
        assert rw is None
        ref = np.stack([ref_dense_epsilon(x[i], W, None, R[i])[0] for i in range(3)])
    else:  # W.T @ x.T, W.T constant: the same units transposed
        R = rng.normal(size=(5, 3))
        (rw, rx), kept = call("aten.mm.default", [W.T.copy(), x.T.copy()], carries=(False, True),
                              R=R)
        assert rw is None
        rx = rx.T
        ref = np.stack([ref_dense_epsilon(x[i], W, None, R[:, i])[0] for i in range(3)])
    np.testing.assert_allclose(rx, ref, rtol=1e-10, atol=1e-12)


def _sdpa_inputs(rng, h=2, hk=None, t=4, s=5, d=3):
    q = rng.normal(size=(2, h, t, d))
    k = rng.normal(size=(2, hk or h, s, d))
    v = rng.normal(size=(2, hk or h, s, d))
    return q, k, v, rng.normal(size=(2, h, t, d))


SDPA = "aten.scaled_dot_product_attention.default"


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "padding+causal", "float", "gqa",
                                  "scale"])
def test_sdpa_kept_whole_equals_the_composed_references(case, x64):
    rng = np.random.default_rng(5)
    q, k, v, R = _sdpa_inputs(rng, h=4 if case == "gqa" else 2, hk=2 if case == "gqa" else None,
                              s=4 if "causal" in case else 5)
    S = k.shape[2]
    keep = bias = None
    kwargs, ref_kw = {}, {}
    mask = None
    if "padding" in case:
        keep = np.ones((4, S), bool)
        keep[:, S - 2:] = False  # the last two keys are padding
        keep[0, :] = False  # and one query row sees nothing
        mask, ref_kw["keep"] = keep, keep
    if case == "float":
        bias = rng.normal(size=(4, S))  # an ALiBi-like additive term
        mask, ref_kw["bias"] = bias, bias
    if "causal" in case:
        kwargs["is_causal"], ref_kw["causal"] = True, True
    if case == "gqa":
        kwargs["enable_gqa"] = True
    if case == "scale":
        kwargs["scale"], ref_kw["scale"] = 0.3, 0.3
    args = [q, k, v] + ([mask] if mask is not None else [])
    carries = (True, True, True) + ((False,) if mask is not None else ())
    (rq, rk, rv, *_), absorbed = call(SDPA, args, kwargs, carries=carries, R=R)
    eq, ek, ev, eabs = ref_sdpa(R, q, k, v, **ref_kw)
    for got, want in ((rq, eq), (rk, ek), (rv, ev)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert absorbed == pytest.approx(eabs, rel=1e-9, abs=1e-12)
    if case == "float":
        assert absorbed != 0
    if "padding" in case:  # masked keys and a blind query row get exactly 0
        assert np.all(rk[:, :, S - 2:] == 0) and np.all(rv[:, :, S - 2:] == 0)
        assert np.all(rq[:, :, 0] == 0)


def test_layer_norm_freezes_sigma_and_takes_epsilon(x64):
    rng = np.random.default_rng(6)
    x, R = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    gamma, beta = rng.normal(size=6), rng.normal(size=6) * 0.3
    ref = np.zeros_like(x)
    kept_ref = 0.0
    for idx in np.ndindex(2, 3):
        ref[idx], kept = ref_layer_norm(x[idx], gamma, beta, R[idx], 1e-5)
        kept_ref += kept
    for op, args in [("aten.layer_norm.default", [x, [6], gamma, beta, 1e-5]),
                     ("aten.native_layer_norm.default", [x, [6], gamma, beta, 1e-5])]:
        Rin = (R, None, None) if op.startswith("aten.native") else R
        (r, *rest), kept = call(op, args, carries=(True, False, False, False, False), R=Rin)
        assert all(o is None for o in rest)
        np.testing.assert_allclose(r, ref, rtol=1e-10, atol=1e-12)
        assert kept == pytest.approx(kept_ref, rel=1e-10)
    # no affine parameters: the bias share is None and inputs keep everything up to epsilon
    (r, *_), kept = call("aten.layer_norm.default", [x, [6], None, None, 1e-5],
                         carries=(True, False, False, False, False), R=R, params={"epsilon": 0.0})
    assert kept is None
    np.testing.assert_allclose(r.sum(-1), R.sum(-1), rtol=1e-10)
    assert np.abs(r - R).max() > 0.1  # not the identity rule


def test_group_norm_is_the_layer_norm_rule_per_group(x64):
    rng = np.random.default_rng(7)
    x, R = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))  # 4 channels, 2 groups
    gamma, beta = rng.normal(size=4), rng.normal(size=4) * 0.3
    (r, *_), kept = call("aten.group_norm.default", [x, 2, gamma, beta, 1e-5],
                         carries=(True, False, False, False, False), R=R)
    ref, kept_ref = np.zeros_like(x), 0.0
    for n in range(2):
        for g in range(2):
            ch = slice(2 * g, 2 * g + 2)
            rr, kk = ref_layer_norm(x[n, ch].ravel(), np.repeat(gamma[ch], 3),
                                    np.repeat(beta[ch], 3), R[n, ch].ravel(), 1e-5)
            ref[n, ch] = rr.reshape(2, 3)
            kept_ref += kk
    np.testing.assert_allclose(r, ref, rtol=1e-10, atol=1e-12)
    assert kept == pytest.approx(kept_ref, rel=1e-10)


def test_rms_norm_is_element_wise_epsilon(x64):
    rng = np.random.default_rng(8)
    x, R, gamma = rng.normal(size=(2, 5)), rng.normal(size=(2, 5)), rng.normal(size=5)
    x[0, 0] = 1e-7  # y tiny: the stabiliser shows
    (r, *rest), kept = call("aten.rms_norm.default", [x, [5], gamma, 1e-6],
                            carries=(True, False, False, False), R=R)
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * gamma
    ref = np.vectorize(lambda yy, rr: rr * yy / stab(yy))(y, R)
    np.testing.assert_allclose(r, ref, rtol=1e-10, atol=1e-14)
    assert abs(r[0, 0]) < 0.9 * abs(R[0, 0])  # not the plain identity where |y| ~ epsilon


def test_activations_are_identity_and_gated_products_split_in_half(x64):
    """AttnLRP's identity rule (GELU, SiLU, ... and written-out norms fused by passes/fuse.py,
    e.g. LlamaRMSNorm: identity = the RMS-norm rule up to epsilon) and its uniform rule for an
    element-wise product of two activations (R/2 each) are the shared DLB rules."""
    rng = np.random.default_rng(9)
    x, R = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    for op, args in [("aten.gelu.default", [x]), ("aten.silu.default", [x]),
                     ("aten.tanh.default", [x])]:
        (r, *_), _ = call(op, args, R=R)
        np.testing.assert_array_equal(r, R)
    (ra, rb), _ = call("aten.mul.Tensor", [x, rng.normal(size=(3, 4))], R=R)
    np.testing.assert_allclose(ra, R / 2), np.testing.assert_allclose(rb, R / 2)
    from dlbjax.lowerings.fused import FUSED_OP
    assert get_rule(FUSED_OP, M).shared


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One pre-norm transformer block (LayerNorm, SDPA with a padding mask, causal or not, a
    residual, a GELU MLP with a residual) and a mean-pooled linear head."""

    def __init__(self, causal, d=8, heads=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)
        self.causal, self.heads = causal, heads

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads) \
            .permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=False) \
            if not self.causal else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep & torch.ones(
                T, T, dtype=torch.bool).tril())
        h = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(h.mean(1))


def _np(t):
    return t.detach().double().numpy()


def ref_block(model, x, mask, R_out):
    """The block's AttnLRP relevance pass written out with the references above (one row)."""
    T, D = x.shape
    H = model.heads
    p = {k: _np(v) for k, v in model.state_dict().items()}

    def ln(z, name):
        mu = z.mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-5) \
            * p[name + ".weight"] + p[name + ".bias"]

    def lin(z, name):
        return z @ p[name + ".weight"].T + p[name + ".bias"]

    def lin_back(z, name, R):
        return np.stack([ref_dense_epsilon(z[t], p[name + ".weight"].T, p[name + ".bias"],
                                           R[t])[0] for t in range(len(z))])

    def ln_back(z, name, R):
        return np.stack([ref_layer_norm(z[t], p[name + ".weight"], p[name + ".bias"], R[t],
                                        1e-5)[0] for t in range(len(z))])

    def add_back(a, b, R):  # z-rule of a sum of two activations
        d = np.vectorize(stab)(a + b)
        return a * R / d, b * R / d

    n1 = ln(x, "ln1")
    qkv = lin(n1, "qkv")
    q, k, v = qkv.reshape(T, 3, H, D // H).transpose(1, 2, 0, 3)
    keep = np.broadcast_to(mask.astype(bool)[None, :], (T, T))
    if model.causal:
        keep = keep & np.tril(np.ones((T, T), bool))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(D // H)
    logits = np.where(keep, scores, -np.inf)
    probs = np.zeros_like(logits)
    for hh in range(H):
        for t in range(T):
            if keep[t].any():
                e = np.where(keep[t], np.exp(logits[hh, t] - logits[hh, t][keep[t]].max()), 0)
                probs[hh, t] = e / e.sum()
    a = (probs @ v).transpose(1, 0, 2).reshape(T, D)
    o = lin(a, "o")
    h1 = x + o
    n2 = ln(h1, "ln2")
    u = lin(n2, "up")
    g = _np(F.gelu(torch.tensor(u)))
    dn = lin(g, "down")
    h2 = h1 + dn
    pooled = h2.mean(0)
    # backwards
    R_pool = ref_dense_epsilon(pooled, p["head.weight"].T, p["head.bias"], R_out)[0]
    R_h2 = h2 / T * (R_pool / np.vectorize(stab)(pooled))[None, :]  # mean: the z-rule
    R_h1, R_dn = add_back(h1, dn, R_h2)
    R_g = lin_back(g, "down", R_dn)
    R_n2 = lin_back(n2, "up", R_g)  # GELU: identity
    R_h1 = R_h1 + ln_back(h1, "ln2", R_n2)
    R_x, R_o = add_back(x, o, R_h1)
    R_a = lin_back(a, "o", R_o)
    R_a = R_a.reshape(T, H, D // H).transpose(1, 0, 2)
    rq, rk, rv, _ = ref_sdpa(R_a[None], q[None], k[None], v[None], keep=keep)
    R_qkv = np.stack([rq[0], rk[0], rv[0]]).transpose(2, 0, 1, 3).reshape(T, 3 * D)
    return R_x + ln_back(x, "ln1", lin_back(n1, "qkv", R_qkv))


@pytest.mark.parametrize("causal", [False, True])
def test_a_transformer_block_equals_the_composed_reference(causal, x64):
    torch.manual_seed(10)
    model = Block(causal).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    e = dlbjax.explain(model, (x, mask), method=M, target=[0, 2])
    ops = {q.op for q in dlbjax.Explainer(model, (x, mask), method=M).program.eqns}
    assert {SDPA, "aten.layer_norm.default", "aten.gelu.default"} <= ops
    rel = np.asarray(e.relevance["x"])
    for i, t in enumerate([0, 2]):
        R_out = np.zeros(3)
        R_out[t] = 100.0
        ref = ref_block(model, _np(x[i]), mask[i].numpy(), R_out)
        np.testing.assert_allclose(rel[i], ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())
    assert np.all(rel[1, 3:] != 0)  # padded tokens still feed their own residual stream
    np.testing.assert_array_equal(np.asarray(e.relevance["mask"]), 0)


def _padded(name, batch=2):
    x = hf_zoo.inputs(name, batch=batch)
    x["attention_mask"][0, 5:] = 0  # row 0: the last three tokens are padding
    return x


def _row(x, i):
    return {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in x.items()}


_EXPLAINERS = {}


def _explainer(name, attn):
    if (name, attn) not in _EXPLAINERS:
        _EXPLAINERS[name, attn] = dlbjax.Explainer(hf_zoo.tiny(name, attn), _padded(name),
                                                   method=M)
    return _EXPLAINERS[name, attn]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_tiny_hf_models_run_with_finite_relevance_and_zero_at_padding(name):
    """A BERT classifier and a LLaMA causal LM (next-token task, grouped-query attention, RoPE,
    fused LlamaRMSNorm, SiLU-gated MLP): finite relevance per token, exactly 0 at padded tokens,
    batch == per row, the conservation report adds up."""
    ex = _explainer(name, "sdpa")
    assert SDPA in {q.op for q in ex.plan.program.eqns}
    x = _padded(name)
    e = ex(x)
    r = np.asarray(e.relevance["input_ids"])
    assert r.shape == (2, 8) and np.isfinite(r).all()
    np.testing.assert_array_equal(r[0, 5:], 0)
    assert np.all(r[0, :5] != 0) and np.all(r[1] != 0)
    np.testing.assert_array_equal(np.asarray(e.relevance["attention_mask"]), 0)
    rows = np.concatenate([np.asarray(ex(_row(x, i), target=e.target[i:i + 1])
                                      .relevance["input_ids"]) for i in range(2)])
    np.testing.assert_allclose(r, rows, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    c = e.conservation
    np.testing.assert_allclose(np.asarray(c.inputs), r.sum(1), rtol=1e-5, atol=1e-4)
    assert np.isfinite(np.asarray(c.bias)).all()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eager_attention_written_out_equals_sdpa_kept_whole(name):
    """attn_implementation="eager" writes attention out (matmul, softmax, a finfo.min additive
    mask, matmul): the softmax and uniform rules op by op give what the SDPA rule gives whole."""
    ex = _explainer(name, "eager")
    ops = {q.op for q in ex.plan.program.eqns}
    assert SDPA not in ops and "aten.softmax.int" in ops and "aten.matmul.default" in ops
    x = _padded(name)
    whole = _explainer(name, "sdpa")(x)
    written = ex(x, target=whole.target)
    a, b = (np.asarray(e.relevance["input_ids"]) for e in (whole, written))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    np.testing.assert_array_equal(b[0, 5:], 0)
    # and it is not DLB's relevance
    dlb = ex.replace(method="dlb")(x, target=whole.target)
    assert np.abs(np.asarray(dlb.relevance["input_ids"]) - b).max() > 1e-2 * np.abs(b).max()


# ------------------------------------------------------------------------------------------------
# typed errors
# ------------------------------------------------------------------------------------------------
def test_unsupported_patterns_raise_typed_errors():
    class MaskFromInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.m = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            q = self.q(x)
            bias = self.m(x)  # an input-dependent additive mask [B, 3, 3]
            return F.scaled_dot_product_attention(q, q, q, attn_mask=bias).sum(1)

    with pytest.raises(UnsupportedOperationError, match="mask carries relevance") as info:
        dlbjax.Explainer(MaskFromInput().eval(), torch.randn(1, 3, 4), method=M,
                         task="regression")
    assert "scaled_dot_product_attention" in str(info.value)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    with pytest.raises(UnsupportedOperationError, match="'attnlrp'"):
        dlbjax.Explainer(Recurrent().eval(), torch.randn(1, 3, 4), method=M)
    lin = nn.Linear(4, 2).eval()
    with pytest.raises(MethodError, match="contrastive"):
        dlbjax.Explainer(lin, torch.randn(1, 4), method=M, mode="contrastive")
    with pytest.raises(MethodError):
        dlbjax.Explainer(lin, torch.randn(1, 4), method=M, gamma=0.5)


def test_fused_llama_rms_norm_equals_the_rms_norm_rule_up_to_epsilon():
    """Decision for written-out norms fused by passes/fuse.py: their rule stays the shared
    identity. For an RMS norm (LlamaRMSNorm) that is AttnLRP's rule up to the stabiliser: the
    same network with torch's RMSNorm (aten.rms_norm, the epsilon rule) gives the same relevance
    within 1e-4."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Net(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(6, 8), norm, nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.norm(self.a(x)))

    torch.manual_seed(12)
    fused = Net(LlamaRMSNorm(8, eps=1e-6)).eval()
    with torch.no_grad():
        fused.norm.weight.uniform_(0.5, 1.5)
    native = Net(nn.RMSNorm(8, eps=1e-6)).eval()
    native.load_state_dict(fused.state_dict())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(13))
    ops_f = {q.op for q in dlbjax.Explainer(fused, x, method=M).plan.program.eqns}
    ops_n = {q.op for q in dlbjax.Explainer(native, x, method=M).plan.program.eqns}
    assert "dlbjax.fused" in ops_f and "aten.rms_norm.default" in ops_n
    a = np.asarray(dlbjax.explain(fused, x, method=M, target=[0, 1, 2, 0]).relevance["x"])
    b = np.asarray(dlbjax.explain(native, x, method=M, target=[0, 1, 2, 0]).relevance["x"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


class InfMaskAttention(nn.Module):
    """Attention with an additive 0/-inf padding mask, written out or as SDPA's float mask."""

    def __init__(self, written):
        super().__init__()
        self.qkv, self.out, self.written = nn.Linear(8, 24), nn.Linear(8, 3), written

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        add = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, float("-inf"))
        add = add[:, None, None, :]
        if self.written:
            o = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.5 + add, -1), v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=0.5)
        return self.out(o.transpose(1, 2).reshape(B, T, 8).mean(1))


def test_an_additive_minus_inf_mask_written_out_gives_finite_totals_and_equals_sdpa(x64):
    """The z-rule of the add would keep 0 * inf = NaN for a written-out -inf mask; attnlrp's add
    rule keeps nothing where the sum is -inf, and equals SDPA kept whole with the float mask."""
    torch.manual_seed(14)
    written = InfMaskAttention(True).double().eval()
    whole = InfMaskAttention(False).double().eval()
    whole.load_state_dict(written.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    a = dlbjax.explain(written, (x, mask), method=M, target=[0, 1])
    b = dlbjax.explain(whole, (x, mask), method=M, target=[0, 1])
    assert SDPA in {q.op for q in dlbjax.Explainer(whole, (x, mask), method=M).program.eqns}
    np.testing.assert_allclose(np.asarray(a.relevance["x"]), np.asarray(b.relevance["x"]),
                               rtol=1e-9, atol=1e-12)
    for e in (a, b):
        assert np.isfinite(np.asarray(e.conservation.bias)).all()


def test_add_rule_is_the_z_rule_and_zero_where_the_sum_is_minus_inf(x64):
    rng = np.random.default_rng(16)
    a, R = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    c = rng.normal(size=(3, 4))
    (ra, rc), kept = call("aten.add.Tensor", [a, c], carries=(True, False), R=R)
    d = np.vectorize(stab)(a + c)
    np.testing.assert_allclose(ra, a * R / d, rtol=1e-12)
    assert kept == pytest.approx((c * R / d).sum(), rel=1e-12)
    c[0, :2] = -np.inf
    (ra, _), kept = call("aten.add.Tensor", [a, c], carries=(True, False), R=R)
    assert np.all(ra[0, :2] == 0) and np.isfinite(kept)
    np.testing.assert_allclose(ra[1:], (a * R / d)[1:], rtol=1e-12)
    assert kept == pytest.approx((c * R / d)[np.isfinite(c)].sum(), rel=1e-12)


def test_uniform_rule_of_a_vector_matrix_product(x64):
    rng = np.random.default_rng(17)
    a, b, R = rng.normal(size=4), rng.normal(size=(4, 5)), rng.normal(size=5)
    (ra, rb), _ = call("aten.matmul.default", [a, b], R=R)
    ea, eb = ref_uniform(a[None], b, R[None])
    np.testing.assert_allclose(ra, ea[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rb, eb, rtol=1e-10, atol=1e-12)
