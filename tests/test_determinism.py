"""Determinism (issue 7, point 3): the same call gives bitwise identical results twice in one
process and in another process on CPU, and float64 mode agrees with float32.

Tolerance for float32 vs float64 (spec §7.2: float32 rtol 1e-5): every relevance entry must satisfy
|r32 - r64| <= 1e-5 |r64| + 1e-5 M, with M the row's seed total (the multiplier, 100): entries
near zero are judged on the scale of the relevance budget, not their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch

import dlbjax
from conftest import MLP, ResidualCNN, randomize_bn

M = 100.0


def _cnn():
    torch.manual_seed(0)
    return randomize_bn(ResidualCNN()).eval()


def _x(shape=(3, 3, 12, 12), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _arrays(e):
    """Every array of an explanation (relevance, layers, prediction, totals) by a stable key."""
    out = {"prediction": e.prediction, "target": e.target}
    for group, d in (("relevance", e.relevance), ("layers", e.layers or {})):
        for k, v in d.items():
            if isinstance(v, dlbjax.Streams):
                out[f"{group}/{k}/+"], out[f"{group}/{k}/-"] = v.positive, v.negative
            else:
                out[f"{group}/{k}"] = v
    c = e.conservation
    for f in ("seed", "inputs", "bias", "lost"):
        v = getattr(c, f)
        if isinstance(v, dlbjax.Streams):
            out[f"conservation/{f}/+"], out[f"conservation/{f}/-"] = v.positive, v.negative
        else:
            out[f"conservation/{f}"] = v
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_same_call_twice_is_bitwise_identical(mode):
    model, x = _cnn(), _x()
    first = _arrays(dlbjax.explain(model, x, mode=mode, layers=True))
    ex = dlbjax.Explainer(model, x, mode=mode, layers=True)  # a fresh export and compilation
    _assert_bitwise(first, _arrays(ex(x)))
    _assert_bitwise(first, _arrays(ex(x)))  # the cached compiled pass


CHILD = textwrap.dedent("""
    import sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    import dlbjax
    from conftest import ResidualCNN
    model = ResidualCNN()
    model.load_state_dict(torch.load({state!r}))
    model.eval()
    x = torch.from_numpy(np.load({x!r}))
    for mode in ("default", "contrastive"):
        e = dlbjax.explain(model, x, mode=mode, layers=True)
        r = e.relevance["x"]
        r = np.stack([r.positive, r.negative]) if mode == "contrastive" else r
        np.save({out!r} + mode + ".npy", r)
""")


def test_another_process_gives_the_same_bytes(tmp_path):
    model, x = _cnn(), _x()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    out = str(tmp_path / "relevance_")
    script = CHILD.format(tests=os.path.dirname(__file__), state=str(tmp_path / "state.pt"),
                          x=str(tmp_path / "x.npy"), out=out)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300,
                   capture_output=True)
    for mode in ("default", "contrastive"):
        e = dlbjax.explain(model, x, mode=mode, layers=True)
        r = e.relevance["x"]
        here = np.stack([r.positive, r.negative]) if mode == "contrastive" else r
        there = np.load(out + mode + ".npy")
        assert there.dtype == here.dtype and there.shape == here.shape
        assert there.tobytes() == np.ascontiguousarray(here).tobytes(), mode


def _close_to_float64(r32, r64, scale):
    r32, r64 = np.asarray(r32, np.float64), np.asarray(r64)
    assert r64.dtype == np.float64
    bound = 1e-5 * np.abs(r64) + 1e-5 * scale
    worst = float(np.max(np.abs(r32 - r64) - bound))
    assert worst <= 0, f"float32 and float64 differ beyond rtol 1e-5 (+1e-5 M): {worst}"


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_float64_mode_matches_float32(which, mode):
    if which == "mlp":
        torch.manual_seed(3)
        model, x = MLP((16, 32, 32, 10)).eval(), _x((4, 16), seed=2)
    else:
        model, x = _cnn(), _x()
    e32 = dlbjax.explain(model, x, mode=mode)
    with jax.enable_x64(True):
        e64 = dlbjax.explain(model.double(), x.double(), mode=mode)
    model.float()
    assert e32.target.tolist() == e64.target.tolist()
    if mode == "default":
        _close_to_float64(e32.relevance["x"], e64.relevance["x"], M)
        np.testing.assert_allclose(e32.conservation.bias, e64.conservation.bias, rtol=1e-5,
                                   atol=1e-5 * M)
    else:
        for s in ("positive", "negative"):
            _close_to_float64(getattr(e32.relevance["x"], s), getattr(e64.relevance["x"], s), M)
