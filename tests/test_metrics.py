"""Faithfulness metrics (``dlbjax.metrics``, issue 11) against slow references written here.

Every metric is compared with a per-row, per-step NumPy / torch loop (the torch model's own
forward, torch autograd for re-explanations) on tiny seeded models: an MLP, a one-channel CNN on
8 x 8 images, a three-channel residual CNN (pixels across channels) and a token classifier with an
attention mask whose padded tokens would change the output if they were flipped. Pixel flipping
and faithfulness correlation are also compared with Quantus 0.6.0 on the same inputs, relevance,
constant baseline and (recorded) random subsets. Plus hand-made AOPC/ABPC curves, seeds, padded
tokens, randomisation invariants (the Explainer, its constants and the torch model unchanged, no
recompilation) and typed errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
import torch.nn as nn

import dlbjax
from dlbjax import InputMismatchError, MethodError, TargetError
from dlbjax import metrics as M
from conftest import MLP, ResidualCNN, randomize_bn, seeded

TOL = 1e-5


def close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(b).max(), 1.0)
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(nn.functional.max_pool2d(self.conv(x), 2)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class TinyText(nn.Module):
    """Embedding, a mean over *all* positions (padded ones weighted 0.5, so flipping a padded
    token would change the output), a linear head."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        w = 0.5 + 0.5 * attention_mask.to(torch.float32)
        h = (self.emb(input_ids) * w[..., None]).mean(1)
        return self.fc(torch.tanh(h))


@pytest.fixture(scope="module")
def mlp():
    model = seeded(MLP((8, 16, 16, 3)), 0).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ex = dlbjax.Explainer(model, x, method="gradient-x-input")
    return model, x, ex, ex(x)


@pytest.fixture(scope="module")
def cnn():
    model = seeded(TinyCNN(), 2).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ex = dlbjax.Explainer(model, x)          # DLB relevance
    return model, x, ex, ex(x)


@pytest.fixture(scope="module")
def rgb():
    model = randomize_bn(seeded(ResidualCNN(channels=4, classes=3), 4), 5).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    ex = dlbjax.Explainer(model, x, method="gradient-x-input")
    return model, x, ex, ex(x)


