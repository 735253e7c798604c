"""The remaining pools and transposed convolutions against slow references (float64).

Each layer is checked to export to an op that has a lowering and a rule (AvgPool1d exports as
unsqueeze + avg_pool2d + squeeze; the others keep their own op), then its relevance for a random
non-negative seed is compared with a loop over windows / units written from the spec:
max pools route each window's relevance to its maxima, exact ties split evenly (§4.2, §8.6), in
both modes; average pools split it over the window's cells in proportion to |x| (default) or by the
§3.2 rule with unit weights (contrastive, §8.7); adaptive pools use PyTorch's windows
[floor(o L / O), ceil((o + 1) L / O)); transposed convolutions equal the dense rule of their
explicit matrix (§2.6), gated by a following ReLU in default mode.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
import reference as ref
from dlbjax.importers import import_model
from dlbjax.rules import RULES


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def run(model, x, seeds, mode="default"):
    ex = dlbjax.Explainer(model, x, mode=mode, task="regression" if mode == "default" else "auto")
    out = jax.jit(ex.relevance_function())(ex.constants, (jnp.asarray(x.numpy()),),
                                            tuple(jnp.asarray(s) for s in seeds))
    return [np.asarray(r) for r in out.relevance[ex.input_names[0]]], np.asarray(out.absorbed)


class Seq(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x)


def _windows_1d(L, k, s, p, d, out_len):
    """Cells of each window of a 1-d sliding pool (padding cells dropped)."""
    return [[o * s - p + j * d for j in range(k) if 0 <= o * s - p + j * d < L] for o in range(out_len)]


def _adaptive(L, O):
    return [list(range((o * L) // O, -(-((o + 1) * L) // O))) for o in range(O)]


def _route(x, R, windows, kind, S):
    """x [C, L] (flattened spatial), R [S, C, O]: the reference of one pool, per stream."""
    C = x.shape[0]
    out = np.zeros((S,) + x.shape)
    for c, (o, cells) in itertools.product(range(C), enumerate(windows)):
        if not cells:
            continue
        v = x[c, cells]
        if kind == "max":
            win = v == v.max()
            for s in range(S):
                out[s, c, np.asarray(cells)[win]] += R[s, c, o] / win.sum()
        elif S == 1:
            out[0, c, cells] += ref.unit_default(v, np.ones(len(v)), 0.0, R[0, c, o])[0]
        else:
            p, n = ref.unit_contrastive(v, np.ones(len(v)), 0.0, R[0, c, o], R[1, c, o])
            out[0, c, cells] += p
            out[1, c, cells] += n
    return out


POOLS_1D = [  # (layer, kind, window function of (L, out_len))
    (lambda: nn.MaxPool1d(3, 2, 1), "max", lambda L, O: _windows_1d(L, 3, 2, 1, 1, O)),
    (lambda: nn.MaxPool1d(2, 3, 0, dilation=2, ceil_mode=True), "max",
     lambda L, O: _windows_1d(L, 2, 3, 0, 2, O)),
    (lambda: nn.AvgPool1d(3, 2, 1), "avg", lambda L, O: _windows_1d(L, 3, 2, 1, 1, O)),
    (lambda: nn.AvgPool1d(4, 3, 2, ceil_mode=True, count_include_pad=False), "avg",
     lambda L, O: _windows_1d(L, 4, 3, 2, 1, O)),
    (lambda: nn.AdaptiveAvgPool1d(4), "avg", _adaptive),
    (lambda: nn.AdaptiveAvgPool1d(1), "avg", _adaptive),
    (lambda: nn.AdaptiveMaxPool1d(4), "max", _adaptive),
]


def _ops_have_rules(model, x):
    program, _ = import_model(model, x)
    ops = [e.op for e in program.eqns]
    assert all(op in RULES for op in ops), ops
    return ops


@pytest.mark.parametrize("case", range(len(POOLS_1D)))
def test_pool_1d_matches_reference(case):
    make, kind, windows = POOLS_1D[case]
    rng = np.random.default_rng(case)
    L = 11
    # small integers: ties inside windows (max) and zero cells (avg)
    x = torch.from_numpy(rng.integers(-2, 3, size=(1, 3, L)).astype(np.float64))
    model = Seq(make())
    ops = _ops_have_rules(model, x)
    assert any("pool" in op for op in ops)
    out_len = model(x).shape[-1]
    for mode, S in (("default", 1), ("contrastive", 2)):
        seeds = [np.abs(rng.normal(size=(1, 3, out_len))) for _ in range(S)]
        rels, _ = run(model, x, seeds, mode)
        expected = _route(x.numpy()[0], np.stack([s[0] for s in seeds]), windows(L, out_len), kind, S)
        for s in range(S):
            np.testing.assert_allclose(rels[s][0], expected[s], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_size", [(3, 2), (4, 5)])
def test_adaptive_max_pool_2d_matches_reference(out_size):
    rng = np.random.default_rng(sum(out_size))
    H, W = 5, 6
    x = torch.from_numpy(rng.integers(-2, 3, size=(1, 2, H, W)).astype(np.float64))
    model = Seq(nn.AdaptiveMaxPool2d(out_size))
    assert "aten.adaptive_max_pool2d.default" in _ops_have_rules(model, x)
    windows = [[r * W + c for r in rows for c in cols]
               for rows, cols in itertools.product(_adaptive(H, out_size[0]), _adaptive(W, out_size[1]))]
    for mode, S in (("default", 1), ("contrastive", 2)):
        seeds = [np.abs(rng.normal(size=(1, 2) + out_size)) for _ in range(S)]
        rels, _ = run(model, x, seeds, mode)
        R = np.stack([s[0].reshape(2, -1) for s in seeds])
        expected = _route(x.numpy()[0].reshape(2, -1), R, windows, "max", S)
        for s in range(S):
            np.testing.assert_allclose(rels[s][0].reshape(2, -1), expected[s], rtol=1e-12, atol=1e-12)
            assert rels[s].sum() == pytest.approx(seeds[s].sum(), rel=1e-12)


def _matrix(fn, in_shape):
    n = int(np.prod(in_shape))
    cols = []
    with torch.no_grad():
        for i in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = 1
            cols.append(fn(e.reshape(in_shape)).reshape(-1).numpy())
    return np.stack(cols, axis=1)


TRANSPOSED = [  # (layer, input shape)
    (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (1, 2, 5)),
    (lambda: nn.ConvTranspose1d(4, 2, 2, stride=3, padding=1, output_padding=2, groups=2,
                                dilation=2), (1, 4, 4)),
    (lambda: nn.ConvTranspose1d(3, 3, 4, stride=1, padding=2, bias=False), (1, 3, 6)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (1, 2, 3, 4)),
    (lambda: nn.ConvTranspose2d(2, 4, (2, 3), stride=(1, 2), groups=2, bias=False), (1, 2, 3, 3)),
]


@pytest.mark.parametrize("case", range(len(TRANSPOSED)))
def test_conv_transpose_equals_dense_rule_of_its_matrix(case):
    make, shape = TRANSPOSED[case]
    rng = np.random.default_rng(20 + case)
    torch.manual_seed(case)
    layer = make().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape))))
    x = torch.from_numpy(rng.normal(size=shape))
    x[0, 0, 1] = 0.0
    ops = _ops_have_rules(Seq(layer), x)
    assert any(op.startswith("aten.conv_transpose") for op in ops), ops
    bias = layer.bias
    layer.bias = None
    M = _matrix(layer, shape)
    with torch.no_grad():
        y0 = layer(x)
    layer.bias = bias
    y = layer(x).detach()
    b = (y - y0).numpy().reshape(-1)
    R = np.abs(rng.normal(size=tuple(y.shape)))
    # default mode, gated by the ReLU that consumes the transposed conv (§8.1, §8.3)
    (rel,), absorbed = run(Seq(layer, nn.ReLU()), x, [R])
    expected, kept = ref.dense_default(x.numpy().reshape(-1), M, b, R.reshape(-1), ref.Gate(lower=0.0))
    np.testing.assert_allclose(rel.reshape(-1), expected, rtol=1e-9, atol=1e-12)
    assert absorbed[0] == pytest.approx(kept, rel=1e-9, abs=1e-12)
    Rn = np.abs(rng.normal(size=tuple(y.shape)))
    (pos, neg), _ = run(Seq(layer), x, [R, Rn], mode="contrastive")
    ep, en = ref.dense_contrastive(x.numpy().reshape(-1), M, b, R.reshape(-1), Rn.reshape(-1))
    np.testing.assert_allclose(pos.reshape(-1), ep, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(neg.reshape(-1), en, rtol=1e-9, atol=1e-12)


class TimeSeriesCNN(nn.Module):
    """A 1-D CNN for time series: conv-relu-maxpool, conv-relu-avgpool, adaptive pools, linear."""

    def __init__(self, channels=2, classes=3):
        super().__init__()
        self.c1 = nn.Conv1d(channels, 8, 5, padding=2)
        self.p1 = nn.MaxPool1d(2)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, padding=2)
        self.p2 = nn.AvgPool1d(3, 2, 1)
        self.amax = nn.AdaptiveMaxPool1d(4)
        self.aavg = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = self.p1(torch.relu(self.c1(x)))
        h = self.p2(torch.relu(self.c2(h)))
        return self.fc(torch.cat([self.amax(h), self.aavg(h)], 1).flatten(1))


def test_time_series_cnn_end_to_end():
    with jax.enable_x64(False):
        torch.manual_seed(3)
        model = TimeSeriesCNN().eval()
        t = torch.linspace(0, 6.28, 40)
        x = torch.stack([torch.stack([torch.sin(t * (k + 1)), torch.cos(t * 0.5 * (k + 2))])
                         for k in range(5)]) + 0.1 * torch.randn(5, 2, 40)
        ex = dlbjax.Explainer(model, x[:1])
        e = ex.batch(x, batch_size=2)
        for i in range(5):
            one = ex(x[i:i + 1])
            np.testing.assert_allclose(e.relevance["x"][i], one.relevance["x"][0], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(e.prediction, model(x).numpy(), rtol=1e-5, atol=1e-5)
        c = e.conservation
        print(f"1-D CNN default: seed {c.seed.mean():.1f} inputs {c.inputs.mean():.3f} bias "
              f"{c.bias.mean():.3f} lost max {np.abs(c.lost).max():.2e}")
        np.testing.assert_allclose(c.inputs + c.bias + c.lost, c.seed, rtol=1e-5)
        assert np.all(e.relevance["x"] >= 0)
        ec = dlbjax.explain(model, x, mode="contrastive")
        cc = ec.conservation
        print(f"1-D CNN contrastive: inputs+ {cc.inputs.positive.round(3)} of {cc.seed.positive.round(3)}"
              f"; inputs- {cc.inputs.negative.round(3)} of {cc.seed.negative.round(3)}")
        for s in (0, 1):
            np.testing.assert_allclose(cc.inputs[s] + cc.lost[s], cc.seed[s], rtol=1e-5)


class GlobalMax(nn.Module):
    """clamp, then amax over the last axis and max(dim) over the channels (global max pools)."""

    def forward(self, x):
        h = x.clamp(-1.5, 1.5)
        return torch.cat([h.amax(dim=-1), h.max(dim=1).values], dim=1)


def test_max_reductions_and_clamp_route_to_the_maxima():
    """aten.amax / aten.max.dim: each output's relevance goes to its reduced axis' maxima, exact
    ties (here also made by the clamp) split evenly (§4.2); clamp passes relevance unchanged
    (§2.2 null entry), in both modes."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.integers(-3, 4, size=(1, 3, 5)).astype(np.float64))
    model = GlobalMax()
    ops = _ops_have_rules(model, x)
    assert {"aten.amax.default", "aten.max.dim", "aten.clamp.default"} <= set(ops)
    h = np.clip(x.numpy()[0], -1.5, 1.5)  # [3, 5]
    for mode, S in (("default", 1), ("contrastive", 2)):
        seeds = [np.abs(rng.normal(size=(1, 8))) for _ in range(S)]
        rels, _ = run(model, x, seeds, mode)
        for s in range(S):
            expected = np.zeros_like(h)
            for c in range(3):  # amax over the last axis: outputs 0..2
                win = h[c] == h[c].max()
                expected[c, win] += seeds[s][0, c] / win.sum()
            for t in range(5):  # max over the channels: outputs 3..7
                win = h[:, t] == h[:, t].max()
                expected[win, t] += seeds[s][0, 3 + t] / win.sum()
            np.testing.assert_allclose(rels[s][0], expected, rtol=1e-12, atol=1e-12)
