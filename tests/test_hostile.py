"""Hostile inputs: every misuse gives a typed error that says what was wrong and what to do, and
leaves nothing half-changed (issue 7, point 2).

One table (``CASES``) lists each case, the error it must raise, a pattern for *what was wrong* and
one for *what to do*. Every case checks, bitwise, that the user's model is as it was before the
call (training flags, requires_grad flags, parameter and buffer values, dtypes, devices, the
tensor objects themselves, module attributes and hooks), that the inputs are unchanged, and that
torch's global state (grad mode, default dtype, thread count) is untouched. Call-time cases also
check that the Explainer still gives the same explanation afterwards.

Decisions recorded here (see README "Reliability"):

* float64 models are explained in float64 when ``jax_enable_x64`` is on; with it off dlbjax raises
  DtypeError instead of silently computing in float32 (and an Explainer built under x64 refuses to
  run once x64 is turned off);
* a model whose inputs are all integer tensors and which has no embedding lookup raises
  DtypeError: no input could carry relevance, every score would be 0;
* devices: a parameter, buffer or input on the ``meta`` device (no values) and inputs on another
  device than the model's parameters raise InputMismatchError before export; dlbjax itself copies
  weights and inputs to the host and computes on JAX's default device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional

import jax
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax._plan import _check_devices


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class BNNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear: train/eval matter, buffers exist."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.fc(x)))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, left, right):
        return self.a(left) + self.b(right)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return self.fc(x)
        return -self.fc(x)


class ShapeBug(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)  # the input has 4 features

    def forward(self, x):
        return self.fc(x)


class NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.cumsum(x, dim=1))  # cumsum has no relevance rule


class Overflow(nn.Module):
    """Finite weights and inputs; the forward overflows float32 for large inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * 1e30)


