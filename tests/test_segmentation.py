"""Interpolation and pixel shuffle inside whole models, and the segmentation task end to end.

* Small encoder-decoder networks built around each interpolation mode (``F.interpolate`` linear,
  bilinear, bicubic, trilinear, nearest, nearest-exact, antialiased; ``pixel_shuffle`` /
  ``pixel_unshuffle``): the JAX forward equals torch; without biases the default-mode relevance at
  the input equals the seed (interpolation is a conserving fixed linear map) and nothing is lost in
  either mode; a batch equals one call per row.
* torchvision's FCN, LRASPP and DeepLabV3 (seeded random weights, 3 classes): ``task=
  "segmentation"`` with ``output="out"`` and a class region explains in both modes with the forward
  equal to torch and ``lost`` ~ 0.

The rules themselves are checked op by op against the dense rule of torch's interpolation matrix
in ``test_rules.py`` (default and contrastive).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import segmentation as tv_seg

import dlbjax
from conftest import randomize_bn


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _totals(c, field):
    v = getattr(c, field)
    return (np.asarray(v.positive), np.asarray(v.negative)) if isinstance(v, dlbjax.Streams) \
        else (np.asarray(v),)


class UpNet(nn.Module):
    """conv -> relu -> pixel_unshuffle -> conv -> relu -> interpolate -> conv -> pixel_shuffle,
    bias-free, 2-d (or 1-d / 3-d with ``nd``)."""

    def __init__(self, interp: dict, nd: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.nd, self.interp = nd, interp
        self.a = conv(2, 4, 3, padding=1, bias=False)
        self.b = conv(16 if nd == 2 else 4, 8, 3, padding=1, bias=False)
        self.c = conv(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.nd == 2:
            h = F.pixel_unshuffle(h, 2)
        h = torch.relu(self.b(h))
        h = F.interpolate(h, **self.interp)
        h = self.c(h)
        if self.nd == 2:
            h = F.pixel_shuffle(h, 2)
        return h


INTERP = {
    "bilinear": (dict(scale_factor=2, mode="bilinear"), 2),
    "bilinear-align": (dict(size=(7, 9), mode="bilinear", align_corners=True), 2),
    "bicubic": (dict(scale_factor=1.5, mode="bicubic"), 2),
    "bilinear-antialias": (dict(size=(3, 3), mode="bilinear", antialias=True), 2),
    "nearest": (dict(scale_factor=2, mode="nearest"), 2),
    "nearest-exact": (dict(size=(5, 7), mode="nearest-exact"), 2),
    "linear-1d": (dict(size=13, mode="linear"), 1),
    "trilinear-3d": (dict(scale_factor=(2, 1.5, 2), mode="trilinear"), 3),
}
SHAPES = {1: (3, 2, 8), 2: (3, 2, 8, 8), 3: (2, 2, 3, 4, 4)}


@pytest.mark.parametrize("name", list(INTERP))
def test_interpolating_networks_conserve_and_match_torch(name):
    interp, nd = INTERP[name]
    torch.manual_seed(0)
    model = UpNet(interp, nd).eval()
    x = torch.randn(SHAPES[nd], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    ex = dlbjax.Explainer(model, x[:1], task="segmentation")
    target = np.zeros(ref.shape[1:], bool)
    target[::2] = True  # a region of the output row (every other channel)
    out = ex(x, target=target)
    assert _rel_err(out.prediction, ref) <= 1e-5
    R = np.asarray(out.relevance["x"])
    assert R.shape == tuple(x.shape) and np.isfinite(R).all()
    c = out.conservation
    np.testing.assert_allclose(_totals(c, "inputs")[0], _totals(c, "seed")[0], rtol=1e-4)
    assert np.abs(_totals(c, "lost")[0]).max() <= 1e-4 * np.abs(_totals(c, "seed")[0]).max()
    for b in range(x.shape[0]):  # the batch equals one call per row
        one = ex(x[b:b + 1], target=target)
        np.testing.assert_allclose(R[b:b + 1], np.asarray(one.relevance["x"]), rtol=1e-5,
                                   atol=1e-6)
    con = ex.replace(mode="contrastive")(x, target=target)
    for stream in _totals(con.conservation, "lost"):
        assert np.abs(stream).max() <= 1e-3 * np.abs(_totals(con.conservation, "seed")[0]).max()
    for stream in (con.relevance["x"].positive, con.relevance["x"].negative):
        assert np.isfinite(np.asarray(stream)).all()


SEGMENTATION = {
    "fcn_resnet50": lambda: tv_seg.fcn_resnet50(weights=None, weights_backbone=None,
                                                num_classes=3, aux_loss=True),
    "lraspp_mobilenet_v3_large": lambda: tv_seg.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3),
    "deeplabv3_mobilenet_v3_large": lambda: tv_seg.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False),
}


# Batch-norm statistics: as torchvision builds the model, and randomised (non-zero shifts). With
# randomised shifts, the MobileNetV3 models lose relevance by the spec's own rules: batch norm is an
# identity (§8.10), so a channel that a ReLU switched off entirely still receives relevance through
# the next block's batch-norm shift, and the depthwise convolution over that dead channel has D = 0
# and passes nothing (§8.12). Measured: LRASPP 52%, DeepLabV3 75% lost at 32x32; the ResNet-based
# FCN ~0. Those cases are not asserted to conserve; ``lost`` reports it.
CASES = [("fcn_resnet50", "randomised"), ("lraspp_mobilenet_v3_large", "fresh"),
         ("deeplabv3_mobilenet_v3_large", "fresh")]


@pytest.mark.parametrize("name,bn", CASES)
def test_torchvision_segmentation_models_explain(name, bn):
    torch.manual_seed(0)
    model = SEGMENTATION[name]()
    model = (randomize_bn(model) if bn == "randomised" else model).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)["out"].numpy()
    ex = dlbjax.Explainer(model, x[:1], task="segmentation", output="out")
    region = np.zeros(ref.shape[1:], bool)
    region[1] = True  # explain class 1's pixels
    for mode in ("default", "contrastive"):
        out = (ex if mode == "default" else ex.replace(mode="contrastive"))(x, target=region)
        assert _rel_err(out.prediction, ref) <= 1e-5
        c = out.conservation
        seed = _totals(c, "seed")
        assert sum(s.sum() for s in seed) > 0, "no pixel of class 1 passed the threshold"
        for lost, s in zip(_totals(c, "lost"), seed):
            assert np.abs(lost).max() <= 1e-3 * max(np.abs(s).max(), 1.0)
        (rel,) = out.relevance.values()
        for r in ((rel.positive, rel.negative) if mode == "contrastive" else (rel,)):
            r = np.asarray(r)
            assert r.shape == tuple(x.shape) and np.isfinite(r).all()