@pytest.fixture(scope="module")
def text():
    model = seeded(TinyText(), 7).eval()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 20, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    ids[2, 3:], mask[2, 3:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    ex = dlbjax.Explainer(model, inputs, method="gradient-x-input")
    return model, inputs, ex, ex(inputs)


# ------------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------------
def torch_scores(model, x, targets, score="logit", **kw):
    with torch.no_grad():
        out = model(x, **kw) if kw else model(x)
    out = out.double()
    if score == "probability":
        out = torch.softmax(out, 1)
    return out[torch.arange(len(out)), torch.as_tensor(np.asarray(targets).copy())].numpy()


def feature_relevance(rel, kind):
    """Per-row feature relevance as a list of Python lists (pixels: sum over the channels)."""
    rel = np.asarray(rel, np.float64)
    if kind == "pixel":
        rel = rel.sum(1)
    return [list(r.reshape(-1)) for r in rel]


def ref_flipping(model, x, rel_feat, targets, order, steps, base, kind="element", patch=1,
                 valid=None, score="logit", extra=None):
    """One torch forward per row and step; features flipped in a Python-sorted order."""
    x = np.asarray(x)
    out = np.zeros((len(x), steps + 1))
    for r in range(len(x)):
        F = len(rel_feat[r])
        ok = [f for f in range(F) if valid is None or valid[r][f]]
        sign = -1 if order == "morf" else 1
        ranked = sorted(ok, key=lambda f: (sign * rel_feat[r][f], f))
        for k in range(steps + 1):
            xk = x[r].copy()
            for f in ranked[:k * len(ok) // steps]:
                if kind == "pixel":
                    w = x.shape[-1] // patch
                    i, j = divmod(f, w)
                    xk[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = \
                        base[r][:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
                else:
                    xk.reshape(-1)[f] = base[r].reshape(-1)[f]
            kw = {k_: v[r:r + 1] for k_, v in (extra or {}).items()}
            out[r, k] = torch_scores(model, torch.as_tensor(xk[None]), [targets[r]], score,
                                     **kw)[0]
    return out


def patch_relevance(rel, p):
    """Relevance summed over the channels and over each p x p patch, patches in row-major order."""
    rel = np.asarray(rel, np.float64).sum(1)
    n, h, w = rel.shape
    out = []
    for r in range(n):
        row = []
        for i in range(h // p):
            for j in range(w // p):
                row.append(float(rel[r, i * p:(i + 1) * p, j * p:(j + 1) * p].sum()))
        out.append(row)
    return out


def torch_gxi(model, x, targets):
    x = x.clone().requires_grad_(True)
    out = model(x)
    t = torch.as_tensor(np.asarray(targets).copy())
    g, = torch.autograd.grad(out[torch.arange(len(x)), t].sum(), x)
    return (g * x).detach().numpy()


# ------------------------------------------------------------------------------------------------
# flipping curves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("baseline", ["zero", "mean", 0.3])
def test_flipping_mlp_equals_loop(mlp, order, baseline):
    model, x, ex, e = mlp
    curve = M.flipping_curve(ex, x, e, order=order, steps=8, baseline=baseline)
    xn = x.numpy()
    base = {"zero": np.zeros_like(xn), "mean": np.repeat(xn.mean(1, keepdims=True), 8, 1),
            0.3: np.full_like(xn, 0.3)}[baseline]
    ref = ref_flipping(model, xn, feature_relevance(e.relevance["x"], "element"), e.target,
                       order, 8, base)
    assert curve.shape == (5, 9)
    close(curve, ref)
    close(curve[:, 0], torch_scores(model, x, e.target))


def test_flipping_steps_and_probability(mlp):
    """steps=3 over 8 features flips floor(8k/3) = 0, 2, 5, 8; the softmax score."""
    model, x, ex, e = mlp
    curve = M.flipping_curve(ex, x, e, steps=3, baseline="zero", score="probability",
                             target=1)
    ref = ref_flipping(model, x.numpy(), feature_relevance(e.relevance["x"], "element"),
                       [1] * 5, "morf", 3, np.zeros((5, 8), np.float32), score="probability")
    close(curve, ref)
    # steps=None: one feature per step
    assert M.flipping_curve(ex, x, e, baseline="zero").shape == (5, 9)
    # a plain array of relevance and no target: the argmax of the output
    c2 = M.flipping_curve(ex, x, np.asarray(e.relevance["x"]), steps=3, baseline="zero")
    c1 = M.flipping_curve(ex, x, e, steps=3, baseline="zero")
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_flipping_ties_are_stable(mlp, order):
    """Tied relevance goes in feature order (the lower index first) for MoRF and LeRF."""
    model, x, ex, e = mlp
    rel = np.round(np.asarray(e.relevance["x"]), 1)
    rel[0] = 0.0                                   # one row all tied
    assert any(len(set(r)) < len(r) for r in rel)
    curve = M.flipping_curve(ex, x, {"x": rel}, order=order, baseline=0.5, target=e.target)
    ref = ref_flipping(model, x.numpy(), feature_relevance(rel, "element"), e.target, order, 8,
                       np.full((5, 8), 0.5, np.float32))
    close(curve, ref)


def test_flipping_image_pixels_across_channels(rgb):
    """A [3, 8, 8] image: one feature is a pixel over all 3 channels, relevance summed over them;
    the blur baseline is scipy's Gaussian filter over H and W."""
    model, x, ex, e = rgb
    for baseline in ("mean", "blur"):
        curve = M.flipping_curve(ex, x, e, steps=8, baseline=baseline, blur_sigma=1.5)
        xn = x.numpy()
        base = (np.repeat(xn.reshape(2, -1).mean(1), 3 * 64).reshape(xn.shape)
                if baseline == "mean" else
                scipy.ndimage.gaussian_filter(xn.astype(np.float64), (0, 0, 1.5, 1.5)))
        ref = ref_flipping(model, xn, feature_relevance(e.relevance["x"], "pixel"), e.target,
                           "morf", 8, base.astype(np.float32), kind="pixel")
        close(curve, ref)


@pytest.mark.parametrize("patch", [2, 4])
def test_region_perturbation_equals_loop(rgb, patch):
    model, x, ex, e = rgb
    n_patches = (8 // patch) ** 2
    curve = M.region_perturbation(ex, x, e, patch=patch, baseline="zero", order="lerf")
    assert curve.shape == (2, n_patches + 1)
    ref = ref_flipping(model, x.numpy(), patch_relevance(e.relevance["x"], patch), e.target,
                       "lerf", n_patches, np.zeros(x.shape, np.float32), kind="pixel",
                       patch=patch)
    close(curve, ref)


def test_flipping_chunks_compile_once(cnn):
    """Small chunks give the same curve as one block; the chunked run compiles one function."""
    model, x, ex, e = cnn
    whole = M.flipping_curve(ex, x, e, steps=16, baseline="zero")
    chunked = M.flipping_curve(ex, x, e, steps=16, baseline="zero", batch_size=8)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    feats = M._Features(0, (1, 8, 8), "pixel", 1)
    fn = M._scores_fn(ex.plan, feats, "logit", "flip")
    before = fn._cache_size()
    M.flipping_curve(ex, x, e, steps=16, baseline=0.5, batch_size=8, order="lerf")
    assert fn._cache_size() == before


def test_padded_tokens_never_flipped(text):
    """Token flipping with a token id baseline: the MoRF/LeRF order covers the real tokens only.
    The model reads padded positions (weight 0.5), so flipping one would change the score."""
    model, inputs, ex, e = text
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"]
    rel = e.relevance["input_ids"]
    assert rel.shape == (3, 7)
    valid = mask.numpy() != 0
    for order in ("morf", "lerf"):
        curve = M.flipping_curve(ex, inputs, e, order=order, baseline=3, steps=7)
        ref = ref_flipping(model, ids, feature_relevance(rel, "element"), e.target, order, 7,
                           np.full_like(ids, 3), valid=valid, extra={"attention_mask": mask})
        close(curve, ref)
    # the final step: every real token replaced, the padding untouched
    final = ids.copy()
    final[valid] = 3
    close(curve[:, -1], torch_scores(model, torch.as_tensor(final), e.target,
                                     attention_mask=mask))
    flipped_pads = ids.copy()
    flipped_pads[:] = 3
    assert np.abs(torch_scores(model, torch.as_tensor(flipped_pads), e.target,
                               attention_mask=mask) - curve[:, -1])[1:].min() > 1e-4


# ------------------------------------------------------------------------------------------------
# AOPC, ABPC
# ------------------------------------------------------------------------------------------------
def test_aopc_abpc_hand_made_curves():
    morf = np.array([[1.0, 0.5, 0.25, 0.0], [2.0, 2.0, 1.0, 0.0]])
    lerf = np.array([[1.0, 1.0, 0.9, 0.8], [2.0, 2.0, 2.0, 1.0]])
    np.testing.assert_allclose(M.aopc(morf), [(0 + 0.5 + 0.75 + 1.0) / 4, (0 + 0 + 1 + 2) / 4])
    np.testing.assert_allclose(M.aopc(lerf), [(0 + 0 + 0.1 + 0.2) / 4, 1 / 4])
    np.testing.assert_allclose(M.abpc(morf, lerf),
                               [(0 + 0.5 + 0.65 + 0.8) / 4, (0 + 0 + 1 + 1) / 4])
    np.testing.assert_allclose(M.abpc(morf, lerf), M.aopc(morf) - M.aopc(lerf))
    np.testing.assert_allclose(M.aopc(morf[0]), M.aopc(morf)[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        M.abpc(morf, lerf[:, :3])


def test_aopc_of_a_faithful_explanation(mlp):
    """Gradient x input on an MLP: MoRF drops more than LeRF (a sanity check on real curves)."""
    model, x, ex, e = mlp
    morf = M.flipping_curve(ex, x, e, order="morf", baseline="zero")
    lerf = M.flipping_curve(ex, x, e, order="lerf", baseline="zero")
    assert M.abpc(morf, lerf).mean() > 0


# ------------------------------------------------------------------------------------------------
# faithfulness correlation
# ------------------------------------------------------------------------------------------------
def test_random_subsets_seeded_and_valid():
    valid = np.ones((3, 10), bool)
    valid[1, 6:] = False
    a = M.random_subsets(valid, 50, 4, seed=1)
    np.testing.assert_array_equal(a, M.random_subsets(valid, 50, 4, seed=1))
    assert not np.array_equal(a, M.random_subsets(valid, 50, 4, seed=2))
    assert a.shape == (3, 50, 4)
    assert all(len(set(s)) == 4 for s in a.reshape(-1, 4))
    assert a[1].max() < 6 and a[0].max() == 9
    # every feature is drawn about equally often (uniform subsets)
    counts = np.bincount(M.random_subsets(np.ones((1, 10), bool), 2000, 3, 0).ravel(), minlength=10)
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600


@pytest.mark.parametrize("which,baseline", [("mlp", "zero"), ("cnn", "mean"), ("text", 0)])
def test_faithfulness_correlation_equals_loop(which, baseline, request):
    model, x, ex, e = request.getfixturevalue(which)
    name = "input_ids" if which == "text" else "x"
    rel = np.asarray(e.relevance[name], np.float64)
    n = len(e.target)
    kind = "pixel" if which == "cnn" else "element"
    feat = np.asarray(feature_relevance(rel, kind))
    valid = (x["attention_mask"].numpy() != 0) if which == "text" else np.ones(feat.shape, bool)
    k = 2
    got = M.faithfulness_correlation(ex, x, e, subset_size=k, samples=12, baseline=baseline,
                                     seed=5)
    subsets = M.random_subsets(valid, 12, k, seed=5)
    xin = (x["input_ids"] if which == "text" else x).numpy()
    extra = {"attention_mask": x["attention_mask"]} if which == "text" else {}
    ref = []
    for r in range(n):
        b = np.full_like(xin[r], xin[r].mean()) if baseline == "mean" else \
            np.full_like(xin[r], 0 if baseline == "zero" else baseline)
        kw = {a: v[r:r + 1] for a, v in extra.items()}
        f0 = torch_scores(model, torch.as_tensor(xin[r:r + 1]), [e.target[r]], **kw)[0]
        drops, sums = [], []
        for s in subsets[r]:
            assert valid[r][s].all()
            xp = xin[r].copy()
            flat = xp.reshape(xp.shape[0], -1) if kind == "pixel" else xp.reshape(-1)
            bflat = b.reshape(flat.shape)
            if kind == "pixel":
                flat[:, s] = bflat[:, s]
            else:
                flat[s] = bflat[s]
            drops.append(f0 - torch_scores(model, torch.as_tensor(xp[None]), [e.target[r]],
                                           **kw)[0])
            sums.append(feat[r][s].sum())
        ref.append(np.corrcoef(sums, drops)[0, 1])
    close(got, np.asarray(ref), 1e-4)
    # reproducible bit for bit; another seed draws other subsets
    again = M.faithfulness_correlation(ex, x, e, subset_size=k, samples=12, baseline=baseline,
                                       seed=5)
    np.testing.assert_array_equal(got, again)
    other = M.faithfulness_correlation(ex, x, e, subset_size=k, samples=12, baseline=baseline,
                                       seed=6)
    assert not np.array_equal(got, other)


# ------------------------------------------------------------------------------------------------
# Quantus on the same inputs
# ------------------------------------------------------------------------------------------------
quantus = pytest.importorskip("quantus", reason="quantus is not installed (test extra)")


@pytest.mark.parametrize("softmax", [False, True])
def test_pixel_flipping_equals_quantus(cnn, softmax):
    """One-channel 8 x 8 images: Quantus' features are this module's pixels; 4 pixels per step
    (16 steps), constant baseline 0, no normalisation. Quantus returns steps 1..16."""
    model, x, ex, e = cnn
    rel = np.asarray(e.relevance["x"], np.float32)
    metric = quantus.PixelFlipping(features_in_step=4, perturb_baseline=0.0, normalise=False,
                                   abs=False, disable_warnings=True)
    q = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=e.target, a_batch=rel,
                          device="cpu", softmax=softmax), np.float64)
    ours = M.flipping_curve(ex, x, e, steps=16, baseline=0.0,
                            score="probability" if softmax else "logit")
    assert q.shape == (4, 16)
    close(ours[:, 1:], q)


def test_faithfulness_correlation_equals_quantus(cnn, monkeypatch):
    """Quantus draws its subsets with np.random.choice, one call per row and run: record them and
    give the same subsets to dlbjax; constant baseline 0; normalise=True (Quantus' default,
    division by max |R|) leaves a Pearson correlation unchanged."""
    model, x, ex, e = cnn
    rel = np.asarray(e.relevance["x"], np.float32)
    runs, k, n = 10, 6, len(x)
    drawn = []
    choice = np.random.choice

    def recording(*args, **kwargs):
        out = choice(*args, **kwargs)
        drawn.append(np.asarray(out))
        return out

    monkeypatch.setattr(np.random, "choice", recording)
    np.random.seed(0)
    metric = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=k, perturb_baseline=0.0,
                                             return_aggregate=False, disable_warnings=True)
    q = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=e.target, a_batch=rel,
                          device="cpu", softmax=False), np.float64)
    monkeypatch.undo()
    assert len(drawn) == runs * n
    subsets = np.stack(drawn).reshape(runs, n, k).transpose(1, 0, 2)
    ours = M.faithfulness_correlation(ex, x, e, subsets=subsets, baseline=0.0)
    close(ours, q, 1e-4)


# ------------------------------------------------------------------------------------------------
# max-sensitivity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["fro", "linf"])
def test_max_sensitivity_equals_torch_loop(mlp, norm):
    """The same seeded uniform noise; the reference re-explains every perturbed row with torch
    autograd (gradient x input at the unperturbed row's target)."""
    model, x, ex, e = mlp
    samples, radius, seed = 6, 0.3, 11
    got = M.max_sensitivity(ex, x, radius=radius, samples=samples, seed=seed, norm=norm)
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-radius, radius, (len(x), samples, 8))
    t = e.target
    r0 = torch_gxi(model, x, t)
    ref = []
    for r in range(len(x)):
        worst = 0.0
        for j in range(samples):
            xp = torch.as_tensor((x[r].numpy().astype(np.float64) + noise[r, j])
                                 .astype(np.float32))[None]
            rp = torch_gxi(model, xp, [t[r]])[0]
            d = rp - r0[r]
            num = np.sqrt((d.astype(np.float64) ** 2).sum()) if norm == "fro" else np.abs(d).max()
            den = np.sqrt((r0[r].astype(np.float64) ** 2).sum()) if norm == "fro" \
                else np.abs(r0[r]).max()
            worst = max(worst, num / den)
        ref.append(worst)
    close(got, np.asarray(ref), 1e-4)
    np.testing.assert_array_equal(
        got, M.max_sensitivity(ex, x, radius=radius, samples=samples, seed=seed, norm=norm))
    assert not np.array_equal(
        got, M.max_sensitivity(ex, x, radius=radius, samples=samples, seed=seed + 1, norm=norm))
    # radius 0: the explanation of x itself, sensitivity 0
    np.testing.assert_allclose(M.max_sensitivity(ex, x, radius=0.0, samples=2), 0.0, atol=1e-6)


def test_max_sensitivity_equals_quantus(mlp, monkeypatch):
    """Quantus MaxSensitivity (uniform noise of lower_bound = radius, Frobenius norms, no
    normalisation, NaN-on-changed-prediction off) with torch gradient x input as its explain_func;
    its noise is recorded and given to dlbjax as ``perturbations``."""
    model, x, ex, e = mlp
    samples, radius = 4, 0.3
    drawn = []
    uniform = np.random.uniform

    def recording(*args, **kwargs):
        out = uniform(*args, **kwargs)
        drawn.append(np.asarray(out))
        return out

    def explain(model, inputs, targets, **kw):
        return torch_gxi(model, torch.as_tensor(np.asarray(inputs, np.float32)), targets)

    monkeypatch.setattr(np.random, "uniform", recording)
    np.random.seed(1)
    metric = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius, normalise=False,
                                    abs=False, return_aggregate=False, disable_warnings=True)
    q = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=e.target,
                          a_batch=np.asarray(e.relevance["x"]), explain_func=explain,
                          device="cpu"), np.float64)
    monkeypatch.undo()
    assert len(drawn) == samples and drawn[0].shape == (5, 8)
    noise = np.stack(drawn, 1)                                   # [rows, samples, 8]
    ours = M.max_sensitivity(ex, x, perturbations=noise)
    close(ours, q, 1e-4)


