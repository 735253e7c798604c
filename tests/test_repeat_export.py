"""Deep models exported with three of their layers, the rest repeated in the IR
(``importers/_repeat.py``, ``export_layers="auto"``).

* the repeated program is the fully exported one up to variable names: same equations, same
  runs of identical layers, bitwise-equal prediction and relevance (default and contrastive
  mode), on a Hugging Face decoder (LLaMA, 7 layers) and encoder (BERT, 6 layers);
* jit == eager and vmap == loop hold for it (one Explainer call over a batch vs row by row);
* the user's model is unchanged (its layer list, its state dict);
* what must not be repeated is not: layers that differ (no stack found), a parent forward
  that reads every layer's output (the structural check refuses), and a parent forward that
  treats a later layer differently (the structural check passes, the numeric check against
  torch catches it and the whole model is exported).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dlbjax
from dlbjax import importers
from dlbjax.importers import _repeat
from dlbjax.importers._repeat import find_layer_stack, repeat_layers, truncated_copy

HF = pytest.importorskip("hf_zoo", reason="transformers is needed")


@pytest.fixture(autouse=True)
def six_layers_repeat(monkeypatch, request):
    """Stacks of 6-7 layers are repeated in these tests (the default threshold is 8 layers,
    where repeating starts to pay; tested on its own below): smaller models, same code path."""
    if "default_threshold" not in request.node.name:
        monkeypatch.setattr(_repeat, "MIN_LAYERS", 6)


def _fields(ex):
    out = {f"relevance.{k}": np.asarray(v) for k, v in ex.relevance.items()}
    out["prediction"] = np.asarray(ex.prediction)
    for k in ("bias", "lost"):
        out[f"conservation.{k}"] = np.asarray(getattr(ex.conservation, k))
    return out


def _same(a, b):
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("name,layers,modes", [("llama", 7, ("default", "contrastive")),
                                               ("bert", 6, ("default",))])
def test_repeated_equals_fully_exported(name, layers, modes):
    model, x = HF.tiny(name, layers=layers), HF.inputs(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repeated = dlbjax.Explainer(model, x)
    full = dlbjax.Explainer(model, x, export_layers="all")
    assert full.plan.repeated is None
    path, kept, count = repeated.plan.repeated
    assert (path, kept, count) == ({"llama": "model.layers", "bert": "bert.encoder.layer"}[name],
                                   3, layers)
    # the same program up to variable names, so the same runs of identical layers
    pr, pf = repeated.plan.program, full.plan.program
    assert [e.op for e in pr.eqns] == [e.op for e in pf.eqns]
    assert [str(e.source) for e in pr.eqns] == [str(e.source) for e in pf.eqns]
    assert sorted(c.name for c in pr.constants) == sorted(c.name for c in pf.constants)
    assert [(r.start, r.period, r.count) for r in repeated.plan.runs] == \
        [(r.start, r.period, r.count) for r in full.plan.runs]
    for mode in modes:
        r = repeated if mode == "default" else repeated.replace(mode=mode)
        f = full if mode == "default" else full.replace(mode=mode)
        _same(r(x), f(x))
    # the user's model is unchanged
    stack = dict(model.named_modules())[path]
    assert len(stack) == layers
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_repeated_jit_vmap_and_unrolled():
    """A batch in one call equals row-by-row calls; scan_layers=False (unrolled) equals the
    scanned pass on the repeated program (both are jitted; the rows are vmapped)."""
    model, x = HF.tiny("llama", layers=6), HF.inputs("llama", batch=3)
    ex = dlbjax.Explainer(model, x)
    assert ex.plan.repeated is not None
    batch = ex(x)
    for i in range(3):
        row = ex({k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()})
        np.testing.assert_allclose(np.asarray(row.relevance["input_ids"])[0],
                                   np.asarray(batch.relevance["input_ids"])[i],
                                   rtol=1e-5, atol=1e-6 * np.abs(batch.relevance["input_ids"]).max())
    unrolled = ex.replace(scan_layers=False)
    assert unrolled.plan.runs == () and unrolled.plan.repeated is not None
    u = unrolled(x)
    scale = np.abs(u.relevance["input_ids"]).max()
    np.testing.assert_allclose(batch.relevance["input_ids"], u.relevance["input_ids"],
                               rtol=0, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# what must not be repeated
# ------------------------------------------------------------------------------------------------
class Block(torch.nn.Module):
    def __init__(self, width=8, scale=1.0):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.scale = scale

    def forward(self, h):
        return h + torch.relu(self.lin(h)) * self.scale


class Stack(torch.nn.Module):
    """``special``: the layer index whose output the parent doubles (a later layer treated
    differently by the parent's forward); ``every``: the output sums every layer's output."""

    def __init__(self, n=7, special=None, every=False, scales=None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList(Block(scale=(scales[i] if scales else 1.0))
                                          for i in range(n))
        self.out = torch.nn.Linear(8, 3)
        self.special, self.every = special, every

    def forward(self, x):
        h = self.inp(x)
        seen = []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i == self.special:
                h = h * 2.0
            seen.append(h)
        if self.every:
            h = torch.stack(seen).sum(0)
        return self.out(h)


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def test_a_plain_stack_is_repeated_and_exact():
    model = Stack().eval()
    ex = dlbjax.Explainer(model, X)
    assert ex.plan.repeated == ("layers", 3, 7)
    full = dlbjax.Explainer(model, X, export_layers="all")
    _same(ex(X), full(X))
    np.testing.assert_allclose(ex(X).prediction, model(X).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_the_default_threshold_is_eight_layers():
    assert _repeat.MIN_LAYERS == 8
    assert find_layer_stack(Stack(n=7).eval()) is None
    assert find_layer_stack(Stack(n=8).eval()) == ("layers", 8)


def test_differing_layers_are_not_a_stack():
    model = Stack(scales=[1.0] * 6 + [0.5]).eval()
    assert find_layer_stack(model) is None
    assert dlbjax.Explainer(model, X).plan.repeated is None


def test_every_layer_read_at_the_end_is_refused_structurally():
    model = Stack(every=True).eval()
    assert find_layer_stack(model) == ("layers", 7)
    bound = importers.bind_inputs(model, X[:1])
    ep = importers.export_model(truncated_copy(model, "layers"), bound.args, bound.kwargs)
    assert repeat_layers(importers.translate(ep, bound.names), model, "layers", 7) is None
    ex = dlbjax.Explainer(model, X)
    assert ex.plan.repeated is None
    np.testing.assert_allclose(ex(X).prediction, model(X).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_later_layer_treated_differently_is_caught_numerically():
    model = Stack(special=4).eval()
    bound = importers.bind_inputs(model, X[:1])
    assert importers.import_repeated(model, bound) is not None  # structurally it repeats
    ex = dlbjax.Explainer(model, X)
    assert ex.plan.repeated is None  # the check against torch refused it
    np.testing.assert_allclose(ex(X).prediction, model(X).detach().numpy(), rtol=1e-5, atol=1e-6)
    _same(ex(X), dlbjax.Explainer(model, X, export_layers="all")(X))


class Counted(Stack):
    """A parent that insists on all its layers: its 3-layer copy fails to export."""

    def forward(self, x):
        assert len(self.layers) == 7, "all layers needed"
        return super().forward(x)


def test_a_truncated_copy_that_fails_falls_back():
    model = Counted().eval()
    ex = dlbjax.Explainer(model, X)
    assert ex.plan.repeated is None
    np.testing.assert_allclose(ex(X).prediction, model(X).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_layers_is_validated_and_needs_a_new_explainer():
    with pytest.raises(ValueError, match="export_layers"):
        dlbjax.Explainer(Stack().eval(), X, export_layers="some")
    ex = dlbjax.Explainer(Stack().eval(), X)
    with pytest.raises(ValueError, match="export_layers"):
        ex.replace(export_layers="all")
