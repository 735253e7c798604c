"""Tasks of the original DLBacktrace: binary segmentation and bounding-box regression (spec §1.3
canonical seeding): which outputs are seeded, with how much, thresholding, contrastive mode,
conservation, non-negativity, batch == loop, and a per-unit reference for a one-conv map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from reference import conv_contrastive, conv_default

M = 100.0


class TinyUNet(nn.Module):
    """conv down, max pool, conv, transposed-conv upsample, skip concat, 1-channel logit map."""

    def __init__(self, bias: bool = True, sigmoid: bool = False):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, padding=1, bias=bias)
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(4, 8, 3, padding=1, bias=bias)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, bias=bias)
        self.out = nn.Conv2d(8, 1, 1, bias=bias)
        self.sigmoid = sigmoid

    def forward(self, x):
        a = torch.relu(self.down(x))
        b = torch.relu(self.mid(self.pool(a)))
        u = torch.relu(self.up(b))
        y = self.out(torch.cat([a, u], dim=1))  # [N, 1, 16, 16] logits
        return torch.sigmoid(y) if self.sigmoid else y


class BoxCNN(nn.Module):
    """A box-regression CNN: 4 coordinates per image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _seed_layer(e, name="out/"):
    keys = [k for k in e.layers if k.startswith(name)]
    assert len(keys) == 1, keys
    return e.layers[keys[0]]


def _ref_seed(prob, theta, region=None):
    sel = prob > theta
    if region is not None:
        sel &= region
    k = sel.reshape(len(sel), -1).sum(1).reshape((-1,) + (1,) * (sel.ndim - 1))
    return np.where(sel, M / np.maximum(k, 1), 0.0), sel


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return TinyUNet().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def seg_explainer(unet, x):
    return dlbjax.Explainer(unet, x[:1], task="binary-segmentation", layers=True)


def test_segmentation_seeds_only_pixels_above_threshold(unet, x, seg_explainer):
    e = seg_explainer(x)
    assert e.task == "segmentation"
    prob = torch.sigmoid(unet(x)).detach().numpy()
    ref, sel = _ref_seed(prob, 0.5)
    assert sel.any(axis=(1, 2, 3)).all() and not sel.all()
    seed = _seed_layer(e)
    assert seed.shape == prob.shape
    np.testing.assert_allclose(seed, ref, rtol=1e-5, atol=1e-6)
    assert np.all(seed[~sel] == 0)
    np.testing.assert_allclose(seed.sum(axis=(1, 2, 3)), M, rtol=1e-5)
    np.testing.assert_allclose(e.conservation.seed, M, rtol=1e-5)
    # the budget closes and default-mode relevance is non-negative at every layer
    c = e.conservation
    np.testing.assert_allclose(c.seed, c.inputs + c.bias + c.lost, rtol=1e-5, atol=1e-4)
    for arr in e.layers.values():
        assert np.all(np.asarray(arr) >= 0) and np.all(np.isfinite(arr))


def test_thresholding_reaches_the_seed(unet, x):
    prob = torch.sigmoid(unet(x)).detach().numpy()
    theta = float(np.quantile(prob, 0.8))
    e = dlbjax.explain(unet, x, task="binary-segmentation", thresholding=theta, layers=True)
    ref, sel = _ref_seed(prob, theta)
    assert 0 < sel.sum() < 0.3 * sel.size
    np.testing.assert_allclose(_seed_layer(e), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.conservation.seed, M, rtol=1e-5)


def test_bias_free_segmentation_conserves(x):
    torch.manual_seed(2)
    model = TinyUNet(bias=False).eval()
    e = dlbjax.explain(model, x, task="segmentation")
    np.testing.assert_allclose(e.conservation.bias, 0.0, atol=1e-4)
    np.testing.assert_allclose(e.relevance["x"].sum(axis=(1, 2, 3)), M, rtol=1e-4)
    assert np.all(e.relevance["x"] >= 0)


def test_sigmoid_head_is_thresholded_as_probability(x):
    torch.manual_seed(0)
    model = TinyUNet(sigmoid=True).eval()
    e = dlbjax.explain(model, x, task="binary-segmentation", thresholding=0.6, layers=True)
    prob = model(x).detach().numpy()  # the graph ends in a sigmoid: no second sigmoid
    ref, sel = _ref_seed(prob, 0.6)
    assert sel.any()
    seed = [v for k, v in e.layers.items() if v.shape == prob.shape and k != "x"]
    assert any(np.allclose(s, ref, rtol=1e-5, atol=1e-6) for s in seed)
    # a row with no pixel above the threshold gets a zero seed, the others M, in the same call
    has = sel.any(axis=(1, 2, 3))
    assert has.any() and not has.all()
    np.testing.assert_allclose(e.conservation.seed, np.where(has, M, 0.0), rtol=1e-5)
    assert np.all(e.relevance["x"][~has] == 0)