# ------------------------------------------------------------------------------------------------
# model-parameter randomisation
# ------------------------------------------------------------------------------------------------
def _draw_ref(value, rng):
    v = np.asarray(value, np.float64)
    scale = v.std() or np.sqrt((v * v).mean()) or 1.0
    return rng.normal(0.0, scale, v.shape)


@pytest.mark.parametrize("cascading", [True, False])
def test_randomisation_equals_torch_loop(mlp, cascading):
    model, x, ex, e = mlp
    consts_before = {k: np.asarray(v).copy() for k, v in ex.constants.items()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    ex(x)
    traces = ex.trace_count
    got = M.randomisation(ex, x, cascading=cascading, seed=3)
    assert list(got) == ["net.4", "net.2", "net.0"]           # top-down
    # the reference: a torch copy randomised with the same draws, torch autograd, scipy spearman
    rng = np.random.default_rng(3)
    r0 = torch_gxi(model, x, e.target)
    work = copy.deepcopy(model)
    for layer in ["net.4", "net.2", "net.0"]:
        if not cascading:
            work = copy.deepcopy(model)
        mod = work.get_submodule(layer)
        with torch.no_grad():
            for pname in ("weight", "bias"):
                p = getattr(mod, pname)
                p.copy_(torch.as_tensor(_draw_ref(p.detach().numpy(), rng), dtype=p.dtype))
        r = torch_gxi(work, x, e.target)
        ref = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(r0, r)]
        close(got[layer], ref, 1e-4)
    # the Explainer, its constants and the torch model are unchanged; nothing recompiled
    assert ex.trace_count == traces
    for k, v in ex.constants.items():
        np.testing.assert_array_equal(np.asarray(v), consts_before[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k])
    assert ex(x) == e
    # reproducible
    again = M.randomisation(ex, x, cascading=cascading, seed=3)
    for k in got:
        np.testing.assert_array_equal(got[k], again[k])


