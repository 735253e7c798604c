"""The properties of spec §7.2 (items 1-11), with hypothesis on random models and weights.

Model families (MLPs of several depths and widths, CNNs with max/avg pools, residual add/sub,
concatenation, global average pooling; with and without biases) are exported once per family
member; hypothesis draws the member, the weights (zeros sprinkled in) and the inputs.
Float32 throughout, so sums are compared with a relative tolerance of 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import dlbjax
import models
import reference as ref
from dlbjax.lowerings.affine import conv_nd
from dlbjax.lowerings.pooling import pool_table
from dlbjax.rules import RULES, GATES, Options, RuleContext, linear_operator_rule

M = 100.0
specs = st.sampled_from(models.SPECS)
bias_free = st.sampled_from([s for s in models.SPECS if not s[-1 if s[0] != "res" else 2]])
seeds = st.integers(0, 2**31 - 1)


def _onehot_seed(ex, t, value=M):
    shape = ex.program.outputs[0].shape
    s = np.zeros(shape, np.float32)
    s.reshape(-1)[t] = value
    return s


def _run(spec, consts, x, seeds_, mode="default", layers=False):
    ex, f = models.compiled(spec, mode)
    out = f(consts, (jnp.asarray(x),), tuple(jnp.asarray(s) for s in seeds_))
    return ex, out


def _setup(spec, seed, mode="default", layers=False, zeros=0.15):
    rng = np.random.default_rng(seed)
    ex, _ = models.compiled(spec, mode)
    return ex, models.random_weights(ex, rng, zeros=zeros), models.random_input(spec, rng), rng


def _close(a, b, scale=M):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale)


# ---- 1. per-unit completeness ------------------------------------------------------------------
@given(seed=seeds, n_in=st.integers(1, 6), n_out=st.integers(1, 4),
       gate=st.sampled_from([None, "relu", "tanh", "sigmoid", "softmax", "swish"]))
def test_per_unit_completeness(seed, n_in, n_out, gate):
    """Σ_i R_i + R|b|/D = R for every affine unit with D > 0 and a non-empty active side (§2.4)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, n_in)) * 2
    x[rng.random(x.shape) < 0.2] = 0
    W = rng.normal(size=(n_out, n_in))
    W[rng.random(W.shape) < 0.2] = 0
    b = rng.normal(size=(1, n_out)) * (rng.random() < 0.8)
    g = None if gate is None else GATES[gate]
    with jax.enable_x64(True):
        for j in range(n_out):
            R = np.zeros((1, n_out))
            R[0, j] = 100.0
            rel, kept = linear_operator_rule(lambda v, w: v @ w.T, jnp.asarray(x), jnp.asarray(W),
                                             jnp.asarray(b), jnp.asarray(R), False, g)
            r_ref, k_ref = ref.unit_default(x[0], W[j], b[0, j], 100.0, _ref_gate(g))
            np.testing.assert_allclose(np.asarray(rel[0]), r_ref, atol=1e-9)
            total = float(np.asarray(rel).sum() + np.asarray(kept).sum())
            # complete whenever D > 0; D = 0 (every side gated or empty, no bias) passes nothing
            assert total == pytest.approx(100.0, abs=1e-9) or (total == 0.0 and b[0, j] == 0.0)
            assert float(np.asarray(kept).sum()) == pytest.approx(k_ref, abs=1e-9)


def _ref_gate(g):
    if g is None:
        return None
    fn = None if g.fn is None else (lambda t: float(g.fn(jnp.asarray(t))))
    return ref.Gate(g.lower, g.upper, fn, g.tol)


# ---- 2. bias-free conservation -----------------------------------------------------------------
@given(spec=bias_free, seed=seeds)
def test_bias_free_conservation(spec, seed):
    """Bias-free dense/conv (ReLU or ungated), add, concat, pooling, reshape: Σ R_input = M (§7.2.2)."""
    ex, consts, x, _ = _setup(spec, seed)
    logits = np.asarray(_run(spec, consts, x, [_onehot_seed(ex, 0)])[1].prediction).reshape(-1)
    t = int(np.argmax(logits))
    assume(abs(logits[t]) > 1e-3)  # the seeded unit has P + N > 0
    out = _run(spec, consts, x, [_onehot_seed(ex, t)])[1]
    assert float(out.absorbed[0]) == 0.0
    assert float(np.sum(out.relevance["x"][0])) == pytest.approx(M, rel=1e-4)


