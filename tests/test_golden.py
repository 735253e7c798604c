"""Every worked example of spec §2.3 and §3.3, to four decimals (spec §7.2 item 13).

Unit examples run the dense rule directly (in float64); the end-to-end MLP and classifier-head
examples go through torch models and dlbjax.explain. Mind the §8.16 trap: with canonical seeding
(value 1 x M) the §3.3 "default mode on the same head" gives (22.2222, 0, 66.6667), not MIT's
numbers seeded with the output probability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax.rules import GATES, linear_operator_rule

from reference import Gate, unit_contrastive, unit_default


def _dense(x, W, b, R, gate=None, contrastive=False):
    """Run the library's GEMM-form dense rule on one row in float64."""
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.float64)[None]
        W = jnp.asarray(W, jnp.float64)
        b = None if b is None else jnp.asarray(b, jnp.float64)[None]

        def lin(v, w):
            return v @ w.T

        if contrastive:
            Rs = dlbjax.Streams(jnp.asarray(R[0], jnp.float64)[None], jnp.asarray(R[1], jnp.float64)[None])
            rel, _ = linear_operator_rule(lin, x, W, b, Rs, True)
            return np.asarray(rel.positive[0]), np.asarray(rel.negative[0])
        rel, kept = linear_operator_rule(lin, x, W, b, jnp.asarray(R, jnp.float64)[None], False, gate)
        return np.asarray(rel[0]), float(jnp.sum(kept))


UNIT_CASES = [
    # name, x, w, b, gate, expected R_in, expected bias share
    ("A relu live", (2, 1, 3), (0.5, -1, 1), -0.5, GATES["relu"], (18.1818, 18.1818, 54.5455), 9.0909),
    ("A linear", (2, 1, 3), (0.5, -1, 1), -0.5, None, (18.1818, 18.1818, 54.5455), 9.0909),
    ("A swish", (2, 1, 3), (0.5, -1, 1), -0.5, GATES["swish"], (18.1818, 18.1818, 54.5455), 9.0909),
    ("B sigmoid upper", (3, 2, 1), (2, 1, -1), 0.5, GATES["sigmoid"], (70.5882, 23.5294, 0), None),
    ("B ungated", (3, 2, 1), (2, 1, -1), 0.5, None, (63.1579, 21.0526, 10.5263), None),
    ("C tanh lower", (1, 2, 1), (1, -2, -0.5), -0.25, GATES["tanh"], (0, 84.2105, 10.5263), None),
    ("C ungated", (1, 2, 1), (1, -2, -0.5), -0.25, None, (17.3913, 69.5652, 8.6957), None),
    ("D relu dead, canonical", (1, 2, -1), (0.5, -1, 2), 1.0, GATES["relu"], (0, 40, 40), 20.0),
    ("D relu dead, MIT (no bound)", (1, 2, -1), (0.5, -1, 2), 1.0, None, (9.0909, 36.3636, 36.3636), None),
    ("E one-sided", (1, 2), (1, 0.5), 2.0, None, (25, 25), 50.0),
    ("S swish below range", (1, 1, 3), (0.5, -1, -2.5), -0.5, GATES["swish"], (0, 11.1111, 83.3333), None),
]


@pytest.mark.parametrize("name,x,w,b,gate,expected,kept", UNIT_CASES, ids=[c[0] for c in UNIT_CASES])
def test_unit_examples(name, x, w, b, gate, expected, kept):
    rel, bias_share = _dense(x, [w], [b], [100.0], gate)
    np.testing.assert_allclose(rel, expected, atol=1e-4)
    if kept is not None:
        assert bias_share == pytest.approx(kept, abs=1e-4)
    # per-unit completeness (§2.4 / §7.2 item 1): every case has a non-empty active side
    assert rel.sum() + bias_share == pytest.approx(100.0, abs=1e-9)
    # the slow per-unit reference agrees
    ref_gate = None if gate is None else Gate(gate.lower, gate.upper, gate.fn and (lambda t: float(gate.fn(jnp.asarray(t)))))
    ref, ref_kept = unit_default(x, w, b, 100.0, ref_gate)
    np.testing.assert_allclose(rel, ref, atol=1e-9)


def test_example_F_two_outputs():
    x, W, b = (2, 1, 3), [[0.5, -1, 1], [1, 1, -1]], [-0.5, 0]
    rel, _ = _dense(x, W, b, [100.0, 50.0])
    np.testing.assert_allclose(rel, (34.8485, 26.5152, 79.5455), atol=1e-4)