def test_randomisation_identity_and_decrease(cnn):
    """An identity draw keeps every map: similarity 1 for every layer and measure. Randomising a
    DLB explanation's weights cascading from the top lowers the similarity."""
    model, x, ex, e = cnn
    same = M.randomisation(ex, x, draw=lambda name, value, rng: value)
    assert list(same) == ["fc2", "fc1", "conv"]
    for v in same.values():
        np.testing.assert_allclose(v, 1.0, atol=1e-9)
    for sim in ("pearson", "cosine", "ssim"):
        for v in M.randomisation(ex, x, similarity=sim, layers=["fc2"],
                                 draw=lambda n, v, r: v).values():
            np.testing.assert_allclose(v, 1.0, atol=1e-6)
    rand = M.randomisation(ex, x, seed=0, absolute=True)
    assert np.all(rand["fc2"] > rand["fc1"]) and np.all(rand["fc1"] > rand["conv"])
    assert np.mean(rand["conv"]) < 0.9
    bottom = M.randomisation(ex, x, order="bottom-up", layers=["conv", "fc1"], seed=0)
    assert list(bottom) == ["conv", "fc1"]


def test_similarity_measures():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    np.testing.assert_allclose(M.similarity(a, b, "pearson"),
                               [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)])
    np.testing.assert_allclose(M.similarity(a, b, "spearman"),
                               [scipy.stats.spearmanr(x.ravel(), y.ravel()).statistic
                                for x, y in zip(a, b)])
    np.testing.assert_allclose(M.similarity(a, 2 * a, "cosine"), 1.0)
    # ssim: Quantus' definition (skimage, data range of the pair) on 8 x 8 maps
    a, b = rng.normal(size=(3, 8, 8)), rng.normal(size=(3, 8, 8))
    np.testing.assert_allclose(M.similarity(a, b, "ssim"),
                               quantus.similarity_func.ssim(a, b, batched=True), rtol=1e-10)
    np.testing.assert_allclose(M.similarity(a[:, None], b[:, None], "ssim"),
                               M.similarity(a, b, "ssim"))


