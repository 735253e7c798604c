"""The canonical attention rule (spec §4.9, §7.2 item 12, §9.8-9.10) and the bilinear rule (§4.11)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dlbjax
from dlbjax.lowerings.attention import sdpa_parts
from reference import bilinear_reference


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _qkv(rng, b=1, h=2, t=4, s=5, d=3, hk=None):
    q = rng.normal(size=(b, h, t, d))
    k = rng.normal(size=(b, hk or h, s, d))
    v = rng.normal(size=(b, hk or h, s, d))
    return q, k, v


def _rel(R, q, k, v, **kw):
    from dlbjax.rules.attention import sdpa_relevance
    out = sdpa_relevance(jnp.asarray(R), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **kw)
    return [np.asarray(o) for o in out]


def test_totals_half_quarter_quarter():
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    R = np.abs(rng.normal(size=(1, 2, 4, 3)))
    rq, rk, rv, absorbed = _rel(R, q, k, v)
    assert rv.sum() == pytest.approx(R.sum() / 2, rel=1e-12)
    assert rq.sum() == pytest.approx(R.sum() / 4, rel=1e-12)
    assert rk.sum() == pytest.approx(R.sum() / 4, rel=1e-12)
    assert absorbed == 0 and min(rq.min(), rk.min(), rv.min()) >= 0
    rq, rk, rv, _ = _rel(R, q, k, v, phi=1.0)  # value-only ("attention as fixed weights")
    assert rv.sum() == pytest.approx(R.sum()) and rq.sum() == 0 and rk.sum() == 0


def test_masked_keys_get_exactly_zero():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    mask = np.ones((4, 5), bool)
    mask[:, 3:] = False  # keys 3 and 4 are padding
    R = np.abs(rng.normal(size=(1, 2, 4, 3)))
    rq, rk, rv, absorbed = _rel(R, q, k, v, attn_mask=jnp.asarray(mask))
    assert np.all(rk[..., 3:, :] == 0) and np.all(rv[..., 3:, :] == 0)
    assert absorbed == 0  # 0 / -inf masks drop nothing at attended positions
    assert rq.sum() + rk.sum() + rv.sum() == pytest.approx(R.sum(), rel=1e-12)
    # causal: key s > t never receives relevance from query t
    R1 = np.zeros((1, 2, 4, 3))
    R1[:, :, 1] = 1.0  # only query row 1 is seeded
    rq, rk, rv, _ = _rel(R1, q, k[:, :, :4], v[:, :, :4], is_causal=True)
    assert np.all(rk[..., 2:, :] == 0) and np.all(rv[..., 2:, :] == 0)


def test_fully_masked_query_rows_are_finite_and_carry_nothing():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng)
    mask = np.ones((4, 5), bool)
    mask[0] = False
    scores, m, probs, _, _ = sdpa_parts(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(probs))) and np.all(np.asarray(probs)[..., 0, :] == 0)
    R = np.abs(rng.normal(size=(1, 2, 4, 3)))
    rq, rk, rv, _ = _rel(R, q, k, v, attn_mask=jnp.asarray(mask))
    assert np.all(np.isfinite(rq)) and np.all(rq[..., 0, :] == 0)


def test_single_key_everything_through_v_and_the_qk_split():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, s=1)
    R = np.abs(rng.normal(size=(1, 2, 4, 3)))
    rq, rk, rv, _ = _rel(R, q, k, v)
    # A = 1: the value path distributes phi R exactly as O = V does: every key row gets phi R
    np.testing.assert_allclose(rv[..., 0, :], 0.5 * R.sum(axis=2), rtol=1e-12)
    assert rq.sum() + rk.sum() == pytest.approx(0.5 * R.sum(), rel=1e-12)


def test_placement_changes_which_keys_are_relevant():
    """Unlike the original (whose attention relevance depends only on totals), moving R between
    query rows changes the key relevance (§7.2 item 12)."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng)
    R_a = np.zeros((1, 2, 4, 3))
    R_a[:, :, 0] = 1.0
    R_b = np.zeros((1, 2, 4, 3))
    R_b[:, :, 3] = 1.0
    _, rk_a, rv_a, _ = _rel(R_a, q, k, v)
    _, rk_b, rv_b, _ = _rel(R_b, q, k, v)
    assert not np.allclose(rv_a.sum(-1), rv_b.sum(-1))
    assert not np.allclose(rk_a.sum(-1), rk_b.sum(-1))


def test_float_mask_is_a_bias_at_score_level():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng)
    bias = rng.normal(size=(4, 5))  # ALiBi-like additive term
    R = np.abs(rng.normal(size=(1, 2, 4, 3)))
    rq, rk, rv, absorbed = _rel(R, q, k, v, attn_mask=jnp.asarray(bias))
    assert absorbed > 0
    assert rq.sum() + rk.sum() + rv.sum() + absorbed == pytest.approx(R.sum(), rel=1e-12)
    assert rv.sum() == pytest.approx(R.sum() / 2, rel=1e-12)  # the mask only touches the score path


def test_grouped_query_attention_folds_repeated_heads():
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, h=4, hk=2)
    R = np.abs(rng.normal(size=(1, 4, 4, 3)))
    rq, rk, rv, _ = _rel(R, q, k, v, enable_gqa=True)
    kr, vr = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    rq2, rk2, rv2, _ = _rel(R, q, kr, vr)
    np.testing.assert_allclose(rq, rq2, rtol=1e-12)
    np.testing.assert_allclose(rk, rk2.reshape(1, 2, 2, 5, 3).sum(2), rtol=1e-12)
    np.testing.assert_allclose(rv, rv2.reshape(1, 2, 2, 5, 3).sum(2), rtol=1e-12)


def test_bilinear_rule_against_per_unit_reference():
    from dlbjax.rules.attention import bilinear_shares
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4, 5))
    a[0, 0, 1] = 0.0
    R = np.abs(rng.normal(size=(2, 3, 5)))
    ra, rb = bilinear_shares(jnp.asarray(a), jnp.asarray(b), jnp.asarray(R), 0.3, 0.7)
    ea, eb = bilinear_reference(a, b, R, 0.3, 0.7)
    np.testing.assert_allclose(np.asarray(ra), ea, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(rb), eb, rtol=1e-12, atol=1e-14)


class SelfAttention(nn.Module):
    """One attention head block written two ways: SDPA kept whole, or matmul/softmax/matmul."""

    def __init__(self, written_out: bool, causal: bool):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)
        self.written_out, self.causal = written_out, causal

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        keep = mask[:, None, None, :].bool()
        if self.causal:
            keep = keep & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        if self.written_out:
            s = torch.matmul(q, k.transpose(-1, -2)) * 0.5
            s = s.masked_fill(~keep, float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1), v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_sdpa_kept_whole_equals_its_decomposition(causal, mode):
    torch.manual_seed(0)
    whole = SelfAttention(False, causal).double().eval()
    written = SelfAttention(True, causal).double().eval()
    written.load_state_dict(whole.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    a = dlbjax.explain(whole, (x, mask), mode=mode)
    b = dlbjax.explain(written, (x, mask), mode=mode)
    ops = {e.op for e in dlbjax.Explainer(whole, (x, mask)).program.eqns}
    assert "aten.scaled_dot_product_attention.default" in ops
    np.testing.assert_allclose(a.prediction, b.prediction, rtol=1e-12)
    for ra, rb in zip(np.atleast_1d(a.relevance["x"]), np.atleast_1d(b.relevance["x"])):
        np.testing.assert_allclose(ra, rb, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.relevance["mask"] if mode == "default"
                                  else a.relevance["mask"].positive, 0)
