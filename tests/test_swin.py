"""Shifted-window attention: torchvision ``swin_t`` / ``swin_v2_t`` and Hugging Face Swin / Swinv2
(seeded random weights) explain in both modes with the forward equal to torch and nothing lost.

What they need beyond a ViT: ``roll`` of the activations (an exact index map), the attention-mask
construction (``fmod``, ``copy``, ``slice_scatter`` on constants: forward only), the window
partition reshapes, and for v2 the cosine attention ``F.normalize(q) @ F.normalize(k)^T``, whose
norms are statistics (``linalg_vector_norm`` kept whole; no relevance through the denominator,
as for layer norm's variance, spec §9.4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
import transformers as tf

import dlbjax


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _hf(cls, cfg):
    return lambda: cls(cfg(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                           num_heads=[2, 4], window_size=4, num_labels=3))


MODELS = {
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=5), 32),
    "swin_v2_t": (lambda: torchvision.models.swin_v2_t(num_classes=5), 64),
    "hf-swin": (_hf(tf.SwinForImageClassification, tf.SwinConfig), 32),
    "hf-swinv2": (_hf(tf.Swinv2ForImageClassification, tf.Swinv2Config), 32),
}


def _streams(c, field):
    v = getattr(c, field)
    return (np.asarray(v.positive), np.asarray(v.negative)) if isinstance(v, dlbjax.Streams) \
        else (np.asarray(v),)


@pytest.mark.parametrize("name", list(MODELS))
def test_shifted_window_models_explain(name):
    ctor, size = MODELS[name]
    torch.manual_seed(0)
    model = ctor().eval()
    if name.startswith("hf-"):
        with torch.no_grad():  # non-zero biases, so bias shares are exercised
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.02)
    # torchvision's models keep their own init (zero biases): at 32x32 the stages' feature
    # maps (8x8 ... 1x1) are zero-padded to the 7x7 window, and with non-zero qkv biases the padded
    # tokens' values are pure bias, i.e. constants. Relevance that attention sends to them is kept
    # by the bias in default mode and lost in contrastive mode, where biases take no share (spec
    # §3.2): measured 30% of the positive stream for swin_t with biases ~ N(0, 0.02).
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    ref = (out.logits if hasattr(out, "logits") else out).numpy()
    ex = dlbjax.Explainer(model, x[:1])
    for mode in ("default", "contrastive"):
        e = (ex if mode == "default" else ex.replace(mode="contrastive"))(x)
        assert _rel_err(e.prediction, ref) <= 1e-5
        c = e.conservation
        for lost, seed in zip(_streams(c, "lost"), _streams(c, "seed")):
            assert np.abs(lost).max() <= 1e-3 * np.abs(seed).max()
        (rel,) = e.relevance.values()
        for r in ((rel.positive, rel.negative) if mode == "contrastive" else (rel,)):
            r = np.asarray(r)
            assert r.shape == tuple(x.shape) and np.isfinite(r).all() and np.abs(r).sum() > 0
        if mode == "default":
            one = ex(x[1:2])
            np.testing.assert_allclose(np.asarray(rel)[1:2], np.asarray(one.relevance[
                next(iter(one.relevance))]), rtol=1e-4, atol=1e-6)