# ------------------------------------------------------------------------------------------------
# sparseness, complexity
# ------------------------------------------------------------------------------------------------
def test_sparseness_and_complexity_equal_loops(cnn, text):
    _, _, _, e = cnn
    rel = np.asarray(e.relevance["x"], np.float64)
    gini, ent = [], []
    for r in rel:
        a = np.abs(r.ravel()) + 1e-7
        n = len(a)
        # Gini = sum_i sum_j |a_i - a_j| / (2 n sum a)
        gini.append(sum(abs(ai - aj) for ai in a for aj in a) / (2 * n * a.sum()))
        p = np.abs(r.ravel()) / np.abs(r).sum()
        ent.append(-sum(pi * np.log(pi) for pi in p if pi > 0))
    close(M.sparseness(e), gini, 1e-9)
    close(M.complexity(e), ent, 1e-9)
    close(M.sparseness(rel), gini, 1e-9)
    # a one-hot map is as sparse and as simple as it gets; a constant one the opposite
    onehot = np.zeros((1, 50))
    onehot[0, 7] = 3.0
    assert M.sparseness(onehot)[0] > 0.97 and M.complexity(onehot)[0] == 0.0
    flat = np.ones((1, 50))
    assert abs(M.sparseness(flat)[0]) < 1e-9
    np.testing.assert_allclose(M.complexity(flat), np.log(50))
    # tokens: the mask keeps the real tokens only
    _, inputs, _, et = text
    mask = inputs["attention_mask"].numpy()
    rt = np.asarray(et.relevance["input_ids"], np.float64)
    c = M.complexity(et, input="input_ids", mask=mask)
    real = np.abs(rt[2, :3]) / np.abs(rt[2, :3]).sum()
    np.testing.assert_allclose(c[2], -(real * np.log(real)).sum())
    # an Explanation's own attention mask is the default; a plain array has none
    np.testing.assert_array_equal(M.complexity(et), c)
    a = np.sort(np.abs(rt[1, :5]) + 1e-7)
    k = np.arange(1, 6)
    np.testing.assert_allclose(M.sparseness(et)[1], ((2 * k - 6) * a).sum() / (5 * a.sum()))
    assert M.sparseness(rt)[1] != M.sparseness(et)[1]


