"""Relevance at learned tensors and constants is reported, not lost (``conservation.params`` and
``Explanation.constants``).

* A learned token concatenated into the stream gets exactly the relevance it gets when the same
  tensor is passed as a second input instead (the rule does not care whether an operand is a
  parameter), in both modes; so do a learned tensor selected by ``where`` and written with
  ``slice_scatter``. A constant padding value is booked under the fill key.
* HF ViT with a random class token: ``lost`` ~ 0 in both modes, the class token named with its
  parameter path; with the class token zeroed it receives nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dlbjax
import hf_zoo
from dlbjax.engine.origins import FILL


class TokenNet(nn.Module):
    """cat([token, x]) -> where(mask, ., fill) -> pad with 1.0 -> linear -> relu -> linear.
    ``as_input``: the token and the fill tensor are inputs instead of parameters."""

    def __init__(self, as_input: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.as_input = as_input
        if not as_input:
            self.token = nn.Parameter(torch.randn(1, 1, 4, generator=g))
            self.fill = nn.Parameter(torch.randn(4, generator=g))
        else:
            torch.randn(1, 1, 4, generator=g), torch.randn(4, generator=g)
        self.register_buffer("mask", torch.rand(6, 4, generator=g) > 0.3)
        self.a = nn.Linear(4, 8, bias=False)
        self.b = nn.Linear(8 * 7, 3, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(8, 4, generator=g))
            self.b.weight.copy_(torch.randn(3, 56, generator=g))

    def forward(self, x, token=None, fill=None):
        token = self.token if token is None else token
        fill = self.fill if fill is None else fill
        h = torch.cat([token.expand(x.shape[0], 1, 4), x], dim=1)          # [B, 6, 4]
        h = torch.where(self.mask, h, fill)
        h = F.pad(h, (0, 0, 0, 1), value=1.0)                                # [B, 7, 4]
        h = torch.relu(self.a(h))
        return self.b(h.flatten(1))


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_learned_tensors_get_what_they_get_as_inputs(mode):
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    with_params = TokenNet(as_input=False).eval()
    as_inputs = TokenNet(as_input=True).eval()
    token = with_params.token.detach().clone().expand(3, 1, 4).contiguous()
    fill = with_params.fill.detach().clone().expand(3, 4).contiguous()
    ep = dlbjax.explain(with_params, x, mode=mode)
    ei = dlbjax.explain(as_inputs, {"x": x, "token": token, "fill": fill}, mode=mode)
    np.testing.assert_allclose(ep.prediction, ei.prediction, rtol=1e-6)
    assert set(ep.constants) == {"token", "fill", FILL}

    def streams(v):
        return (v.positive, v.negative) if isinstance(v, dlbjax.Streams) else (v,)

    for name in ("token", "fill"):
        want = [np.asarray(r).reshape(3, -1).sum(1) for r in streams(ei.relevance[name])]
        for got, w in zip(streams(ep.constants[name]), want):
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
            assert np.abs(w).max() > 1e-3  # the check is not vacuous
    for got, want in zip(streams(ep.relevance["x"]), streams(ei.relevance["x"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    c = ep.conservation
    for k, (s, i, b, p, l) in enumerate(zip(streams(c.seed), streams(c.inputs), streams(c.bias),
                                            streams(c.params), streams(c.lost))):
        np.testing.assert_allclose(s, i + b + p + l, rtol=1e-5)
        np.testing.assert_allclose(p, sum(streams(v)[k] for v in ep.constants.values()),
                                   rtol=1e-5)
        # the padded row of ones feeds the first layer: it takes a real share
        assert np.abs(streams(ep.constants[FILL])[k]).min() > 1e-3
        assert np.abs(l).max() <= 1e-4 * np.abs(s).max()


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_vit_class_token_is_reported_not_lost(mode):
    model = hf_zoo.tiny("vit")
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    x = hf_zoo.inputs("vit")
    e = dlbjax.explain(model, x, mode=mode)
    c = e.conservation
    seeds = (c.seed.positive, c.seed.negative) if mode == "contrastive" else (c.seed,)
    losts = (c.lost.positive, c.lost.negative) if mode == "contrastive" else (c.lost,)
    for s, l in zip(seeds, losts):
        assert np.abs(l).max() <= 1e-3 * np.abs(s).max()
    cls = e.constants["vit.embeddings.cls_token"]
    cls = cls.positive + cls.negative if mode == "contrastive" else cls
    assert (cls > 1.0).all()  # a random class token takes a visible share
    with torch.no_grad():
        model.vit.embeddings.cls_token.zero_()
    z = dlbjax.explain(model, x, mode=mode)
    zc = z.constants.get("vit.embeddings.cls_token")
    zc = zc.positive + zc.negative if mode == "contrastive" else zc
    np.testing.assert_allclose(zc, 0.0, atol=1e-5)
