"""The importer (torch.export -> ATen with layers kept whole) and the IR (printing, validation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ResidualCNN, randomize_bn
from dlbjax import InvalidProgramError
from dlbjax.importers import KEEP_WHOLE, decomposition_table, import_model
from dlbjax.ir import Eqn, Program, Var


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    model = randomize_bn(ResidualCNN()).eval()
    prog, bound = import_model(model, torch.randn(1, 3, 12, 12))
    return prog


def test_layers_are_kept_whole(program):
    ops = {e.op for e in program.eqns}
    assert {"aten.conv2d.default", "aten.linear.default", "aten.max_pool2d.default",
            "aten.adaptive_avg_pool2d.default", "aten.relu.default", "aten.add.Tensor",
            "aten._native_batch_norm_legit_no_training.default"} <= ops
    assert not any(op in ops for op in ("aten.convolution.default", "aten.addmm.default"))
    table = decomposition_table()
    assert all(op not in table for op in KEEP_WHOLE)


def test_constants_are_classified_with_values(program):
    kinds = program.const_kinds
    assert kinds["stem.0.weight"] == "parameter" and kinds["stem.1.running_mean"] == "buffer"
    for c in program.constants:
        assert program.const_values[c.name].shape == c.shape
    assert program.const_values["stem.0.weight"].dtype == np.float32


def test_module_paths_are_recorded(program):
    paths = {e.source.module_path for e in program.eqns}
    assert {"stem.0", "stem.1", "conv1", "bn2", "fc"} <= paths
    conv = [e for e in program.eqns if e.op == "aten.conv2d.default"][0]
    assert conv.source.module_type.endswith("Conv2d")


def test_printing_is_jaxpr_like(program):
    text = str(program)
    assert text.startswith("{ lambda ") and "let" in text and text.rstrip().endswith("}")
    assert "x:f32[1,3,12,12]" in text
    assert "= aten.conv2d.default(x, stem.0.weight, stem.0.bias" in text
    assert "# stem.0 (Conv2d)" in text
    assert "aten.conv2d.default" in program.summary()


def test_eqn_inputs_and_params(program):
    conv = [e for e in program.eqns if e.op == "aten.conv2d.default"][0]
    assert [v.name for v in conv.inputs] == ["x", "stem.0.weight", "stem.0.bias"]
    assert conv.params  # stride/padding literals
    assert conv.short_op == "conv2d"


def test_validator_accepts_imported_programs(program):
    assert program.validate() is program


def _clone(program, **changes):
    return dataclasses.replace(program, **changes)


def test_validator_catches_malformed_programs(program):
    eqns = list(program.eqns)
    ghost = Var("ghost", (1, 2), "float32")
    bad_use = Eqn("aten.relu.default", (ghost,), {}, (Var("r", (1, 2), "float32"),))
    with pytest.raises(InvalidProgramError, match="ghost"):
        _clone(program, eqns=tuple(eqns[:1] + [bad_use] + eqns[1:])).validate()
    dup = Eqn("aten.relu.default", (program.inputs[0],), {}, (Var("x", (1, 3, 12, 12), "float32"),))
    with pytest.raises(InvalidProgramError, match="defined twice"):
        _clone(program, eqns=(dup,) + tuple(eqns)).validate()
    with pytest.raises(InvalidProgramError, match="not defined before"):
        _clone(program, eqns=tuple(reversed(eqns))).validate()
    values = dict(program.const_values)
    values["fc.weight"] = np.zeros((1, 1), np.float32)
    with pytest.raises(InvalidProgramError, match="fc.weight"):
        _clone(program, const_values=values).validate()
    wrong = Var(program.inputs[0].name, (9,), "float32")
    use_wrong = Eqn("aten.relu.default", (wrong,), {}, (Var("r2", (9,), "float32"),))
    with pytest.raises(InvalidProgramError, match="defined as"):
        _clone(program, eqns=(use_wrong,) + tuple(eqns)).validate()
    with pytest.raises(InvalidProgramError, match="unknown dtype"):
        _clone(program, inputs=(Var("x", (1,), "float8"),)).validate()
    with pytest.raises(InvalidProgramError, match="no outputs"):
        _clone(program, outputs=(), output_names=()).validate()


def test_forward_argument_names_and_constant_arguments():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, features, *, offset: float = 0.0, flag: bool = False):
            return self.fc(features) + offset

    prog, bound = import_model(M().eval(), {"features": torch.randn(2, 3), "offset": 1.5})
    assert [v.name for v in prog.inputs] == ["features"]
    assert bound.names == ["features"]
    assert any(1.5 in e.args for e in prog.eqns if e.op.startswith("aten.add"))


def test_output_names_from_structured_outputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return {"logits": y, "probs": torch.softmax(y, -1)}

    prog, _ = import_model(M().eval(), torch.randn(1, 3))
    assert set(prog.output_names) == {"logits", "probs"}


def test_program_is_a_plain_value():
    p = Program((), (), (), (), (), {})
    with pytest.raises(InvalidProgramError):
        p.validate()
