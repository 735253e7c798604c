"""Whole models: the JAX forward matches torch eager (max |diff| / max |ref| <= 1e-5 in float32)
under jit and vmap, and explanations run end to end (default and contrastive), for an MLP, a CNN
with a residual block and batch norm, and torchvision resnet18, vgg11 and mobilenet_v2 with seeded
random weights and randomised batch-norm statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import dlbjax
from conftest import MLP, ResidualCNN, randomize_bn
from dlbjax.engine.interpret import constants_to_jax, evaluate


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


SMALL = {
    "mlp": (lambda: MLP((16, 32, 32, 10)), (4, 16)),
    "residual_cnn": (lambda: randomize_bn(ResidualCNN()), (3, 3, 12, 12)),
}
TORCHVISION = {
    "resnet18": (lambda: randomize_bn(torchvision.models.resnet18(num_classes=10)), (2, 3, 32, 32)),
    "vgg11": (lambda: torchvision.models.vgg11(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)),
                     (2, 3, 32, 32)),
}


def _build(table, name):
    torch.manual_seed(0)
    ctor, shape = table[name]
    model = ctor().eval()
    # non-zero biases everywhere, so bias shares are exercised
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0, 0.05)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_matches_torch_jit_and_vmap(name):
    model, x = _build(SMALL, name)
    ref = _torch_out(model, x)
    from dlbjax.importers import import_model
    program, bound = import_model(model, x[:1])
    consts = constants_to_jax(program)
    fwd = lambda c, v: evaluate(program, c, [v])[0]  # noqa: E731
    eager = np.asarray(fwd(consts, jnp.asarray(x[:1].numpy())))
    assert _rel_err(eager, ref[:1]) <= 1e-5
    jitted = np.asarray(jax.jit(fwd)(consts, jnp.asarray(x[:1].numpy())))
    assert _rel_err(jitted, ref[:1]) <= 1e-5
    rows = jnp.asarray(x.numpy())[:, None]
    batched = np.asarray(jax.jit(jax.vmap(fwd, in_axes=(None, 0)))(consts, rows))[:, 0]
    assert _rel_err(batched, ref) <= 1e-5


def _check_explanation(model, x, ex=None):
    ref = _torch_out(model, x)
    ex = ex or dlbjax.Explainer(model, x)
    e = ex(x)
    assert _rel_err(e.prediction, ref) <= 1e-5
    rel = e.relevance["x"]
    assert rel.shape == tuple(x.shape)
    assert np.all(np.isfinite(rel)) and rel.min() >= 0
    np.testing.assert_array_equal(e.target, ref.argmax(1))
    c = e.conservation
    np.testing.assert_allclose(c.seed, 100.0)
    np.testing.assert_allclose(c.inputs + c.bias + c.lost, c.seed, rtol=1e-5)
    assert np.all(c.inputs > 0) and np.all(c.bias >= 0)
    # relevance + absorbed never exceeds the seed (up to float32 rounding)
    assert np.all(c.inputs + c.bias <= 100.0 * (1 + 1e-4))
    return ex, e


@pytest.mark.parametrize("name", list(SMALL))
def test_explain_small_models(name):
    model, x = _build(SMALL, name)
    ex, e = _check_explanation(model, x)
    ec = dlbjax.explain(model, x, mode="contrastive")
    pos, neg = ec.relevance["x"].positive, ec.relevance["x"].negative
    assert pos.min() >= 0 and neg.min() >= 0
    logits = _torch_out(model, x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = logits.argmax(1)
    np.testing.assert_allclose(ec.conservation.seed.positive, 100 * p[np.arange(len(t)), t], rtol=1e-5)
    np.testing.assert_allclose(ec.conservation.seed.positive + ec.conservation.seed.negative, 100,
                               rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_models(name):
    model, x = _build(TORCHVISION, name)
    ex, e = _check_explanation(model, x)
    # a different target is a different explanation of the same forward, from the same compiled pass
    other = ex(x, target=(e.target + 1) % 10)
    assert not np.allclose(other.relevance["x"], e.relevance["x"])
    np.testing.assert_allclose(other.prediction, e.prediction)
    assert ex.trace_count == 1
