"""State-space models: the selective scan as one operator (``dlbjax::selective_scan``), its rule
against a slow per-element reference (on random inputs and on what a 2-layer Mamba feeds it), and
Hugging Face ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``Mamba2ForCausalLM`` explained
end to end."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import transformers as tf

import dlbjax
from conftest import rel_err
from dlbjax.importers import _mamba
from dlbjax.lowerings import TABLE
from dlbjax import Streams
from dlbjax.rules import RULES, Options, RuleContext

OP = "dlbjax.selective_scan.default"


# ------------------------------------------------------------------------------------------------
# slow reference: the rule's steps (rules/recurrent.py::_selective_scan) per element, float64
# ------------------------------------------------------------------------------------------------
def _prod(g, s, R, rule):
    if rule == "signal_take_all":
        return 0.0, R
    if rule == "half":
        return R / 2, R / 2
    y = g * s
    da, db = abs(y - g), abs(y - s)
    f = da / (da + db) if da + db > 0 else 0.5
    return R * f, R * (1 - f)


def _share(terms, R):
    tot = sum(abs(t) for t in terms)
    return [R * abs(t) / tot if tot > 0 else 0.0 for t in terms]


def reference(u, delta, A, B, C, D, z, bias, R, rule):
    """Per (row, channel, state, step) loops over the docstring's steps 1-6 (default mode).
    Returns (R_u, R_delta, R_B, R_C, R_z, bias share)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, bias, R = map(f, (u, delta, A, B, C, D, z, bias, R))
    b_, d_, L = u.shape
    n_ = A.shape[1]
    pre = delta + bias[:, None]
    dt = np.log1p(np.exp(pre))
    out = {k: np.zeros(s) for k, s in (("u", u.shape), ("delta", u.shape), ("B", B.shape),
                                       ("C", C.shape), ("z", u.shape))}
    kept = 0.0
    two = "half" if rule == "signal_take_all" else rule
    for b in range(b_):
        for d in range(d_):
            hs = [np.zeros(n_)]
            for t in range(L):
                hs.append(np.exp(A[d] * dt[b, d, t]) * hs[-1] + dt[b, d, t] * B[b, :, t] * u[b, d, t])
            Rh = np.zeros(n_)
            for t in reversed(range(L)):
                h, hp = hs[t + 1], hs[t]
                y = float(np.sum(C[b, :, t] * h) + D[d] * u[b, d, t])
                g = z[b, d, t] / (1 + np.exp(-z[b, d, t]))
                Rg, Ry = _prod(g, y, R[b, d, t], rule)
                out["z"][b, d, t] = Rg
                shares = _share([C[b, n, t] * h[n] for n in range(n_)] + [D[d] * u[b, d, t]], Ry)
                out["u"][b, d, t] += shares[-1]
                Rdt = 0.0
                Rnext = np.zeros(n_)
                for n in range(n_):
                    RC, Rhs = _prod(C[b, n, t], h[n], shares[n], rule)
                    out["C"][b, n, t] += RC
                    dA = np.exp(A[d, n] * dt[b, d, t])
                    gate = dt[b, d, t] * B[b, n, t]
                    Rtr, Rin = _share([dA * hp[n], gate * u[b, d, t]], Rhs + Rh[n])
                    RdA, Rnext[n] = _prod(dA, hp[n], Rtr, rule)
                    Rgate, Ru = _prod(gate, u[b, d, t], Rin, rule)
                    out["u"][b, d, t] += Ru
                    r_dt, r_B = _prod(dt[b, d, t], B[b, n, t], Rgate, two)
                    Rdt += RdA + r_dt
                    out["B"][b, n, t] += r_B
                Rh = Rnext
                sd, sb = _share([pre[b, d, t] - bias[d], bias[d]], Rdt)
                out["delta"][b, d, t] = sd
                kept += sb
    return out["u"], out["delta"], out["B"], out["C"], out["z"], kept


def _call(args, R, rule, mode="default"):
    jargs = [jax.numpy.asarray(a) for a in args[:8]] + [True]

    def run(jargs, R):
        out = TABLE[OP].fn(*jargs)
        ctx = RuleContext(carries=(True, True, False, True, True, False, True, False, False),
                          outputs=(out,), gate=None,
                          options=Options(mode=mode, product_rule=rule), op=OP, where="test")
        rule_fn = RULES[OP].default if mode == "default" else RULES[OP].contrastive
        res = rule_fn(ctx, R, *jargs)
        return res.relevance, res.absorbed

    return run(jargs, R)