# ---- 3. linearity --------------------------------------------------------------------------------
@given(spec=specs, seed=seeds, alpha=st.floats(0.1, 3), beta=st.floats(0.1, 3))
def test_linearity_in_the_seed(spec, seed, alpha, beta):
    ex, consts, x, rng = _setup(spec, seed)
    shape = ex.program.outputs[0].shape
    s1, s2 = np.abs(rng.normal(size=shape)), np.abs(rng.normal(size=shape))
    r1 = _run(spec, consts, x, [s1])[1].relevance["x"][0]
    r2 = _run(spec, consts, x, [s2])[1].relevance["x"][0]
    r12 = _run(spec, consts, x, [alpha * s1 + beta * s2])[1].relevance["x"][0]
    _close(r12, alpha * np.asarray(r1) + beta * np.asarray(r2), scale=float(np.abs(r12).max()) + 1)


# ---- 4. non-negativity ---------------------------------------------------------------------------
@given(spec=specs, seed=seeds, mode=st.sampled_from(["default", "contrastive"]))
def test_non_negative_everywhere(spec, seed, mode):
    ex, consts, x, rng = _setup(spec, seed, mode=mode, layers=True)
    shape = ex.program.outputs[0].shape
    seeds_ = [np.abs(rng.normal(size=shape)) * 10 for _ in range(2 if mode == "contrastive" else 1)]
    out = _run(spec, consts, x, seeds_, mode=mode, layers=True)[1]
    maps = list(out.relevance["x"]) + [m for v in out.layers.values() for m in v]
    for m in maps:
        assert float(jnp.min(m)) >= 0.0
        assert bool(jnp.all(jnp.isfinite(m)))


# ---- 5. scale invariance -------------------------------------------------------------------------
@given(spec=bias_free, seed=seeds, c=st.floats(0.05, 20))
def test_scale_invariance_bias_free(spec, seed, c):
    ex, consts, x, _ = _setup(spec, seed)
    s = _onehot_seed(ex, 1)
    r1 = np.asarray(_run(spec, consts, x, [s])[1].relevance["x"][0])
    r2 = np.asarray(_run(spec, consts, (c * x).astype(np.float32), [s])[1].relevance["x"][0])
    _close(r2, r1)


# ---- 6. dummy and zero features ------------------------------------------------------------------
@given(spec=specs, seed=seeds, data=st.data())
def test_zero_and_dummy_features_get_nothing(spec, seed, data):
    ex, consts, x, rng = _setup(spec, seed)
    flat = x.reshape(-1)
    i = data.draw(st.integers(0, flat.size - 1))
    flat[i] = 0.0
    shape = ex.program.outputs[0].shape
    out = _run(spec, consts, x, [np.abs(rng.normal(size=shape)) * 10])[1]
    assert float(np.asarray(out.relevance["x"][0]).reshape(-1)[i]) == 0.0
    if spec[0] in ("mlp", "res"):  # a feature whose outgoing weights are all zero
        x2 = models.random_input(spec, rng, zeros=0)
        j = data.draw(st.integers(0, models.IN_FEATURES - 1))
        first = [k for k in consts if k.endswith("weight")][0]
        consts = dict(consts)
        consts[first] = consts[first].at[:, j].set(0.0)
        out = _run(spec, consts, x2, [np.abs(rng.normal(size=shape)) * 10])[1]
        assert float(out.relevance["x"][0][0, j]) == 0.0


# ---- 7. permutation equivariance -----------------------------------------------------------------
@given(seed=seeds, depth=st.sampled_from([1, 2]), bias=st.booleans())
def test_permutation_equivariance(seed, depth, bias):
    spec = ("mlp", depth, 8, bias)
    ex, consts, x, rng = _setup(spec, seed)
    perm = rng.permutation(models.IN_FEATURES)
    first = "net.0.weight"
    permuted = dict(consts)
    permuted[first] = consts[first][:, perm]
    s = np.abs(rng.normal(size=ex.program.outputs[0].shape))
    r = np.asarray(_run(spec, consts, x, [s])[1].relevance["x"][0])
    rp = np.asarray(_run(spec, permuted, x[:, perm], [s])[1].relevance["x"][0])
    np.testing.assert_allclose(rp, r[:, perm], rtol=1e-5, atol=1e-5)