def test_region_target_and_empty_selection(unet, x, seg_explainer):
    prob = torch.sigmoid(unet(x)).detach().numpy()
    region = np.zeros((1, 16, 16), bool)
    region[:, 4:12, 4:12] = True
    ref, sel = _ref_seed(prob, 0.5, region[None])
    e = seg_explainer(x, target=region)
    np.testing.assert_allclose(_seed_layer(e), ref, rtol=1e-5, atol=1e-6)
    idx = np.flatnonzero(region.reshape(-1))  # the same region as flat pixel indices
    e2 = seg_explainer(x, target=idx)
    np.testing.assert_array_equal(e2.relevance["x"], e.relevance["x"])
    # a threshold no pixel passes gives a zero seed, zero relevance and a zero conservation row
    e3 = dlbjax.explain(unet, x, task="binary-segmentation", thresholding=1.0)
    assert np.all(e3.relevance["x"] == 0) and np.all(e3.conservation.seed == 0)
    with pytest.raises(dlbjax.TargetError):
        seg_explainer(x, target=[300])
    with pytest.raises(dlbjax.TargetError):
        seg_explainer(x, target=np.ones((5, 5), bool))


def test_segmentation_batch_equals_loop(unet, x, seg_explainer):
    e = seg_explainer(x)
    b = seg_explainer.batch(x, batch_size=2)
    for i in range(len(x)):
        r = seg_explainer(x[i:i + 1])
        np.testing.assert_allclose(e.relevance["x"][i], r.relevance["x"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.relevance["x"][i], r.relevance["x"][0], rtol=1e-5, atol=1e-6)


def test_segmentation_contrastive(unet, x):
    e = dlbjax.explain(unet, x, task="binary-segmentation", mode="contrastive", layers=True)
    prob = torch.sigmoid(unet(x)).detach().numpy()
    ref, sel = _ref_seed(prob, 0.5)
    pos, neg = _seed_layer(e)
    np.testing.assert_allclose(pos, ref * prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(neg, ref * (1 - prob), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.conservation.seed.positive + e.conservation.seed.negative, M,
                               rtol=1e-5)
    for s in e.relevance["x"]:
        assert np.all(s >= 0)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_one_conv_map_matches_per_unit_reference(mode):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 1, 3, padding=1).eval()
    xs = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    e = dlbjax.explain(conv, xs, task="binary-segmentation", mode=mode, thresholding=0.4)
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    for i in range(len(xs)):
        xi = xs[i].double().numpy()
        prob = torch.sigmoid(conv(xs[i:i + 1])).detach().double().numpy()
        ref, _ = _ref_seed(prob, 0.4)
        args = ((1, 1), (1, 1), (1, 1), 1)
        if mode == "default":
            r, _ = conv_default(xi, w, b, ref[0], *args)
            np.testing.assert_allclose(e.relevance["input"][i], r, rtol=1e-4, atol=1e-5)
        else:
            rp, rn = conv_contrastive(xi, w, b, ref[0] * prob[0], ref[0] * (1 - prob[0]), *args)
            np.testing.assert_allclose(e.relevance["input"].positive[i], rp, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(e.relevance["input"].negative[i], rn, rtol=1e-4, atol=1e-5)


# ---- bounding-box regression ------------------------------------------------------------------
@pytest.fixture(scope="module")
def box():
    torch.manual_seed(5)
    model = BoxCNN().eval()
    xs = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    return model, xs, dlbjax.Explainer(model, xs[:1], task="bbox-regression", layers=True)


def test_bbox_seeds_chosen_coordinates(box):
    model, xs, ex = box
    e = ex(xs)
    assert e.task == "regression"
    np.testing.assert_allclose(_seed_layer(e, "fc2/"), np.full((3, 4), M / 4), rtol=1e-6)
    e2 = ex(xs, target=[0, 2])
    np.testing.assert_allclose(_seed_layer(e2, "fc2/"), np.tile([M / 2, 0, M / 2, 0], (3, 1)),
                               rtol=1e-6)
    for r in (e, e2):
        np.testing.assert_allclose(r.conservation.seed, M, rtol=1e-5)
        c = r.conservation
        np.testing.assert_allclose(c.seed, c.inputs + c.bias + c.lost, rtol=1e-5, atol=1e-4)
        assert np.all(r.relevance["x"] >= 0)
    # linearity (spec §7.2.3): seeding all four = the mean of the single-coordinate explanations
    single = np.mean([ex(xs, target=k).relevance["x"] for k in range(4)], axis=0)
    np.testing.assert_allclose(e.relevance["x"], single, rtol=1e-4, atol=1e-5)
    # batch == loop
    b = ex.batch(xs, target=[1, 3], batch_size=2)
    for i in range(len(xs)):
        r = ex(xs[i:i + 1], target=[1, 3])
        np.testing.assert_allclose(b.relevance["x"][i], r.relevance["x"][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(dlbjax.TargetError):
        ex(xs, target=[4])


def test_bbox_contrastive_is_refused(box):
    model, xs, _ = box
    with pytest.raises(dlbjax.TargetError):
        dlbjax.explain(model, xs, task="bbox-regression", mode="contrastive")
