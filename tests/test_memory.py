"""Memory near the weights (issue 15): a CPU torch model's weights are shared with the Explainer,
not copied; in-place changes are detected; |W| is kept only when it fits a budget
(precompute_magnitudes="auto"); a model that will not fit raises ModelTooLargeError; the export
graph is not kept; build stages are logged on the "dlbjax" logger."""

from __future__ import annotations

import copy
import gc
import io
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax.passes import magnitudes as memory
from conftest import MLP
from dlbjax._config import Config


@pytest.fixture()
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(2))


def _params(model):
    return dict(model.named_parameters())


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- zero-copy sharing -------------------------------------------------------------------------
def test_float32_cpu_weights_are_shared_not_copied(mlp, data):
    ex = dlbjax.Explainer(mlp, data[:1])
    params = _params(mlp)
    assert params and set(params) <= set(ex.plan.consts)
    for name, p in params.items():
        c = ex.plan.consts[name]
        assert c.unsafe_buffer_pointer() == p.data_ptr(), name  # the JAX constant aliases it
        assert np.shares_memory(ex.program.const_values[name], p.detach().numpy())
        assert not ex.program.const_values[name].flags.writeable  # never written through
    assert {n for n, _, _ in ex.plan.shared} == set(params)


def test_other_dtypes_are_copies(mlp, data):
    half = copy.deepcopy(mlp).to(torch.bfloat16)
    ex = dlbjax.Explainer(half, data[:1].to(torch.bfloat16))  # computed in float32: converted
    for name, p in _params(half).items():
        assert ex.plan.consts[name].dtype == np.float32
        assert ex.plan.consts[name].unsafe_buffer_pointer() != p.data_ptr()
        # one float32 copy, not two: the program's host value is a view of the JAX array
        assert ex.program.const_values[name].ctypes.data == \
            ex.plan.consts[name].unsafe_buffer_pointer()
    assert ex.plan.shared == ()

    class WithIds(nn.Module):  # an int64 buffer is narrowed to int32 (x64 off): a copy
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("order", torch.tensor([2, 0, 1, 3]))

        def forward(self, x):
            return self.lin(x[:, self.order])

    m = WithIds().eval()
    ex = dlbjax.Explainer(m, torch.randn(1, 4))
    assert ex.plan.consts["order"].dtype == np.int32
    assert ex.plan.consts["order"].unsafe_buffer_pointer() != m.order.data_ptr()
    assert ex.plan.consts["lin.weight"].unsafe_buffer_pointer() == m.lin.weight.data_ptr()


def test_the_model_is_unchanged(data):
    torch.manual_seed(1)
    model = MLP()  # in training mode: exported from an eval copy
    before, flags = _state(model), [m.training for m in model.modules()]
    ex = dlbjax.Explainer(model, data[:1])
    ex(data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


def test_in_place_changes_raise_and_a_new_explainer_sees_them(mlp, data):
    ex = dlbjax.Explainer(mlp, data[:1])
    ref = ex(data).relevance["x"]
    w = next(iter(_params(mlp).values()))
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step, load_state_dict, ... bump the version counter
    with pytest.raises(dlbjax.WeightsChangedError, match="new Explainer"):
        ex(data)
    with pytest.raises(dlbjax.WeightsChangedError):
        ex.replace(multiplier=3.0)(data)  # a replaced Explainer shares the same weights
    fresh = dlbjax.Explainer(mlp, data[:1])(data).relevance["x"]
    assert not np.array_equal(fresh, ref)


def test_an_explainer_of_a_copy_keeps_the_old_weights(mlp, data):
    ex = dlbjax.Explainer(copy.deepcopy(mlp), data[:1])
    ref = ex(data).relevance["x"]
    with torch.no_grad():
        next(iter(_params(mlp).values())).mul_(2.0)
    np.testing.assert_array_equal(ex(data).relevance["x"], ref)


def test_the_exported_program_is_not_kept(mlp, data):
    def live():
        gc.collect()
        return sum(isinstance(o, (torch.export.ExportedProgram, torch.fx.GraphModule))
                   for o in gc.get_objects())

    before = live()
    ex = dlbjax.Explainer(mlp, data[:1])
    ex(data[:2])
    assert live() <= before


# ---- precompute_magnitudes="auto" --------------------------------------------------------------
def test_auto_magnitudes_choose_by_budget_and_change_nothing(mlp, data, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10**12)
    assert Config().precompute_magnitudes == "auto"
    kept = dlbjax.Explainer(mlp, data[:1])
    assert kept.plan.mags and kept.plan.memory.keep_magnitudes
    assert set(kept.plan.mags) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    monkeypatch.setattr(memory, "AUTO_MAGNITUDE_BYTES", 16)  # under the byte cap: recomputed
    skipped = dlbjax.Explainer(mlp, data[:1])
    assert skipped.plan.mags == {} and not skipped.plan.memory.keep_magnitudes
    monkeypatch.setattr(memory, "AUTO_MAGNITUDE_BYTES", 2**40)
    needed = kept.plan.memory.magnitudes
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 4 * needed)
    assert dlbjax.Explainer(mlp, data[:1]).plan.mags == {}  # over 1/8 of the free memory
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 8 * needed)
    assert dlbjax.Explainer(mlp, data[:1]).plan.mags
    for k in ("x",):
        np.testing.assert_array_equal(kept(data).relevance[k], skipped(data).relevance[k])
    forced = dlbjax.Explainer(mlp, data[:1], precompute_magnitudes=True)
    off = dlbjax.Explainer(mlp, data[:1], precompute_magnitudes=False)
    assert forced.plan.mags and off.plan.mags == {}
    np.testing.assert_array_equal(forced(data).relevance["x"], off(data).relevance["x"])
    with pytest.raises(ValueError, match="precompute_magnitudes"):
        dlbjax.Explainer(mlp, data[:1], precompute_magnitudes="sometimes")


# ---- the fit check -----------------------------------------------------------------------------
def test_a_model_that_does_not_fit_raises_with_the_estimate(mlp, data, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(dlbjax.ModelTooLargeError) as info:
        dlbjax.Explainer(mlp, data[:1], precompute_magnitudes=True, max_batch=4)
    err = info.value
    assert isinstance(err, MemoryError) and isinstance(err, dlbjax.DLBJaxError)
    assert err.available == 1000 and err.needed > 1000
    assert err.parts["magnitudes"] > 0 and err.parts["activations"] > 0
    assert err.needed == sum(err.parts.values())
    text = str(err)
    assert "precompute_magnitudes=False" in text and "max_batch" in text and "GiB" in text
    with pytest.raises(dlbjax.ModelTooLargeError) as info:
        dlbjax.Explainer(mlp, data[:1])  # auto drops |W|; the rest still does not fit
    assert info.value.parts["magnitudes"] == 0
    assert not any("precompute_magnitudes" in o for o in info.value.options)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: None)  # unknown: no check
    dlbjax.Explainer(mlp, data[:1], precompute_magnitudes=True)


def test_available_bytes_probe_reads_the_host():
    free = memory.available_bytes()
    assert free is None or free > 0


# ---- progress --------------------------------------------------------------------------------
def test_build_stages_are_logged_at_info_only(mlp, data):
    log = logging.getLogger("dlbjax")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    level = log.level
    try:
        dlbjax.Explainer(mlp, data[:1])
        assert stream.getvalue() == ""  # quiet by default
        log.setLevel(logging.INFO)
        dlbjax.Explainer(mlp, data[:1])
        text = stream.getvalue()
        assert "exported and translated" in text and "constants placed" in text
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