CONTRAST_CASES = [
    # x, w, b, (R+, R-) in, R+ out, R- out
    ((2, 1, 3), (0.5, -1, 1), -0.5, (100, 20), (25, 0, 75), (0, 20, 0)),
    ((2, 1, 3), (0.5, -1, 1), -0.5, (10, 30), (0, 10, 0), (7.5, 0, 22.5)),
    ((2, 1, 3), (0.5, -1, 1), -0.5, (50, 50), (0, 50, 0), (12.5, 0, 37.5)),
    ((2, 1, 3), (0.5, -1, 1), -0.5, (100, 0), (25, 0, 75), (0, 0, 0)),
    ((2, 1, 3), (0.5, -3, -1), 0.5, (100, 20), (0, 50, 50), (20, 0, 0)),
    ((2, 1, 3), (0.5, -3, -1), 0.5, (10, 30), (10, 0, 0), (0, 15, 15)),
    ((1, 2), (1, 0.5), -5.0, (100, 20), (50, 50), (10, 10)),
    ((1, 1), (1, -0.5), -0.5, (100, 20), (0, 0), (0, 0)),
]


@pytest.mark.parametrize("x,w,b,Rin,pos,neg", CONTRAST_CASES)
def test_contrastive_table(x, w, b, Rin, pos, neg):
    p, n = _dense(x, [w], [b], ([float(Rin[0])], [float(Rin[1])]), contrastive=True)
    np.testing.assert_allclose(p, pos, atol=1e-4)
    np.testing.assert_allclose(n, neg, atol=1e-4)
    rp, rn = unit_contrastive(x, w, b, float(Rin[0]), float(Rin[1]))
    np.testing.assert_allclose(p, rp, atol=1e-9)
    np.testing.assert_allclose(n, rn, atol=1e-9)


# ---- end to end through torch ---------------------------------------------------------------------
class _MLP(nn.Module):
    """The §2.3 MLP: linear -> relu -> linear -> softmax (the softmax gates the output layer)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 2)
        self.l2 = nn.Linear(2, 2)
        with torch.no_grad():
            self.l1.weight.copy_(torch.tensor([[1, -0.5, 0.5], [-1, 2, 0.25]]))
            self.l1.bias.copy_(torch.tensor([0.1, -0.2]))
            self.l2.weight.copy_(torch.tensor([[0.8, -0.3], [-0.6, 0.9]]))
            self.l2.bias.copy_(torch.tensor([0.05, -0.1]))

    def forward(self, x):
        return torch.softmax(self.l2(torch.relu(self.l1(x))), dim=-1)


class _Head(nn.Module):
    """The §3.3 classifier head: one linear layer followed by softmax."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.5, -1, 1], [1, 1, -1]]))
            self.fc.bias.copy_(torch.tensor([-0.5, 0.2]))

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


X = torch.tensor([[2.0, 1.0, 3.0]])


def test_mlp_end_to_end_default():
    e = dlbjax.explain(_MLP(), X, layers=True)
    np.testing.assert_allclose(e.prediction, [[0.97875, 0.02125]], atol=1e-5)
    np.testing.assert_allclose(e.relevance["x"], [[47.8164, 11.9541, 35.8623]], atol=1e-4)
    assert e.relevance["x"].sum() == pytest.approx(95.6329, abs=1e-4)
    np.testing.assert_allclose(e.layers["relu"], [[98.0237, 0.0]], atol=1e-4)
    assert e.target.tolist() == [0]


def test_mlp_end_to_end_contrastive():
    e = dlbjax.explain(_MLP(), X, mode="contrastive")
    np.testing.assert_allclose(e.relevance["x"].positive, [[55.9287, 0, 41.9465]], atol=1e-4)
    np.testing.assert_allclose(e.relevance["x"].negative, [[0, 2.1248, 0]], atol=1e-4)
    assert e.conservation.inputs.positive[0] == pytest.approx(97.8752, abs=1e-4)
    assert e.conservation.inputs.negative[0] == pytest.approx(2.1248, abs=1e-4)


def test_head_contrastive_end_to_end():
    e = dlbjax.explain(_Head(), X, mode="contrast")
    np.testing.assert_allclose(e.relevance["x"].positive, [[22.7219, 0, 68.1658]], atol=1e-4)
    np.testing.assert_allclose(e.relevance["x"].negative, [[6.0749, 3.0374, 0]], atol=1e-4)


def test_head_default_canonical_seed_trap():
    """§8.16: canonical seeding (100 at the class) with the softmax gate gives (22.2222, 0, 66.6667)."""
    e = dlbjax.explain(_Head(), X)
    np.testing.assert_allclose(e.relevance["x"], [[22.2222, 0, 66.6667]], atol=1e-4)
    # MIT seeded the output value p = 0.908877: linearity of default mode reproduces its numbers
    e = dlbjax.explain(_Head(), X, multiplier=90.8877)
    np.testing.assert_allclose(e.relevance["x"], [[20.1973, 0, 60.5918]], atol=1e-4)
