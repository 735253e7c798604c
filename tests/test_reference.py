"""The vectorised rules against slow per-unit references (spec §7.2 items 10, 11, 14), in float64.

Each test builds a one-layer torch model, seeds its output with a random non-negative map through
``Explainer.relevance_function`` and compares the input relevance with a loop over units written
from the spec in ``reference.py``: the GEMM form equals the per-unit form, a convolution of any
stride/padding/dilation/groups equals the dense rule over its patches, a transposed convolution
equals the dense rule of its explicit matrix, and pools route as §8.6/§8.7 say.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
import reference as ref


def run(model, x, seeds, mode="default", **opts):
    """Relevance of the (single-row) input ``x`` for explicit output seeds, in float64."""
    opts.setdefault("task", "regression" if mode == "default" else "auto")
    ex = dlbjax.Explainer(model, x, mode=mode, **opts)
    f = jax.jit(ex.relevance_function())
    out = f(ex.constants, (jnp.asarray(x.numpy()),), tuple(jnp.asarray(s) for s in seeds))
    rel = out.relevance[ex.input_names[0]]
    return [np.asarray(r) for r in rel], np.asarray(out.absorbed)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _rand(rng, shape, zeros=0.2):
    a = rng.normal(size=shape)
    a[rng.random(shape) < zeros] = 0.0
    return a


def _set(layer, rng, zeros=0.2):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.from_numpy(_rand(rng, tuple(p.shape), zeros)))
    return layer


class Seq(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x)


ACTS = {"none": (None, None), "relu": (nn.ReLU(), ref.Gate(lower=0.0)),
        "sigmoid": (nn.Sigmoid(), ref.Gate(-4.0, 4.0)), "tanh": (nn.Tanh(), ref.Gate(-2.0, 2.0))}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("seed", range(4))
def test_dense_default_matches_per_unit(act, seed):
    rng = np.random.default_rng(seed)
    lin = _set(nn.Linear(7, 5), rng).double()
    mod, gate = ACTS[act]
    model = Seq(lin, mod) if mod is not None else Seq(lin)
    x = torch.from_numpy(_rand(rng, (1, 7)) * 3)
    R = np.abs(rng.normal(size=(1, 5)))
    # the seed sits on the activation's output; relevance crosses the identity activation first
    (rel,), absorbed = run(model, x, [R])
    expected, kept = ref.dense_default(x.numpy()[0], lin.weight.detach().numpy(),
                                       lin.bias.detach().numpy(), R[0], gate)
    np.testing.assert_allclose(rel[0], expected, rtol=1e-10, atol=1e-12)
    assert absorbed[0] == pytest.approx(kept, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_dense_contrastive_matches_per_unit(seed):
    rng = np.random.default_rng(100 + seed)
    lin = _set(nn.Linear(6, 4), rng).double()
    x = torch.from_numpy(_rand(rng, (1, 6)))
    Rp, Rn = np.abs(rng.normal(size=(1, 4))), np.abs(rng.normal(size=(1, 4)))
    Rn[0, 0] = Rp[0, 0]  # a tie is never aligned
    (pos, neg), _ = run(Seq(lin), x, [Rp, Rn], mode="contrastive")
    ep, en = ref.dense_contrastive(x.numpy()[0], lin.weight.detach().numpy(),
                                   lin.bias.detach().numpy(), Rp[0], Rn[0])
    np.testing.assert_allclose(pos[0], ep, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(neg[0], en, rtol=1e-10, atol=1e-12)


CONVS = [
    # (in_ch, out_ch, kernel, stride, padding, dilation, groups, size)
    (2, 3, 3, 1, 0, 1, 1, 6),
    (2, 4, 3, 2, 1, 1, 2, 7),
    (3, 3, (2, 3), (2, 1), (1, 2), (2, 1), 3, 7),
    (4, 2, 3, 1, 2, 2, 1, 5),
    (2, 2, 1, 3, 0, 1, 1, 8),
]


@pytest.mark.parametrize("cfg", CONVS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_equals_dense_over_patches(cfg, bias):
    cin, cout, k, s, p, d, g, size = cfg
    rng = np.random.default_rng(hash(cfg) % 2**32)
    conv = _set(nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias),
                rng).double()
    model = Seq(conv, nn.ReLU())
    x = torch.from_numpy(_rand(rng, (1, cin, size, size)))
    out_shape = tuple(conv(x).detach().shape)
    R = np.abs(rng.normal(size=out_shape))
    (rel,), absorbed = run(model, x, [R])
    as2 = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    expected, kept = ref.conv_default(x.numpy()[0], conv.weight.detach().numpy(),
                                      None if not bias else conv.bias.detach().numpy(), R[0],
                                      as2(s), as2(p), as2(d), g, ref.Gate(lower=0.0))
    np.testing.assert_allclose(rel[0], expected, rtol=1e-9, atol=1e-12)
    assert absorbed[0] == pytest.approx(kept, rel=1e-9, abs=1e-12)
    Rp, Rn = np.abs(rng.normal(size=out_shape)), np.abs(rng.normal(size=out_shape))
    (pos, neg), _ = run(Seq(conv), x, [Rp, Rn], mode="contrastive")
    ep, en = ref.conv_contrastive(x.numpy()[0], conv.weight.detach().numpy(),
                                  None if not bias else conv.bias.detach().numpy(), Rp[0], Rn[0],
                                  as2(s), as2(p), as2(d), g)
    np.testing.assert_allclose(pos[0], ep, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(neg[0], en, rtol=1e-9, atol=1e-12)


def _matrix(fn, in_shape):
    """Explicit matrix of a linear map (no bias) by applying it to basis vectors."""
    n = int(np.prod(in_shape))
    cols = []
    with torch.no_grad():
        for i in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = 1
            cols.append(fn(e.reshape(in_shape)).reshape(-1).detach().numpy())
    return np.stack(cols, axis=1)


LINEAR_OPS = {
    "conv1d": lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
    "conv_transpose1d": lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(4, 2, (3, 2), stride=(2, 1), padding=(1, 0),
                                                   groups=2, dilation=(1, 2)),
    "conv3d": lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=(0, 1, 1)),
}
IN_SHAPES = {"conv1d": (1, 2, 9), "conv_transpose1d": (1, 2, 4), "conv_transpose2d": (1, 4, 3, 3),
             "conv3d": (1, 2, 3, 4, 3)}


@pytest.mark.parametrize("name", list(LINEAR_OPS))
def test_linear_operators_equal_dense_rule_of_their_matrix(name):
    """§2.6: the rule of any linear operator is the dense rule of its explicit matrix."""
    rng = np.random.default_rng(7)
    layer = _set(LINEAR_OPS[name](), rng).double()
    x = torch.from_numpy(_rand(rng, IN_SHAPES[name]))
    y = layer(x).detach()
    bias_full = (y - _forward_no_bias(layer, x)).detach().numpy().reshape(-1)
    M = _matrix(lambda v: _forward_no_bias(layer, v), IN_SHAPES[name])
    R = np.abs(rng.normal(size=tuple(y.shape)))
    (rel,), absorbed = run(Seq(layer), x, [R])
    expected, kept = ref.dense_default(x.numpy().reshape(-1), M, bias_full, R.reshape(-1))
    np.testing.assert_allclose(rel.reshape(-1), expected, rtol=1e-9, atol=1e-12)
    assert absorbed[0] == pytest.approx(kept, rel=1e-9)
    Rp, Rn = np.abs(rng.normal(size=tuple(y.shape))), np.abs(rng.normal(size=tuple(y.shape)))
    (pos, neg), _ = run(Seq(layer), x, [Rp, Rn], mode="contrastive")
    ep, en = ref.dense_contrastive(x.numpy().reshape(-1), M, bias_full, Rp.reshape(-1), Rn.reshape(-1))
    np.testing.assert_allclose(pos.reshape(-1), ep, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(neg.reshape(-1), en, rtol=1e-9, atol=1e-12)


def _forward_no_bias(layer, x):
    bias = layer.bias
    layer.bias = None
    try:
        return layer(x)
    finally:
        layer.bias = bias


POOLS = [
    # kernel, stride, padding, dilation, ceil_mode
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 2), (1, 2), (1, 0), (2, 1), False),
    ((2, 3), (3, 2), (0, 1), (1, 1), True),
]


@pytest.mark.parametrize("cfg", POOLS)
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_max_pool_winner_takes_all_ties_split(cfg, mode):
    k, s, p, d, ceil = cfg
    rng = np.random.default_rng(3)
    # small integers so that ties occur inside windows
    x = torch.from_numpy(rng.integers(-2, 3, size=(1, 2, 7, 6)).astype(np.float64))
    model = Seq(nn.MaxPool2d(k, stride=s, padding=p, dilation=d, ceil_mode=ceil))
    out_shape = tuple(model(x).shape)
    seeds = [np.abs(rng.normal(size=out_shape)) for _ in range(1 if mode == "default" else 2)]
    rels, _ = run(model, x, seeds, mode=mode)
    for rel, R in zip(rels, seeds):
        expected = ref.max_pool_reference(x.numpy()[0], R[0], k, s, p, d, ceil)
        np.testing.assert_allclose(rel[0], expected, rtol=1e-12, atol=1e-12)
        assert rel.sum() == pytest.approx(R.sum(), rel=1e-12)


@pytest.mark.parametrize("cfg", [c for c in POOLS if c[3] == (1, 1)])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_abs_proportional(cfg, count_include_pad):
    k, s, p, _, ceil = cfg
    rng = np.random.default_rng(4)
    x = torch.from_numpy(_rand(rng, (1, 2, 7, 6)))
    model = Seq(nn.AvgPool2d(k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=count_include_pad))
    R = np.abs(rng.normal(size=tuple(model(x).shape)))
    (rel,), _ = run(model, x, [R])
    expected = ref.avg_pool_reference(x.numpy()[0], R[0], k, s, p, ceil)
    np.testing.assert_allclose(rel[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out_size", [(3, 2), (1, 1), (4, 5)])
def test_adaptive_avg_pool_uses_pytorch_windows(out_size):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(_rand(rng, (1, 2, 5, 4)))
    model = Seq(nn.AdaptiveAvgPool2d(out_size))
    R = np.abs(rng.normal(size=tuple(model(x).shape)))
    (rel,), _ = run(model, x, [R])
    H, W = 5, 4
    expected = np.zeros((2, H, W))
    for c in range(2):
        for i in range(out_size[0]):
            for j in range(out_size[1]):
                r0, r1 = (i * H) // out_size[0], -(-((i + 1) * H) // out_size[0])
                c0, c1 = (j * W) // out_size[1], -(-((j + 1) * W) // out_size[1])
                block = np.abs(x.numpy()[0, c, r0:r1, c0:c1])
                if block.sum() > 0:
                    expected[c, r0:r1, c0:c1] += R[0, c, i, j] * block / block.sum()
    np.testing.assert_allclose(rel[0], expected, rtol=1e-10, atol=1e-12)


def test_avg_pool_contrastive_is_unit_weight_dense_rule():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(_rand(rng, (1, 1, 4, 4)))
    model = Seq(nn.AvgPool2d(2))
    Rp = np.abs(rng.normal(size=(1, 1, 2, 2)))
    Rn = np.abs(rng.normal(size=(1, 1, 2, 2)))
    (pos, neg), _ = run(model, x, [Rp, Rn], mode="contrastive")
    ep, en = np.zeros((4, 4)), np.zeros((4, 4))
    for i in range(2):
        for j in range(2):
            cells = x.numpy()[0, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)
            p, n = ref.unit_contrastive(cells, np.ones(4), 0.0, Rp[0, 0, i, j], Rn[0, 0, i, j])
            ep[2 * i:2 * i + 2, 2 * j:2 * j + 2] = p.reshape(2, 2)
            en[2 * i:2 * i + 2, 2 * j:2 * j + 2] = n.reshape(2, 2)
    np.testing.assert_allclose(pos[0, 0], ep, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(neg[0, 0], en, rtol=1e-10, atol=1e-12)
