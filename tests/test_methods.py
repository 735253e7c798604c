"""The gradient family of ``method=`` (issue 11 item 1), against torch autograd and Captum.

``gradient`` / ``gradient-x-input`` equal ``torch.autograd.grad`` of the target logit (an MLP, a CNN
with eval batch norm and max pool, per-token on a tiny BERT through its word-embedding output);
``integrated-gradients`` equals Captum's ``IntegratedGradients`` for every ``ig_method`` and
satisfies completeness; ``smoothgrad`` is reproducible and reduces to the gradient at noise 0;
``method="dlb"`` is today's default bit for bit; jit, batches, datasets; typed errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax import MethodError
from conftest import MLP, ResidualCNN, randomize_bn, seeded
import hf_zoo

captum_attr = pytest.importorskip("captum.attr")

RTOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torch_grad(model, x, target=None):
    x = x.clone().requires_grad_(True)
    out = model(x)
    t = out.argmax(1) if target is None else torch.as_tensor(target).expand(len(x))
    g, = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
    return g.numpy(), t.numpy()


@pytest.fixture(scope="module")
def mlp():
    return seeded(MLP((12, 24, 24, 5)), 0).eval()


@pytest.fixture(scope="module")
def cnn():
    return randomize_bn(seeded(ResidualCNN(channels=6, classes=4), 1), 2).eval()


@pytest.fixture(scope="module")
def x_mlp():
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def x_cnn():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))


def rel(e):
    (r,) = e.relevance.values()
    return r


# ------------------------------------------------------------------------------------------------
# gradient and gradient x input == torch autograd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_gradient_and_gradient_x_input_equal_torch(which, request):
    model = request.getfixturevalue(which)
    x = request.getfixturevalue(f"x_{which}")
    g, t = torch_grad(model, x)
    e = dlbjax.explain(model, x, method="gradient")
    assert e.method == "gradient" and e.multiplier == 1.0 and e.mode == "default"
    np.testing.assert_array_equal(e.target, t)
    assert rel_err(rel(e), g) < RTOL
    gx = dlbjax.explain(model, x, method="gradient-x-input")
    assert rel_err(rel(gx), g * x.numpy()) < RTOL
    # an explicit target
    g1, _ = torch_grad(model, x, target=1)
    assert rel_err(rel(dlbjax.explain(model, x, method="gradient", target=1)), g1) < RTOL
    # conservation report: seed = f(x) - f(0) of the target logit, inputs = sum of attributions
    with torch.no_grad():
        fx = model(x).gather(1, torch.as_tensor(t)[:, None])[:, 0].numpy()
        f0 = model(torch.zeros_like(x))[:, t].diagonal().numpy()
    np.testing.assert_allclose(gx.conservation.seed, fx - f0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx.conservation.inputs,
                               (g * x.numpy()).reshape(len(x), -1).sum(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx.conservation.lost, gx.conservation.seed - gx.conservation.inputs,
                               atol=1e-6)


def test_gradient_x_input_is_complete_on_bias_free_relu():
    """Euler: a bias-free ReLU network is positively homogeneous, so sum(grad x input) = f(x)
    (lost 0); DLB is another rule and is not compared, only method='dlb' == the default."""
    model = seeded(MLP((10, 16, 16, 4), bias=False), 5).eval()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(6))
    e = dlbjax.explain(model, x, method="gradient-x-input")
    assert np.abs(e.conservation.lost).max() < 1e-5 * np.abs(e.conservation.seed).max()
    default, dlb = dlbjax.explain(model, x), dlbjax.explain(model, x, method="dlb")
    assert default == dlb and default.method == "dlb" and default.multiplier == 100.0


# ------------------------------------------------------------------------------------------------
# integrated gradients == Captum
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ig_method", ["riemann_trapezoid", "riemann_left", "riemann_right",
                                       "riemann_middle", "gausslegendre"])
def test_integrated_gradients_equal_captum(ig_method, mlp, x_mlp):
    steps = 16
    base = torch.linspace(-0.5, 0.5, 12)
    e = dlbjax.explain(mlp, x_mlp, method="integrated-gradients", steps=steps,
                       ig_method=ig_method, baseline=base.numpy())
    ig = captum_attr.IntegratedGradients(mlp)
    ref = ig.attribute(x_mlp, baselines=base.expand_as(x_mlp), target=torch.as_tensor(e.target),
                       n_steps=steps, method=ig_method).detach().numpy()
    assert rel_err(rel(e), ref) < RTOL


@pytest.mark.parametrize("baseline", [0.0, 0.25])
def test_integrated_gradients_cnn_equal_captum(baseline, cnn, x_cnn):
    """Batch norm (eval) and max pool: a constant baseline makes max-pool windows tie, where the
    gradient goes to the first maximum as in torch."""
    e = dlbjax.explain(cnn, x_cnn, method="integrated-gradients", steps=64, baseline=baseline)
    ig = captum_attr.IntegratedGradients(cnn)
    ref, delta = ig.attribute(x_cnn, baselines=baseline, target=torch.as_tensor(e.target),
                              n_steps=64, method="riemann_trapezoid",
                              return_convergence_delta=True)
    assert rel_err(rel(e), ref.detach().numpy()) < RTOL
    # Captum's delta is sum(attributions) - (f(x) - f(baseline)) = -lost
    np.testing.assert_allclose(-e.conservation.lost, delta.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("ig_method,tol", [("gausslegendre", 1e-2), ("riemann_middle", 1e-2),
                                           ("riemann_trapezoid", None)])
def test_integrated_gradients_completeness(ig_method, tol, cnn, x_cnn):
    steps, baseline = 64, 0.25
    e = dlbjax.explain(cnn, x_cnn, method="integrated-gradients", steps=steps, baseline=baseline,
                       ig_method=ig_method)
    with torch.no_grad():
        t = torch.as_tensor(e.target)[:, None]
        fx = cnn(x_cnn).gather(1, t)[:, 0].numpy()
        fb = cnn(torch.full_like(x_cnn, baseline)).gather(1, t)[:, 0].numpy()
    seed, lost = e.conservation.seed, e.conservation.lost
    np.testing.assert_allclose(seed, fx - fb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.conservation.inputs, rel(e).reshape(len(fx), -1).sum(1),
                               rtol=1e-4, atol=1e-7)
    err = np.abs(lost) / np.abs(seed)
    if tol is not None:
        assert err.max() < tol, err
    else:
        # Captum's trapezoid weights sum to (n - 1)/n: short by about 1/n of the difference
        np.testing.assert_allclose(lost / seed, 1.0 / steps, atol=1e-2)
    print(f"completeness {ig_method}, {steps} steps: max |lost|/|seed| = {err.max():.2e}")


# ------------------------------------------------------------------------------------------------
# token inputs: a tiny BERT, per-token gradient x input through the word embeddings
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    model = hf_zoo.tiny("bert").eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 128, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _torch_token_grad(model, inputs):
    store = {}

    def hook(mod, args, out):
        out.retain_grad()
        store["e"] = out

    h = model.bert.embeddings.word_embeddings.register_forward_hook(hook)
    try:
        logits = model(**inputs).logits
        t = logits.argmax(1)
        logits.gather(1, t[:, None]).sum().backward()
    finally:
        h.remove()
    e = store["e"]
    return e.grad.detach().numpy(), e.detach().numpy(), t.numpy()


def test_bert_per_token_gradient_x_input_equals_torch(bert):
    model, inputs = bert
    g, emb, t = _torch_token_grad(model, inputs)
    ex = dlbjax.Explainer(model, inputs, method="gradient-x-input")
    e = ex(inputs)
    np.testing.assert_array_equal(e.target, t)
    assert rel_err(e.relevance["input_ids"], (g * emb).sum(-1)) < RTOL
    assert np.all(e.relevance["input_ids"][1, 7:] == 0.0)      # padded tokens exactly 0
    assert np.all(e.relevance["attention_mask"] == 0.0)
    # "gradient" sums the gradient over the hidden axis; BERT normalises the embeddings with a
    # LayerNorm, which is invariant to a shift along that axis, so the sum is 0 up to rounding
    eg = ex.replace(method="gradient")(inputs)
    assert np.abs(eg.relevance["input_ids"] - g.sum(-1)).max() < RTOL * np.abs(g).max()
    # integrated gradients in embedding space (zero baseline): complete, padding 0
    ig = ex.replace(method="integrated-gradients", steps=64, ig_method="gausslegendre")(inputs)
    assert np.all(ig.relevance["input_ids"][1, 7:] == 0.0)
    assert np.abs(ig.conservation.lost).max() < 1e-2 * np.abs(ig.conservation.seed).max()
    # Captum on inputs_embeds (the word-embedding output) with a zero baseline is the same path
    emb = model.bert.embeddings.word_embeddings(inputs["input_ids"]).detach()
    ig_ref = captum_attr.IntegratedGradients(
        lambda x, mask: model(inputs_embeds=x, attention_mask=mask).logits)
    ref = ig_ref.attribute(emb, baselines=0.0, additional_forward_args=(inputs["attention_mask"],),
                           target=torch.as_tensor(ig.target), n_steps=64,
                           method="gausslegendre").detach().numpy().sum(-1)
    assert rel_err(ig.relevance["input_ids"], ref) < 1e-4


# ------------------------------------------------------------------------------------------------
# smoothgrad
# ------------------------------------------------------------------------------------------------
def test_smoothgrad_seed_noise_and_inputs(mlp, x_mlp):
    ex = dlbjax.Explainer(mlp, x_mlp, method="smoothgrad", samples=8, seed=1)
    a, b = ex(x_mlp), ex.replace(seed=1)(x_mlp)
    c = ex.replace(seed=2)(x_mlp)
    np.testing.assert_array_equal(rel(a), rel(b))
    assert not np.allclose(rel(a), rel(c))
    g = rel(ex.replace(method="gradient", samples=None, seed=None)(x_mlp))
    z = ex.replace(samples=4, noise=0.0)(x_mlp)
    np.testing.assert_allclose(rel(z), g, rtol=1e-6, atol=1e-7)
    zi = ex.replace(samples=4, noise=0.0, multiply_by_inputs=True)(x_mlp)
    np.testing.assert_allclose(rel(zi), g * x_mlp.numpy(), rtol=1e-6, atol=1e-7)
    # small noise: the mean of the noisy gradients stays near the gradient
    small = ex.replace(samples=16, noise=1e-4)(x_mlp)
    assert rel_err(rel(small), g) < 1e-2


# ------------------------------------------------------------------------------------------------
# jit, batches, datasets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [("gradient-x-input", {}),
                                         ("integrated-gradients", {"steps": 8}),
                                         ("smoothgrad", {"samples": 4, "seed": 3})])
def test_jit_batch_and_dataset(method, opts, mlp, x_mlp, tmp_path):
    ex = dlbjax.Explainer(mlp, x_mlp, method=method, **opts)
    first, second = ex(x_mlp), ex(x_mlp)
    assert first == second and ex.trace_count == 1
    rows = [ex(x_mlp[i:i + 1]) for i in range(len(x_mlp))]
    np.testing.assert_allclose(rel(first), np.concatenate([rel(r) for r in rows]),
                               rtol=1e-6, atol=1e-7)
    batched = ex.batch(x_mlp, batch_size=2)
    np.testing.assert_allclose(rel(batched), rel(first), rtol=1e-6, atol=1e-7)
    manifest = ex.explain_dataset(x_mlp, batch_size=2, out=tmp_path / "out", progress=False)
    assert manifest["complete"] and manifest["config"]["method"]["method"] == method
    back = dlbjax.load_results(tmp_path / "out")
    assert back.method == method and back.multiplier == 1.0
    np.testing.assert_allclose(rel(back), rel(first), rtol=1e-6, atol=1e-7)
    # save / load keeps the method
    path = first.save(tmp_path / "e.npz")
    assert dlbjax.Explanation.load(path) == first


def test_relevance_function_under_jit_and_vmap(mlp, x_mlp):
    import jax
    import jax.numpy as jnp
    ex = dlbjax.Explainer(mlp, x_mlp, method="integrated-gradients", steps=8)
    e = ex(x_mlp)
    f = jax.jit(ex.relevance_function())
    rows = jnp.asarray(x_mlp.numpy())[:, None]                       # [rows, 1, 12]
    seeds = jax.nn.one_hot(jnp.asarray(e.target), 5)[:, None]        # [rows, 1, 5]
    out = jax.vmap(lambda x, s: f(ex.constants, (x,), (s,)))(rows, seeds)
    np.testing.assert_allclose(np.asarray(out.relevance["x"][0])[:, 0], rel(e),
                               rtol=1e-6, atol=1e-7)


def test_replace_switches_method_without_reexport(mlp, x_mlp):
    ex = dlbjax.Explainer(mlp, x_mlp)
    g = ex.replace(method="gradient")
    assert g.program is ex.program
    assert rel_err(rel(g(x_mlp)), torch_grad(mlp, x_mlp)[0]) < RTOL
    assert ex(x_mlp) == dlbjax.explain(mlp, x_mlp)


# ------------------------------------------------------------------------------------------------
# typed errors
# ------------------------------------------------------------------------------------------------
def test_method_errors(mlp, x_mlp):
    with pytest.raises(MethodError, match="known methods are 'dlb', 'lrp-0'.*'gradient'"):
        dlbjax.explain(mlp, x_mlp, method="lrp-7")
    with pytest.raises(MethodError, match="method 'dlb' takes no option steps="):
        dlbjax.explain(mlp, x_mlp, steps=10)
    with pytest.raises(MethodError, match="takes no option samples="):
        dlbjax.Explainer(mlp, x_mlp, method="integrated-gradients", samples=3)
    with pytest.raises(MethodError, match="contrastive"):
        dlbjax.Explainer(mlp, x_mlp, method="gradient", mode="contrastive")
    with pytest.raises(MethodError, match="layers=True"):
        dlbjax.Explainer(mlp, x_mlp, method="gradient", layers=True)
    with pytest.raises(MethodError, match="unknown ig_method"):
        dlbjax.Explainer(mlp, x_mlp, method="integrated-gradients", ig_method="simpson")
    with pytest.raises(MethodError, match="steps must be a positive int"):
        dlbjax.Explainer(mlp, x_mlp, method="integrated-gradients", steps=0)
    with pytest.raises(MethodError, match="does not broadcast"):
        dlbjax.Explainer(mlp, x_mlp, method="integrated-gradients", baseline=np.zeros(7))
    with pytest.raises(MethodError, match="noise must be"):
        dlbjax.Explainer(mlp, x_mlp, method="smoothgrad", noise=-1)
    assert issubclass(MethodError, ValueError) and issubclass(MethodError, dlbjax.DLBJaxError)
    ex = dlbjax.Explainer(mlp, x_mlp)
    with pytest.raises(MethodError):
        ex.replace(method="gradient", mode="contrastive")


def test_gradient_method_with_length_buckets(bert):
    """Buckets pad to 16 tokens with the mask at 0: the real tokens' attributions are unchanged."""
    model, inputs = bert
    plain = dlbjax.Explainer(model, inputs, method="gradient-x-input")(inputs)
    bucketed = dlbjax.Explainer(model, inputs, method="gradient-x-input", buckets=[16])(inputs)
    assert bucketed.relevance["input_ids"].shape == (2, 10)
    assert rel_err(bucketed.relevance["input_ids"], plain.relevance["input_ids"]) < 1e-5


def test_gradient_methods_need_lowerings_not_relevance_rules():
    """x ** 2 has a forward lowering but no relevance rule: DLB and LRP refuse the model, the
    gradient family explains it (it differentiates the forward) and equals torch autograd."""
    torch.manual_seed(0)

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x) ** 2)

    model = Square().eval()
    x = torch.randn(3, 4)
    with pytest.raises(dlbjax.UnsupportedOperationError, match="pow"):
        dlbjax.Explainer(model, x)
    with pytest.raises(dlbjax.UnsupportedOperationError, match="pow"):
        dlbjax.Explainer(model, x, method="lrp-epsilon")
    e = dlbjax.explain(model, x, method="gradient")
    g, t = torch_grad(model, x)
    assert np.array_equal(e.target, t)
    assert rel_err(e.relevance["x"], g) < RTOL