class IntegerOnly(nn.Module):
    """Integer features cast to float inside forward, no embedding."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.float())


def bn_net(train=False, double=False):
    torch.manual_seed(0)
    m = BNNet()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    m = m.double() if double else m
    return m.train(train)


def nan_weight():
    m = bn_net(train=True)
    with torch.no_grad():
        m.head.weight[1, 2] = float("nan")
    return m


def inf_buffer():
    m = bn_net()
    with torch.no_grad():
        m.bn.running_var[0] = float("inf")
    return m


def meta_model():
    return bn_net().to("meta")


def seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().train()  # training mode: dlbjax must never flip the user's flags
    return build


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def x4(n=2, dtype=torch.float32):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(n)).to(dtype)


def inputs_state(x):
    if isinstance(x, torch.Tensor):
        return ("tensor",) + _tensor_state(x)[1:]
    if isinstance(x, (tuple, list)):
        return tuple(inputs_state(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, inputs_state(v)) for k, v in x.items())
    return repr(x)


def explain(inputs, **kw):
    """Call dlbjax.explain; the inputs must be unchanged afterwards (whatever happened)."""
    def run(model):
        args = inputs()
        before = inputs_state(args)
        try:
            dlbjax.explain(model, args, **kw)
        finally:
            assert inputs_state(args) == before, "the inputs were changed"
    return run


def at_call(bad, good=x4, **kw):
    """Build an Explainer on good inputs, then call it with bad ones; afterwards the Explainer
    must still give the explanation it gave before."""
    def run(model):
        ex = dlbjax.Explainer(model, good(), **kw)
        before = ex(good()).relevance
        try:
            ex(bad[0]() if isinstance(bad, tuple) else bad(), **(bad[1] if isinstance(bad, tuple)
                                                               else {}))
        finally:
            after = ex(good()).relevance
            for k in before:
                np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]))
    return run


def x64_off_after_build(model):
    with jax.enable_x64(True):
        ex = dlbjax.Explainer(model, x4(dtype=torch.float64))
    ex(x4(dtype=torch.float64))


def fake_cuda_input(model):
    """No GPU here: the device check sees an input that claims to live on cuda:0."""
    fake = SimpleNamespace(device=torch.device("cuda", 0))
    _check_devices(model, SimpleNamespace(names=["x"], tensors=[fake]))


def mixed_devices(model):
    a, b = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda", 0))
    _check_devices(model, SimpleNamespace(names=["left", "right"], tensors=[a, b]))


@dataclass
class Case:
    id: str
    model: Callable[[], nn.Module]
    call: Callable[[nn.Module], Any]
    error: type
    wrong: str   # pattern: what was wrong
    todo: str    # pattern: what to do
    typed: bool = True  # a DLBJaxError (False only for the not-a-module TypeError)


E = dlbjax
CASES = [
    # number, names, shapes and dtypes of inputs
    Case("too many inputs", bn_net, explain(lambda: (x4(), x4())), E.InputMismatchError,
         r"do not fit BNNet\.forward\(x\)", r"forward\(x\)"),
    Case("too few inputs", seeded(TwoInputs), explain(lambda: (x4(),)), E.InputMismatchError,
         r"missing a required argument: 'right'", r"forward\(left, right\)"),
    Case("wrong input name", bn_net, explain(lambda: {"y": x4()}), E.InputMismatchError,
         r"missing a required argument: 'x'", r"forward\(x\)"),
    Case("wrong number at call", bn_net, at_call(lambda: (x4(), x4())), E.InputMismatchError,
         r"expected 1 tensor inputs \['x'\], got 2", r"\['x'\]"),
    Case("wrong name at call", seeded(TwoInputs),
         at_call(lambda: {"left": x4(), "rihgt": x4()[:, :2]},
                 good=lambda: {"left": x4(), "right": x4()[:, :2]}),
         E.InputMismatchError, r"missing \['right'\] unexpected \['rihgt'\]", r"example's"),
    Case("wrong shape at call", bn_net, at_call(lambda: torch.randn(2, 5)), E.InputMismatchError,
         r"shape \(2, 5\)", r"expected \[N, 4\]"),
    Case("wrong rank at call", bn_net, at_call(lambda: torch.randn(4)), E.InputMismatchError,
         r"shape \(4,\)", r"expected \[N, 4\]"),
    Case("wrong dtype at call", bn_net, at_call(lambda: x4(dtype=torch.float64)),
         E.InputMismatchError, r"dtype float64, the example had float32", r"cast it"),
    Case("integer input at call", bn_net, at_call(lambda: torch.ones(2, 4, dtype=torch.int64)),
         E.InputMismatchError, r"dtype int64", r"cast it"),
    Case("input dtype differs from the model", bn_net, explain(lambda: x4(dtype=torch.float64)),
         E.InputMismatchError, r"'x' has dtype torch\.float64 but the model's parameters are "
         r"torch\.float32", r"x\.to\(torch\.float32\)"),
    Case("not a tensor", bn_net, explain(lambda: "a sentence"), E.InputMismatchError,
         r"not str", r"a tensor, a tuple of positional tensors or a dict"),
    # forward that cannot be exported
    Case("data-dependent control flow", seeded(DataDependent), explain(x4), E.ExportError,
         r"could not capture DataDependent\.forward", r"torch\.where or static shapes"),
    Case("forward raises (shape bug)", seeded(ShapeBug), explain(x4), E.ExportError,
         r"cannot be multiplied|shape", r"fix the\s+inputs first"),
    # ops without a rule or a lowering
    Case("op without a rule", seeded(NoRule), explain(x4), E.UnsupportedOperationError,
         r"cumsum\.default in module '<top-level forward>'", r"register a rule|supported layer"),
    # targets
    Case("target outside the output", bn_net, explain(x4, target=3), E.TargetError,
         r"target 3 \(row 0\) is outside the output", r"valid classes are 0\.\.2"),
    Case("negative target", bn_net, at_call((x4, {"target": [0, -1]})), E.TargetError,
         r"target -1 \(row 1\) is outside the output", r"valid classes are 0\.\.2"),
    Case("target per row, wrong count", bn_net, at_call((x4, {"target": [0, 1, 2]})),
         E.TargetError, r"one int per row \(2 rows\)", r"an int or one int per row"),
    Case("float target", bn_net, explain(x4, target=1.5), E.TargetError, r"got float64",
         r"must be an int"),
    # empty batches
    Case("empty batch", bn_net, explain(lambda: torch.randn(0, 4)), E.InputMismatchError,
         r"empty batch \(0 rows\)", r"0 rows"),
    Case("empty batch at call", bn_net, at_call(lambda: torch.randn(0, 4)), E.InputMismatchError,
         r"empty batch \(0 rows\)", r"0 rows"),
    # non-finite values
    Case("NaN input", bn_net, explain(lambda: x4().index_put_((torch.tensor([1]), torch.tensor([2])),
                                                             torch.tensor(float("nan")))),
         E.NonFiniteError, r"input 'x' contains NaN or inf \(first at row 1\)", r"undefined"),
    Case("inf input at call", bn_net, at_call(lambda: x4().fill_(float("inf"))), E.NonFiniteError,
         r"input 'x' contains NaN or inf", r"undefined"),
    Case("NaN weight (model in train mode)", nan_weight, explain(x4), E.NonFiniteError,
         r"'head\.weight' contains NaN or inf", r"fix the model's weights"),
    Case("inf buffer", inf_buffer, explain(x4), E.NonFiniteError,
         r"'bn\.running_var' contains NaN or inf", r"fix the model's weights"),
    Case("forward overflows float32", seeded(Overflow), explain(lambda: x4() * 1e10),
         E.NonFiniteError, r"relevance of input 'x' is NaN or inf .*overflow",
         r"Scale the inputs down|float64"),
    # dtypes of the model
    Case("float64 model, x64 off", lambda: bn_net(double=True),
         explain(lambda: x4(dtype=torch.float64)), E.DtypeError,
         r"computes in float64 .* 64-bit mode is off", r"jax_enable_x64.*model\.float\(\)"),
    Case("float64 Explainer called after x64 is turned off", lambda: bn_net(double=True),
         x64_off_after_build, E.DtypeError, r"built for a float64 model",
         r"turn it on again|float32 model"),
    Case("integer-only model", seeded(IntegerOnly),
         explain(lambda: torch.randint(0, 5, (2, 4))), E.DtypeError,
         r"no input can carry relevance.*int64.*every relevance would be 0", r"x\.float\(\)"),
    # devices (no GPU here: the meta device and a mocked cuda input)
    Case("input on the meta device", bn_net, explain(lambda: x4().to("meta")),
         E.InputMismatchError, r"input 'x' is on the 'meta' device", r"tensor with data"),
    Case("model on the meta device", meta_model, explain(x4), E.InputMismatchError,
         r"'fc\.weight' is on the 'meta' device", r"materialise the weights"),
    Case("meta input at call", bn_net, at_call(lambda: x4().to("meta")), E.InputMismatchError,
         r"'meta' device and holds no\s+values", r"tensor with data"),
    Case("input on another device than the model", bn_net, fake_cuda_input, E.InputMismatchError,
         r"'x' is on cuda:0 but the model's parameters are on cpu", r"x\.to\('cpu'\)"),
    Case("inputs on two devices", seeded(TwoInputs), mixed_devices, E.InputMismatchError,
         r"different devices \('left' on cpu, 'right' on cuda:0\)", r"move them"),
    # options and the model itself
    Case("unknown mode", bn_net, explain(x4, mode="contrastiv"), ValueError,
         r"mode must be 'default' or 'contrastive'", r"'contrastive'", typed=False),
    Case("not a module", bn_net, lambda model: dlbjax.explain(lambda x: x, x4()), TypeError,
         r"expected a torch\.nn\.Module, or a function fn\(params, \*inputs\) with params=\.\.\., "
         r"got function", r"params=", typed=False),
]


# ------------------------------------------------------------------------------------------------
# snapshots
# ------------------------------------------------------------------------------------------------
def _tensor_state(t: torch.Tensor):
    data = None if t.device.type == "meta" else t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return (id(t), t.dtype, str(t.device), tuple(t.shape), t.requires_grad, data)


def snapshot(model: nn.Module):
    return ([(n, m.training, type(m), sorted(m.__dict__), len(m._forward_hooks),
              len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()],
            [(n, _tensor_state(p)) for n, p in model.named_parameters()],
            [(n, _tensor_state(b)) for n, b in model.named_buffers()])


def torch_globals():
    return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(), jax.config.jax_enable_x64)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case):
    model = case.model()
    before, globals_before = snapshot(model), torch_globals()
    with pytest.raises(case.error) as info:
        case.call(model)
    err, msg = info.value, str(info.value)
    if case.typed:
        assert isinstance(err, dlbjax.DLBJaxError), type(err)
    assert re.search(case.wrong, msg, re.S), f"message does not say what was wrong: {msg}"
    assert re.search(case.todo, msg, re.S), f"message does not say what to do: {msg}"
    assert snapshot(model) == before, "the model was changed"
    assert torch_globals() == globals_before


def test_every_error_type_is_in_the_table():
    types = {c.error for c in CASES}
    for name in ("InputMismatchError", "ExportError", "UnsupportedOperationError", "TargetError",
                 "NonFiniteError", "DtypeError"):
        assert getattr(dlbjax, name) in types, name


def test_float64_is_explained_in_float64_with_x64():
    """The supported side of the float64 decision (the comparison with float32 is in
    test_determinism.py)."""
    model = bn_net(double=True).eval()
    x = x4(dtype=torch.float64)
    with jax.enable_x64(True):
        e = dlbjax.explain(model, x)
    assert e.relevance["x"].dtype == np.float64
    with torch.no_grad():
        np.testing.assert_allclose(e.prediction, model(x).numpy(), rtol=1e-12, atol=1e-12)


def test_float64_cast_inside_a_float32_model_warns():
    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.double().float())

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="casts to float64"):
        dlbjax.explain(Casts().eval(), x4())
