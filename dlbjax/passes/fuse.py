"""Fuse written-out element-wise modules into one IR equation before the relevance analysis.

Hugging Face writes several activations and norms out of primitive ops (``NewGELUActivation`` is
``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``, ``LlamaRMSNorm`` is
``w * (x * rsqrt(mean(x^2) + eps))``). Explaining their primitives would push relevance through
products and cubes that carry no DLB meaning; the spec treats an activation or a norm as one op
whatever its form (§4.8, §9.4, §9.6). This pass finds each contiguous run of equations recorded
inside one module whose class is a known element-wise activation or norm, with one non-constant
input and one output of the same shape, and replaces the run by a single ``dlbjax.fused``
equation that keeps the original equations as its body (the forward runs them unchanged) and
whose relevance rule is the identity (``rules/fused.py``).
"""

from __future__ import annotations

from dlbjax.ir import Eqn, Program, Var
from dlbjax.lowerings.fused import FUSED_OP, FusedBody

__all__ = ["fuse_modules", "ACTIVATION_MODULES", "NORM_SUFFIXES"]

# module class name -> activation-table key for experimental gating (spec §2.2, §9.6)
ACTIVATION_MODULES = {
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "GELUActivation": "gelu", "AccurateGELUActivation": "gelu_tanh",
    "QuickGELUActivation": None, "ClippedGELUActivation": None, "MishActivation": None,
    "SiLUActivation": "silu", "LaplaceActivation": None, "ReLUSquaredActivation": None,
    "LinearActivation": None, "GELU": "gelu", "SiLU": "silu", "Mish": None,
}
NORM_SUFFIXES = ("RMSNorm", "LayerNorm", "GroupNorm", "LayerNorm2d")


def _kind(module_type: str):
    name = module_type.rsplit(".", 1)[-1]
    if name in ACTIVATION_MODULES:
        return "activation", ACTIVATION_MODULES[name]
    if name.endswith(NORM_SUFFIXES):
        return "norm", None
    return None, None


def fuse_modules(program: Program, kind_of=None) -> Program:
    """A new program with known written-out activation/norm modules fused (the input is kept).
    ``kind_of(module_type) -> (kind, gate)`` picks the modules (default: the known torch and
    Hugging Face classes)."""
    kind_of = kind_of or _kind
    consumers = program.consumers()
    outputs = set(program.outputs)
    const = set(program.constants)
    eqns = list(program.eqns)
    new: list = []
    i = 0
    changed = False
    while i < len(eqns):
        e = eqns[i]
        kind, gate = kind_of(e.source.module_type)
        j = i
        while kind and j + 1 < len(eqns) and eqns[j + 1].source == e.source:
            j += 1
        run = eqns[i:j + 1]
        fused = _try_fuse(run, kind, gate, consumers, outputs, const) if kind and len(run) > 1 else None
        if fused is None:
            new.append(e)
            i += 1
            continue
        new.append(fused)
        changed = True
        i = j + 1
    if not changed:
        return program
    return Program(program.inputs, program.constants, tuple(new), program.outputs,
                   program.output_names, program.const_values, program.const_kinds).validate()


def _try_fuse(run, kind, gate, consumers, outputs, const):
    defined = {o for e in run for o in e.outputs}
    inputs: list[Var] = []
    for e in run:
        for v in e.inputs:
            if v not in defined and v not in inputs:
                inputs.append(v)
    live = [o for o in defined if o in outputs or any(c not in run for c in consumers.get(o, []))]
    if len(live) != 1:
        return None
    out = live[0]
    variable = [v for v in inputs if v not in const]
    if len(variable) != 1 or variable[0].shape != out.shape or not out.is_float:
        return None
    body = FusedBody(tuple(run), tuple(inputs), out, run[0].source.module_type, kind, gate)
    return Eqn(FUSED_OP, tuple(inputs), {"body": body}, (out,), run[0].source)