def _random_args(rng, b=2, d=3, n=4, L=5):
    u = rng.normal(size=(b, d, L))
    delta = rng.normal(size=(b, d, L))
    A = -np.exp(rng.normal(size=(d, n)))
    B, C = rng.normal(size=(b, n, L)), rng.normal(size=(b, n, L))
    D, z, bias = rng.normal(size=d), rng.normal(size=(b, d, L)), rng.normal(size=d) * 0.5
    return [np.asarray(a, np.float32) for a in (u, delta, A, B, C, D, z, bias)]


def _check_against_reference(args, R, rule, rtol=2e-4):
    rel, kept = _call(args, jax.numpy.asarray(R), rule)
    R_u, R_delta, _, R_B, R_C, _, R_z = rel[:7]
    ref = reference(*args, R, rule)
    scale = np.abs(R).sum()
    for got, want in zip((R_u, R_delta, R_B, R_C, R_z), ref[:5]):
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * scale / want.size)
    np.testing.assert_allclose(float(kept), ref[5], rtol=rtol, atol=1e-6 * scale)
    total = sum(np.asarray(r).sum() for r in (R_u, R_delta, R_B, R_C, R_z)) + float(kept)
    np.testing.assert_allclose(total, R.sum(), rtol=1e-4)   # every step conserves


@pytest.mark.parametrize("rule", ["half", "dlb", "signal_take_all"])
def test_selective_scan_rule_equals_per_element_reference(rule):
    rng = np.random.default_rng(3)
    args = _random_args(rng)
    R = np.abs(rng.normal(size=args[0].shape)).astype(np.float32)
    _check_against_reference(args, R, rule)


def test_signal_take_all_sends_everything_along_the_content_path():
    rng = np.random.default_rng(4)
    args = _random_args(rng)
    R = rng.normal(size=args[0].shape).astype(np.float32)
    rel, kept = _call(args, jax.numpy.asarray(R), "signal_take_all")
    for gate in (rel[1], rel[3], rel[4], rel[6]):
        assert np.abs(np.asarray(gate)).max() == 0
    np.testing.assert_allclose(np.asarray(rel[0]).sum(), R.sum(), rtol=1e-5)
    assert float(kept) == 0


def test_causality_no_relevance_flows_to_later_steps():
    rng = np.random.default_rng(5)
    args = _random_args(rng)
    R = np.zeros(args[0].shape, np.float32)
    R[:, :, 2] = 1.0
    rel, _ = _call(args, jax.numpy.asarray(R), "half")
    for r in (rel[0], rel[1], rel[3], rel[4], rel[6]):
        assert np.abs(np.asarray(r)[..., 3:]).max() == 0
        assert np.abs(np.asarray(r)[..., :3]).sum() > 0


def test_contrastive_streams_split_alike_and_stay_finite():
    rng = np.random.default_rng(6)
    args = _random_args(rng)
    Rp = np.abs(rng.normal(size=args[0].shape)).astype(np.float32)
    rel, kept = _call(args, Streams(jax.numpy.asarray(Rp), jax.numpy.zeros_like(Rp)), "half",
                      mode="contrastive")
    assert kept is None
    for r in (rel[0], rel[1], rel[3], rel[4], rel[6]):
        assert isinstance(r, Streams)
        assert np.isfinite(np.asarray(r.positive)).all() and np.isfinite(np.asarray(r.negative)).all()