# ---- 8. contrastive stream conservation ----------------------------------------------------------
@given(spec=specs, seed=seeds)
def test_contrastive_streams_conserved(spec, seed):
    """Σ R+_in = Σ R+_seed and Σ R-_in = Σ R-_seed; biases take no share; streams never mix."""
    ex, consts, x, rng = _setup(spec, seed, mode="contrastive", zeros=0.0)
    x = models.random_input(spec, rng, zeros=0.0)
    shape = ex.program.outputs[0].shape
    sp, sn = np.abs(rng.normal(size=shape)) * 10, np.abs(rng.normal(size=shape)) * 10
    out = _run(spec, consts, x, [sp, sn], mode="contrastive", layers=False)[1]
    # a hidden layer that is entirely dead cuts the flow (units with P = N = 0): excluded
    _, f_default = models.compiled(spec, "default")
    acts = f_default(consts, (jnp.asarray(x),), (jnp.asarray(sp),))
    assume(abs(float(np.sum(acts.relevance["x"][0])) + float(acts.absorbed[0])) > 0)
    pos, neg = out.relevance["x"]
    assert float(out.absorbed[0]) == 0.0 and float(out.absorbed[1]) == 0.0
    assert float(jnp.sum(pos)) == pytest.approx(sp.sum(), rel=1e-4)
    assert float(jnp.sum(neg)) == pytest.approx(sn.sum(), rel=1e-4)


# ---- 9. contrastive == z+ rule ---------------------------------------------------------------------
@given(seed=seeds, depth=st.sampled_from([1, 2, 3]))
def test_contrastive_equals_zplus_with_zero_negative_seed(seed, depth):
    spec = ("mlp", depth, 8, False)
    ex, consts, x, rng = _setup(spec, seed, mode="contrastive")
    logits = np.asarray(_run(spec, consts, x, [_onehot_seed(ex, 0), _onehot_seed(ex, 0, 0.0)],
                             mode="contrastive")[1].prediction).reshape(-1)
    t = int(np.argmax(logits))
    assume(logits[t] > 1e-3)
    out = _run(spec, consts, x, [_onehot_seed(ex, t), _onehot_seed(ex, t, 0.0)], mode="contrastive")[1]
    pos, neg = out.relevance["x"]
    weights = [np.asarray(consts[f"net.{2 * k}.weight"], np.float64) for k in range(depth + 1)]
    expected = ref.zplus_mlp(x[0], weights, _onehot_seed(ex, t)[0])
    np.testing.assert_allclose(np.asarray(pos[0]), expected, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(neg)) == 0.0


# ---- 10. conv == dense over patches (random configurations) ----------------------------------------
@settings(max_examples=12)
@given(seed=seeds, k=st.integers(1, 3), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
       g=st.sampled_from([1, 2]), size=st.integers(5, 7), bias=st.booleans(),
       gate=st.sampled_from([None, "relu", "tanh"]))
