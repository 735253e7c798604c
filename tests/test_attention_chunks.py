"""Attention over query blocks (issue 15, long sequences; rules/attention.py "Long sequences"):
the chunked forward and relevance rules (DLB default and contrastive, AttnLRP) equal the unchunked
ones (``block=None``, the reference) and the slow per-head references, and their temporary memory
grows linearly in the sequence length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dlbjax
import dlbjax.lowerings.attention as lattn
from dlbjax.lowerings.attention import sdpa_forward
from dlbjax.rules.attention import attnlrp_sdpa, sdpa_relevance
from reference import bilinear_reference

CASES = ["plain", "causal", "bool", "bool-rows", "float", "float+causal", "bool+causal", "gqa",
         "gqa+causal", "scale", "dead-rows"]
RULES = ["dlb", "contrastive", "attnlrp"]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _inputs(case, rng, L=37, S=None, b=2, h=4, d=5):
    """q, k, v, R and keyword arguments of one case (L not divisible by the test blocks)."""
    S = L if S is None else S
    hk = 2 if "gqa" in case else h
    q = rng.normal(size=(b, h, L, d))
    k, v = rng.normal(size=(b, hk, S, d)), rng.normal(size=(b, hk, S, d))
    R = np.abs(rng.normal(size=(b, h, L, d)))
    kw = {}
    if "causal" in case:
        kw["is_causal"] = True
    if "gqa" in case:
        kw["enable_gqa"] = True
    if case == "scale":
        kw["scale"] = 0.3
    if case.startswith("bool") or case == "dead-rows":
        if case == "bool-rows":  # a per-row mask [b, 1, L, S]: every block gets its own rows
            keep = rng.random((b, 1, L, S)) > 0.3
        else:  # key padding broadcast over the queries [b, 1, 1, S]
            keep = np.ones((b, 1, 1, S), bool)
            keep[0, ..., S - 6:] = False
        if case == "dead-rows":  # rows that see no key, in the middle and in the last block
            keep = np.broadcast_to(keep, (b, 1, L, S)).copy()
            keep[:, :, [3, 20, L - 1]] = False
        kw["attn_mask"] = keep
    if case.startswith("float"):
        kw["attn_mask"] = rng.normal(size=(L, S))  # ALiBi-like, a 2-D [L, S] mask
    return q, k, v, R, kw


def _run(rule, R, q, k, v, kw, block):
    j = {n: jnp.asarray(x) for n, x in kw.items() if n == "attn_mask"}
    kw = {**kw, **j}
    args = [jnp.asarray(x) for x in (q, k, v)]
    if rule == "attnlrp":
        return [np.asarray(x) for x in attnlrp_sdpa(jnp.asarray(R), *args, **kw, block=block)]
    contrastive = rule == "contrastive"
    R_in = jnp.asarray(R)
    if contrastive:  # one stream: the score-level rule of contrastive mode
        kw = {**kw, "contrastive": True}
    return [np.asarray(x) for x in sdpa_relevance(R_in, *args, **kw, block=block)]


def _close(got, want, rtol):
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.isfinite(g).all()
        scale = max(np.abs(w).max(), 1e-300)
        assert np.abs(g - w).max() <= rtol * scale, (np.abs(g - w).max() / scale)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [8, 16])
def test_chunked_rule_equals_the_unchunked(case, rule, block):
    q, k, v, R, kw = _inputs(case, np.random.default_rng(len(case) + block))
    want = _run(rule, R, q, k, v, kw, None)
    got = _run(rule, R, q, k, v, kw, block)
    _close(got[:3], want[:3], 1e-12)
    # the absorbed total is one signed sum (AttnLRP's float mask): rounding of its order only
    assert got[3] == pytest.approx(want[3], rel=1e-9, abs=1e-12)
    if case == "dead-rows":
        assert np.all(got[0][:, :, [3, 20, 36]] == 0)
    if case in ("bool", "dead-rows"):  # padded keys still get exactly 0
        assert np.all(got[1][0, :, -6:] == 0) and np.all(got[2][0, :, -6:] == 0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", ["causal", "bool-rows", "float", "gqa"])
def test_chunked_rule_in_float32(case, rule):
    with jax.enable_x64(False):
        q, k, v, R, kw = _inputs(case, np.random.default_rng(7), L=67)
        q, k, v, R = (x.astype(np.float32) for x in (q, k, v, R))
        if case == "float":
            kw["attn_mask"] = kw["attn_mask"].astype(np.float32)
        got, want = _run(rule, R, q, k, v, kw, 16), _run(rule, R, q, k, v, kw, None)
        if rule != "attnlrp":  # DLB maps are non-negative: 1e-6 of the largest entry
            _close(got[:3], want[:3], 1e-6)
            assert got[3] == pytest.approx(want[3], rel=1e-5, abs=1e-6)
            return
    # AttnLRP's maps are ill-conditioned in float32 (G = R / stab(2 O) and the softmax rule's
    # x (R - s sum R) amplify an ulp of O; blocks change XLA's matmul blocking, i.e. ulps): the
    # chunked float32 maps are within the float32 rule's own error of the float64 rule (measured
    # in norm: unchunked 2e-4..1e-3, chunked the same except 1.5e-3 vs 3.4e-4 with a float mask,
    # whose z-rule divides by logits near 0; in float64 the two agree to 1e-12 above)
    exact = _run(rule, R.astype(np.float64), *(x.astype(np.float64) for x in (q, k, v)),
                 {n: (x.astype(np.float64) if n == "attn_mask" and x.dtype != bool else x)
                  for n, x in kw.items()}, None)
    for g, w, e in zip(got[:3], want[:3], exact[:3]):
        err_chunked = np.linalg.norm(g - e) / np.linalg.norm(e)
        err_whole = np.linalg.norm(w - e) / np.linalg.norm(e)
        print(f"AttnLRP float32 vs float64, relative norm: chunked {err_chunked:.2e}, "
              f"unchunked {err_whole:.2e}")
        assert err_whole < 1e-2 and err_chunked < 1e-2


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", ["causal", "float", "gqa"])
def test_one_block_or_less_is_bitwise_the_unchunked(case, rule):
    q, k, v, R, kw = _inputs(case, np.random.default_rng(3), L=16)
    want = _run(rule, R, q, k, v, kw, None)
    for block in ("auto", 16, 40):  # the default block (512) and blocks of >= L rows
        for g, w in zip(_run(rule, R, q, k, v, kw, block), want):
            np.testing.assert_array_equal(g, w)


def _dlb_reference(R, q, k, v, keep=None, bias=None, causal=False, phi=0.5):
    """The DLB rule per head from the per-unit bilinear reference (tests/reference.py)."""
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = H // Hk
    rq, rk, rv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    absorbed = 0.0
    for bi in range(B):
        for h in range(H):
            kh, vh = k[bi, h // rep], v[bi, h // rep]
            scores = q[bi, h] @ kh.T / np.sqrt(D)
            m = np.zeros((L, S)) if bias is None else bias.copy()
            if keep is not None:
                m = np.where(keep[bi, 0], m, -np.inf)
            if causal:
                m = np.where(np.tril(np.ones((L, S), bool)), m, -np.inf)
            logits = scores + m
            probs = np.zeros((L, S))
            for t in range(L):
                live = np.isfinite(logits[t])
                if live.any():
                    e = np.where(live, np.exp(logits[t] - logits[t][live].max()), 0)
                    probs[t] = e / e.sum()
            ra, rvh = (x[0] for x in bilinear_reference(probs[None], vh[None], R[bi, h][None],
                                                         1 - phi, phi))
            if bias is None:
                rs = ra
            else:
                tot = np.abs(scores) + np.abs(bias)
                rs = np.where(tot > 0, ra * np.abs(scores) / np.where(tot > 0, tot, 1), 0)
                absorbed += np.sum(np.where(tot > 0, ra * np.abs(bias) / np.where(tot > 0, tot, 1),
                                            0))
            rqh, rkth = (x[0] for x in bilinear_reference(q[bi, h][None], kh.T[None], rs[None],
                                                           0.5, 0.5))
            rq[bi, h] += rqh
            rk[bi, h // rep] += rkth.T
            rv[bi, h // rep] += rvh
    return rq, rk, rv, absorbed


@pytest.mark.parametrize("case", ["causal", "bool", "float", "gqa+causal"])
def test_chunked_rules_equal_the_slow_references(case):
    from test_attnlrp import ref_sdpa
    q, k, v, R, kw = _inputs(case, np.random.default_rng(11), L=11, b=1, h=2, d=3)
    mask = kw.get("attn_mask")
    keep = mask if mask is not None and mask.dtype == bool else None
    bias = mask if mask is not None and mask.dtype != bool else None
    causal = kw.get("is_causal", False)
    got = _run("dlb", R, q, k, v, kw, 4)
    want = _dlb_reference(R, q, k, v, keep, bias, causal)
    _close(got[:3], want[:3], 1e-9)
    assert got[3] == pytest.approx(want[3], rel=1e-9, abs=1e-12)
    got = _run("attnlrp", R, q, k, v, kw, 4)
    want = ref_sdpa(R, q, k, v, keep=None if keep is None else np.broadcast_to(keep[0, 0], (11, 11)),
                    bias=bias, causal=causal)
    _close(got[:3], want[:3], 1e-9)
    assert got[3] == pytest.approx(want[3], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", ["causal", "bool-rows", "float+causal", "gqa+causal", "dead-rows"])
def test_chunked_forward_equals_the_unchunked_and_torch(case):
    q, k, v, _, kw = _inputs(case, np.random.default_rng(2))
    jkw = {n: jnp.asarray(x) if n == "attn_mask" else x for n, x in kw.items()}
    args = [jnp.asarray(x) for x in (q, k, v)]
    want = np.asarray(sdpa_forward(*args, **jkw, block=None))
    _close([np.asarray(sdpa_forward(*args, **jkw, block=8))], [want], 1e-12)
    if case != "dead-rows":  # torch gives NaN rows where dlbjax gives zeros
        tkw = {n: torch.as_tensor(x) if n == "attn_mask" else x for n, x in kw.items()}
        if "attn_mask" in tkw and tkw.pop("is_causal", False):  # torch takes one or the other
            m, tril = tkw["attn_mask"], torch.ones(37, 37, dtype=torch.bool).tril()
            tkw["attn_mask"] = m & tril if m.dtype == torch.bool else m.masked_fill(~tril, -np.inf)
        t = F.scaled_dot_product_attention(*(torch.as_tensor(x) for x in (q, k, v)), **tkw)
        np.testing.assert_allclose(np.asarray(sdpa_forward(*args, **jkw, block=8)), t.numpy(),
                                   rtol=1e-10, atol=1e-12)


def test_chunked_rule_jit_equals_eager_and_vmap_equals_loop():
    q, k, v, R, kw = _inputs("bool+causal", np.random.default_rng(4), b=3)
    mask = jnp.asarray(kw["attn_mask"])

    def f(R, q, k, v, m):
        return sdpa_relevance(R, q, k, v, m, True, block=8)

    with jax.disable_jit():
        eager = [np.asarray(x) for x in f(R, q, k, v, mask)]
    jitted = [np.asarray(x) for x in jax.jit(f)(R, q, k, v, mask)]
    _close(jitted, eager, 1e-12)
    per_row = jax.vmap(f)(*(jnp.asarray(x)[:, None] for x in (R, q, k, v)), mask[:, None])
    for i in range(3):
        loop = f(R[i:i + 1], q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1])
        for a, b in zip(per_row[:3], loop[:3]):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-12, atol=1e-15)
        assert float(per_row[3][i]) == pytest.approx(float(loop[3]), abs=1e-15)


class TinyAttention(torch.nn.Module):
    """Causal self-attention over 21 tokens (3 blocks of 8 in the tests: 8 + 8 + 5)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool() & torch.ones(x.shape[1], x.shape[1],
                                                          dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("method", ["dlb", "attnlrp"])
def test_a_model_explained_over_blocks_equals_unchunked(monkeypatch, mode, method):
    if method == "attnlrp" and mode == "contrastive":
        pytest.skip("AttnLRP has no contrastive mode")
    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    x = torch.randn(3, 21, 8, dtype=torch.float64)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[0, 17:] = 0
    monkeypatch.setattr(lattn, "QUERY_BLOCK", None)
    want = dlbjax.explain(model, (x, mask), mode=mode, method=method)
    monkeypatch.setattr(lattn, "QUERY_BLOCK", 8)
    got = dlbjax.explain(model, (x, mask), mode=mode, method=method)
    np.testing.assert_allclose(got.prediction, want.prediction, rtol=1e-12)
    for ra, rb in zip(_maps(got.relevance["x"]), _maps(want.relevance["x"])):
        _close([ra], [rb], 1e-10)
    # vmap over rows == one row at a time
    for i in range(3):
        one = dlbjax.explain(model, (x[i:i + 1], mask[i:i + 1]), mode=mode, method=method)
        for ra, rb in zip(_maps(one.relevance["x"]), _maps(got.relevance["x"])):
            _close([ra[0]], [rb[i]], 1e-10)


def _maps(r):
    """The per-stream maps of one relevance entry (contrastive mode: positive, negative)."""
    return [np.asarray(r.positive), np.asarray(r.negative)] if hasattr(r, "positive") \
        else [np.asarray(r)]


def _temp_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rule", RULES)
def test_temporary_memory_grows_linearly_over_blocks(rule, capsys):
    """One causal SDPA's relevance compiled at 1024 and 2048 queries: with blocks of 128 its XLA
    temporary buffers about double (unchunked they about quadruple; printed, not asserted)."""
    with jax.enable_x64(False):
        def f(block):
            def g(R, q, k, v):
                kw = dict(is_causal=True, block=block)
                if rule == "attnlrp":
                    return attnlrp_sdpa(R, q, k, v, **kw)
                return sdpa_relevance(R, q, k, v, contrastive=rule == "contrastive", **kw)
            return g

        h, d = 4, 32
        sizes = {}
        for block in (128, None):
            sizes[block] = [_temp_bytes(f(block), *[(1, h, n, d)] * 4) for n in (1024, 2048)]
        with capsys.disabled():
            print(f"\n[{rule}] temp bytes at seq 1024 / 2048: blocks of 128 "
                  f"{sizes[128][0] / 2**20:.1f} / {sizes[128][1] / 2**20:.1f} MiB, unchunked "
                  f"{sizes[None][0] / 2**20:.1f} / {sizes[None][1] / 2**20:.1f} MiB")
        chunked, whole = sizes[128], sizes[None]
        assert chunked[1] / chunked[0] < 2.6
        assert chunked[1] < whole[1] / 4