def test_the_operator_equals_hugging_faces_reference_scan():
    """torch's dlbjax::selective_scan and the JAX lowering against HF's own reference path."""
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    rng = np.random.default_rng(7)
    args = _random_args(rng, b=2, d=6, n=3, L=7)
    t = [torch.from_numpy(a) for a in args]
    want = mm.mamba_selective_scan(t[0], t[1], t[2], t[3], t[4], D=t[5], z=t[6], delta_bias=t[7],
                                   delta_softplus=True).numpy()
    got_torch = torch.ops.dlbjax.selective_scan(*t, True).numpy()
    got_jax = np.asarray(TABLE[OP].fn(*[jax.numpy.asarray(a) for a in args], True))
    np.testing.assert_allclose(got_torch, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_jax, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Hugging Face models
# ------------------------------------------------------------------------------------------------
def _tiny(cls, cfg, kw=None):
    torch.manual_seed(0)
    kw = dict(dict(state_size=4), **(kw or {}))
    model = cls(cfg(vocab_size=64, hidden_size=16, num_hidden_layers=2, expand=2, conv_kernel=3,
                    **kw)).eval()
    with torch.no_grad():  # the residual norms and D at 1: perturb, so nothing is a special case
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


MODELS = {"mamba": (tf.MambaForCausalLM, tf.MambaConfig)}
if hasattr(tf, "FalconMambaForCausalLM"):
    MODELS["falcon-mamba"] = (tf.FalconMambaForCausalLM, tf.FalconMambaConfig)
if hasattr(tf, "Mamba2ForCausalLM"):  # SSD: scalar A per head, B and C per group (2 groups)
    MODELS["mamba2"] = (tf.Mamba2ForCausalLM, tf.Mamba2Config,
                        dict(state_size=8, head_dim=8, num_heads=4, n_groups=2, chunk_size=4))


def _inputs(batch=2, length=6, pad=0):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 60, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}



@pytest.mark.parametrize("name", list(MODELS))
def test_mamba_models_explain_conserving(name):
    model = _tiny(*MODELS[name])
    before = copy.deepcopy(model.state_dict())
    x = _inputs(pad=2)
    with torch.no_grad():
        ref = model(**x, use_cache=False).logits.numpy()
    ex = dlbjax.Explainer(model, x, task="next-token")
    rules = ("half", "dlb", "signal_take_all")
    if name == "mamba2":  # its gated RMS norm multiplies y by silu(gate) outside the scan: a
        rules = rules[:2]  # product of two activations, for which signal_take_all is undefined
        with pytest.raises(ValueError, match="signal_take_all"):
            ex.replace(product_rule="signal_take_all")(x)
    for rule in rules:
        e = ex.replace(product_rule=rule)(x)
        assert rel_err(e.prediction, ref) <= 1e-5
        c = e.conservation
        seed = np.abs(np.asarray(c.seed)).max()
        assert np.abs(np.asarray(c.lost)).max() <= 1e-4 * seed
        r = np.asarray(e.relevance["input_ids"])
        assert r.shape == (2, 6) and np.isfinite(r).all()
        assert np.abs(r[0, :2]).max() == 0            # padded tokens get exactly nothing
        np.testing.assert_allclose(r.sum(1) + np.asarray(c.bias) + np.asarray(c.params),
                                   np.asarray(c.seed), rtol=1e-4)
    e = ex.replace(mode="contrastive")(x)
    assert rel_err(e.prediction, ref) <= 1e-5
    rel = e.relevance["input_ids"]
    assert np.isfinite(np.asarray(rel.positive)).all() and np.isfinite(np.asarray(rel.negative)).all()
    one = ex({k: v[1:] for k, v in x.items()})       # a batch equals one call per row
    np.testing.assert_allclose(np.asarray(ex(x).relevance["input_ids"])[1:],
                               np.asarray(one.relevance["input_ids"]), rtol=1e-4, atol=1e-7)
    assert not any(type(m).__name__.startswith("Static") for m in model.modules())  # unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_relevance_at_the_scan_equals_the_reference_on_a_two_layer_mamba(monkeypatch):
    """The rule on the exact tensors a 2-layer Mamba feeds its scans (captured in torch) equals
    the per-element reference, for each layer."""
    model = _tiny(tf.MambaForCausalLM, tf.MambaConfig)
    static = copy.deepcopy(model)
    captured = []

    def spy(*args):
        captured.append([a.detach().numpy().copy() if isinstance(a, torch.Tensor) else a
                         for a in args])
        return _mamba.selective_scan(*args)

    for layer in static.backbone.layers:
        layer.mixer = _mamba.static_mamba_mixer(layer.mixer)
    monkeypatch.setattr(_mamba, "_scan", spy)
    with torch.no_grad():
        static(**_inputs(batch=1), use_cache=False)
    assert len(captured) == 2
    rng = np.random.default_rng(8)
    for args in captured:
        args = [np.asarray(a, np.float32) for a in args[:8]]
        R = rng.normal(size=args[0].shape).astype(np.float32)
        _check_against_reference(args, R, "half", rtol=1e-3)