def test_sparseness_and_complexity_equal_quantus(cnn):
    model, x, _, e = cnn
    rel = np.asarray(e.relevance["x"], np.float32)
    kw = dict(model=model, x_batch=x.numpy(), y_batch=e.target, a_batch=rel, device="cpu")
    qs = quantus.Sparseness(normalise=False, disable_warnings=True)(**kw)
    qc = quantus.Complexity(normalise=False, disable_warnings=True)(**kw)
    close(M.sparseness(rel), qs, 1e-5)
    close(M.complexity(rel), qc, 1e-5)


# ------------------------------------------------------------------------------------------------
# typed errors
# ------------------------------------------------------------------------------------------------
def test_errors(mlp, text, rgb):
    model, x, ex, e = mlp
    with pytest.raises(ValueError, match="order must be one of"):
        M.flipping_curve(ex, x, e, order="random")
    with pytest.raises(ValueError, match="score must be one of"):
        M.flipping_curve(ex, x, e, score="log-probability")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        M.flipping_curve(ex, x, e, steps=0)
    with pytest.raises(ValueError, match="patch= needs an image input"):
        M.flipping_curve(ex, x, e, patch=2)
    with pytest.raises(ValueError, match="unknown baseline"):
        M.flipping_curve(ex, x, e, baseline="noise")
    with pytest.raises(ValueError, match="'blur' needs an image"):
        M.flipping_curve(ex, x, e, baseline="blur")
    with pytest.raises(ValueError, match="does not broadcast"):
        M.flipping_curve(ex, x, e, baseline=np.zeros(3))
    with pytest.raises(TargetError, match="outside the explained output"):
        M.flipping_curve(ex, x, e, target=7)
    with pytest.raises(InputMismatchError, match="does not match"):
        M.flipping_curve(ex, x, np.zeros((5, 4)))
    with pytest.raises(InputMismatchError, match="no input 'y'"):
        M.flipping_curve(ex, x, e, input="y")
    with pytest.raises(ValueError, match="subset_size must be an int in 1..8"):
        M.faithfulness_correlation(ex, x, e, subset_size=9)
    # the default subset size: a tenth of the 8 features, at least 1
    np.testing.assert_array_equal(M.faithfulness_correlation(ex, x, e, samples=5),
                                  M.faithfulness_correlation(ex, x, e, subset_size=1, samples=5))
    with pytest.raises(ValueError, match="subsets must be feature indices"):
        M.faithfulness_correlation(ex, x, e, subsets=np.full((5, 3, 2), 8))
    with pytest.raises(ValueError, match="norm must be one of"):
        M.max_sensitivity(ex, x, norm="l3")
    with pytest.raises(ValueError, match="similarity must be one of"):
        M.randomisation(ex, x, similarity="kendall")
    with pytest.raises(ValueError, match="unknown layers"):
        M.randomisation(ex, x, layers=["net.9"])
    with pytest.raises(TypeError, match="expected a dlbjax.Explainer"):
        M.flipping_curve(model, x, e)
    with pytest.raises(ValueError, match="perturbations must have shape"):
        M.max_sensitivity(ex, x, perturbations=np.zeros((5, 2, 7)))
    one = dlbjax.Explainer(model, x[0], batch_axis=None, method="gradient")
    with pytest.raises(MethodError, match="batch_axis=0"):
        M.flipping_curve(one, x[0], one(x[0]))
    _, rx, rex, re_ = rgb
    with pytest.raises(ValueError, match="does not divide"):
        M.region_perturbation(rex, rx, re_, patch=3)
    _, inputs, tex, te = text
    with pytest.raises(ValueError, match="token ids are replaced by a token id"):
        M.flipping_curve(tex, inputs, te, baseline="mean")
    with pytest.raises(MethodError, match="token ids"):
        M.max_sensitivity(tex, inputs)
    with pytest.raises(ValueError, match="subset_size must be an int in 1..3"):
        M.faithfulness_correlation(tex, inputs, te, subset_size=4, baseline=0)


