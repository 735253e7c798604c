"""Bad input gets a clear, typed error, never a silent wrong answer (issue: core, point 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from conftest import MLP


class WithSign(nn.Module):
    """Two ops without a relevance rule on the explained path (sign, cumsum) in named modules."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.sign(self.fc(x)) + torch.cumsum(x, dim=1)
        return self.head(h)


def test_unsupported_ops_are_all_listed_with_module_and_hint():
    torch.manual_seed(0)
    with pytest.raises(dlbjax.UnsupportedOperationError) as info:
        dlbjax.explain(WithSign().eval(), torch.randn(1, 4))
    err = info.value
    ops = {o.op for o in err.ops}
    assert {"aten.sign.default", "aten.cumsum.default"} <= ops
    msg = str(err)
    assert "sign" in msg and "cumsum" in msg and "no relevance rule" in msg
    assert "register" in msg  # says what to do
    assert all(o.hint for o in err.ops)


def test_unsupported_op_not_on_the_explained_path_is_fine():
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            mask = (torch.sign(x.detach()) > 0).float()  # comparisons carry no relevance
            return self.fc(x * 1.0), mask

    e = dlbjax.explain(SideBranch().eval(), torch.randn(2, 4))
    assert e.relevance["x"].shape == (2, 4)


class NoLowering(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)  # no forward lowering in dlbjax


def test_op_without_lowering_names_the_op():
    with pytest.raises(dlbjax.UnsupportedOperationError, match="i0"):
        dlbjax.explain(NoLowering(), torch.randn(1, 3))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


def test_export_failure_is_an_export_error():
    with pytest.raises(dlbjax.ExportError, match="static graph"):
        dlbjax.explain(DataDependent().eval(), torch.randn(1, 3))


class Packed(nn.Module):
    """The usual variable-length classifier: pack, run the RNN, classify h_n."""

    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        return self.fc(h[-1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_packed_sequences_raise_an_export_error_saying_what_to_do(cell):
    x, lengths = torch.randn(2, 6, 4), torch.tensor([6, 3])
    with pytest.raises(dlbjax.ExportError, match="(?s)packs a sequence.*padded batch"):
        dlbjax.explain(Packed(cell).eval(), (x, lengths))


class NormOnly(nn.Module):
    def forward(self, x):
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def test_an_output_reached_only_through_a_statistic_is_refused():
    """A vector norm is a statistic (no relevance through it): explaining the norm itself must
    raise, naming the op, instead of reporting everything as lost."""
    with pytest.raises(dlbjax.UnsupportedOperationError, match="linalg_vector_norm.*only through"):
        dlbjax.explain(NormOnly(), torch.randn(2, 4), task="regression", target=[0])


@pytest.fixture(scope="module")
def explainer():
    torch.manual_seed(0)
    return dlbjax.Explainer(MLP((4, 6, 3)).eval(), torch.randn(2, 4))


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(2, 5), "rows of the example have shape"),
    (lambda: torch.randn(2, 4, dtype=torch.float64), "dtype float64"),
    (lambda: torch.randint(0, 3, (2, 4)), "dtype int64"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 4)), "expected 1 tensor inputs"),
    (lambda: {"y": torch.randn(2, 4)}, "missing \\['x'\\]"),
    (lambda: torch.randn(0, 4), "empty batch"),
    (lambda: torch.randn(4), "shape"),
    (lambda: "text", "unsupported input type"),
])
def test_input_mismatches(explainer, bad, match):
    with pytest.raises(dlbjax.InputMismatchError, match=match):
        explainer(bad())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(explainer, value):
    x = torch.randn(2, 4)
    x[1, 2] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        explainer(x)


def test_non_finite_weights():
    model = MLP((4, 6, 3)).eval()
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    with pytest.raises(dlbjax.NonFiniteError, match="net.0.weight"):
        dlbjax.Explainer(model, torch.randn(1, 4))


@pytest.mark.parametrize("target,match", [
    (3, "outside the output"), (-1, "outside the output"), ([0, 5], "outside the output"),
    ([0, 1, 2], "one int per row"), (1.5, "must be an int"),
])
def test_bad_targets(explainer, target, match):
    with pytest.raises(ValueError, match=match):
        explainer(torch.randn(2, 4), target=target)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "contrast-ish"}, "mode must be"), ({"multiplier": 0}, "positive"),
    ({"multiplier": float("nan")}, "positive"), ({"task": "segmentation-ish"}, "unknown task"),
    ({"output": 3}, "output must be"), ({"batch_axis": 1}, "batch_axis"),
    ({"product_rule": "quarter"}, "product_rule"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dlbjax.Explainer(MLP((4, 6, 3)).eval(), torch.randn(1, 4), **kwargs)


def test_inputs_with_different_batch_sizes():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(dlbjax.InputMismatchError, match="different leading"):
        dlbjax.Explainer(Two(), (torch.randn(2, 3), torch.randn(3, 3)))


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        dlbjax.explain(lambda x: x, torch.randn(1, 2))


def test_errors_are_typed():
    assert issubclass(dlbjax.UnsupportedOperationError, dlbjax.DLBJaxError)
    assert issubclass(dlbjax.InputMismatchError, ValueError)
    assert issubclass(dlbjax.TargetError, ValueError)
    assert issubclass(dlbjax.NonFiniteError, ValueError)
    assert np.isfinite(1.0)