def test_conv_equals_dense_over_patches(seed, k, s, p, d, g, size, bias, gate):
    assume(size + 2 * p - d * (k - 1) - 1 >= 0)
    rng = np.random.default_rng(seed)
    cin, cout = 2 * g, 2 * g
    x = rng.normal(size=(1, cin, size, size))
    x[rng.random(x.shape) < 0.2] = 0
    w = rng.normal(size=(cout, cin // g, k, k))
    w[rng.random(w.shape) < 0.2] = 0
    b = rng.normal(size=(cout,)) if bias else None
    with jax.enable_x64(True):
        lin = lambda v, ww: conv_nd(v, ww, s, p, d, g)  # noqa: E731
        y = lin(jnp.asarray(x), jnp.asarray(w))
        R = np.abs(rng.normal(size=y.shape))
        bb = None if b is None else jnp.broadcast_to(jnp.asarray(b)[:, None, None], y.shape)
        g_ = None if gate is None else GATES[gate]
        rel, kept = linear_operator_rule(lin, jnp.asarray(x), jnp.asarray(w), bb, jnp.asarray(R), False, g_)
        expected, k_ref = ref.conv_default(x[0], w, b, R[0], (s, s), (p, p), (d, d), g, _ref_gate(g_))
        np.testing.assert_allclose(np.asarray(rel[0]), expected, rtol=1e-9, atol=1e-12)
        assert float(jnp.sum(kept)) == pytest.approx(k_ref, rel=1e-9, abs=1e-12)


# ---- 11. max-pool support ------------------------------------------------------------------------
@settings(max_examples=15)
@given(seed=seeds, k=st.integers(1, 3), s=st.integers(1, 3), p=st.integers(0, 1), d=st.integers(1, 2),
       ceil=st.booleans(), h=st.integers(4, 7), w=st.integers(4, 7))
def test_max_pool_only_maxima_ties_split(seed, k, s, p, d, ceil, h, w):
    assume(2 * p <= k and h + 2 * p - d * (k - 1) - 1 >= 0 and w + 2 * p - d * (k - 1) - 1 >= 0)
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(1, 2, h, w)).astype(np.float64)  # ties inside windows
    table = pool_table(2, x.shape, k, s, p, d, ceil)
    R = np.abs(rng.normal(size=(1, 2) + table.shape[:-1]))
    rule = RULES["aten.max_pool2d.default"].default
    ctx = RuleContext(carries=(True,), outputs=(None,), gate=None, options=Options(), op="", where="")
    with jax.enable_x64(True):
        (rel,) = rule(ctx, jnp.asarray(R), jnp.asarray(x), [k, k], [s, s], [p, p], [d, d], ceil)
    expected = ref.max_pool_reference(x[0], R[0], (k, k), (s, s), (p, p), (d, d), ceil)
    np.testing.assert_allclose(np.asarray(rel[0]), expected, rtol=1e-12, atol=1e-12)
    # support: cells that are never a window maximum get exactly 0
    assert np.all(np.asarray(rel)[0][expected == 0] == 0)


# ---- default-mode relevance of real models is finite and sums sensibly ---------------------------
@given(spec=specs, seed=seeds)
def test_conservation_report_adds_up(spec, seed):
    ex, consts, x, rng = _setup(spec, seed)
    out = _run(spec, consts, x, [_onehot_seed(ex, int(rng.integers(0, models.OUT)))])[1]
    total = float(np.sum(out.relevance["x"][0])) + float(out.absorbed[0])
    assert total <= M * (1 + 1e-4)
    assert float(out.seed[0]) == pytest.approx(M)


def test_explain_uses_the_same_pass():
    """The dataset API equals the pure relevance function on each row."""
    spec = ("mlp", 2, 8, True)
    ex, f = models.compiled(spec)
    rng = np.random.default_rng(1)
    xs = np.stack([models.random_input(spec, rng)[0] for _ in range(5)])
    e = ex(xs, target=2)
    for i in range(5):
        out = f(ex.constants, (jnp.asarray(xs[i:i + 1]),), (jnp.asarray(_onehot_seed(ex, 2)),))
        np.testing.assert_allclose(e.relevance["x"][i], np.asarray(out.relevance["x"][0])[0],
                                   rtol=1e-6, atol=1e-6)
    assert isinstance(dlbjax.Explanation, type)


# ---- the magnitude form equals the sign-split GEMM form --------------------------------------------
@given(seed=seeds, gate=st.sampled_from([None, "relu", "tanh", "sigmoid", "softmax"]),
       big_bias=st.booleans())
def test_magnitude_form_equals_sign_split_form(seed, gate, big_bias):
    """The fast default-mode form (one extra product) agrees with §2.6's exact form, gates included."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 7)) * 2
    x[rng.random(x.shape) < 0.2] = 0
    W = rng.normal(size=(5, 7))
    W[rng.random(W.shape) < 0.2] = 0
    b = rng.normal(size=(1, 5)) * (4 if big_bias else 1)
    R = np.abs(rng.normal(size=(3, 5)))
    g = None if gate is None else GATES[gate]
    with jax.enable_x64(True):
        args = (lambda v, w: v @ w.T, jnp.asarray(x), jnp.asarray(W), jnp.asarray(b),
                jnp.asarray(R), False, g)
        fast, k_fast = linear_operator_rule(*args)
        exact, k_exact = linear_operator_rule(*args, exact=True)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(exact), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(k_fast), np.asarray(k_exact), rtol=1e-12, atol=1e-13)