# ------------------------------------------------------------------------------------------------
# contrastive relevance, a tiny BERT
# ------------------------------------------------------------------------------------------------
def test_contrastive_streams_use_positive_minus_negative(mlp):
    model, x, ex, _ = mlp
    dlb = dlbjax.Explainer(model, x, mode="contrastive")
    ec = dlb(x)
    net = ec.relevance["x"].positive - ec.relevance["x"].negative
    a = M.flipping_curve(dlb, x, ec, steps=4, baseline="zero")
    b = M.flipping_curve(dlb, x, {"x": net}, target=ec.target, steps=4, baseline="zero")
    np.testing.assert_array_equal(a, b)
    close(M.sparseness(ec), M.sparseness(net), 1e-6)


def test_bert_token_flipping_with_mask_token():
    """A tiny random BERT: flipping tokens to [MASK] (id 4 here) in relevance order equals a
    loop of the Hugging Face model; padded positions stay [PAD] (id 0)."""
    hf_zoo = pytest.importorskip("hf_zoo")
    model = hf_zoo.tiny("bert").eval()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(5, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    ex = dlbjax.Explainer(model, inputs, method="gradient-x-input")
    e = ex(inputs)
    curve = M.flipping_curve(ex, inputs, e, baseline=4, steps=6)

    class Logits(nn.Module):
        def forward(self, input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    ref = ref_flipping(Logits(), ids.numpy(), feature_relevance(e.relevance["input_ids"],
                                                                 "element"),
                       e.target, "morf", 6, np.full_like(ids.numpy(), 4),
                       valid=mask.numpy() != 0, extra={"attention_mask": mask})
    close(curve, ref, 1e-4)


def test_binary_and_regression_scores():
    """One logit: 'probability' is its sigmoid; a regression explanation (target -1) scores the
    mean of the outputs."""
    binary = seeded(MLP((6, 8, 1)), 10).eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(11))
    ex = dlbjax.Explainer(binary, x, method="gradient-x-input", task="binary")
    e = ex(x)
    got = M.flipping_curve(ex, x, e, steps=3, baseline="zero", score="probability")
    rel = feature_relevance(e.relevance["x"], "element")
    sig = seeded(nn.Sequential(binary, nn.Sigmoid()), 0)
    ref = ref_flipping(sig, x.numpy(), rel, [0] * 3, "morf", 3, np.zeros((3, 6), np.float32))
    close(got, ref)
    reg = seeded(MLP((6, 8, 2)), 12).eval()
    exr = dlbjax.Explainer(reg, x, method="gradient-x-input", task="regression")
    er = exr(x)
    assert (er.target == -1).all()
    got = M.flipping_curve(exr, x, er, steps=3, baseline="zero")

    class Mean(nn.Module):
        def forward(self, v):
            return reg(v).mean(1, keepdim=True)

    ref = ref_flipping(Mean(), x.numpy(), feature_relevance(er.relevance["x"], "element"),
                       [0] * 3, "morf", 3, np.zeros((3, 6), np.float32))
    close(got, ref)
    # re-explaining metrics keep the regression target (a selection of outputs, not classes)
    np.testing.assert_allclose(M.max_sensitivity(exr, x, radius=0.0, samples=2), 0.0, atol=1e-6)
    same = M.randomisation(exr, x, draw=lambda n, v, r: v)
    assert all(np.allclose(v, 1.0) for v in same.values())
