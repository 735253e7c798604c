"""Half-precision models: compute the imported program in float32 (spec §7.3).

Relevance is accumulated in float32: bf16 and fp16 activations and weights are upcast before P, N
and D are formed. dlbjax does this for the whole program at import: with ``compute_dtype="float32"``
(the Explainer's default) every bfloat16/float16 value of the imported program -- inputs,
parameters and buffers, intermediate values and the dtype arguments of casts (``x.to(bf16)``,
``torch.full(..., dtype=bf16)``) -- becomes float32. The weights and inputs keep their
half-precision *values* (they are exactly representable in float32); only the arithmetic is wider.

Effect on the prediction: torch's half-precision forward rounds every intermediate result to
bf16/fp16; dlbjax's float32 forward does not, so ``Explanation.prediction`` differs from
``model(x)`` by the half-precision rounding error (bf16: about 1e-2 relative, fp16: about 1e-3),
and on a near-tie the argmax (the default target) can differ. The relevance is that of the
float32 computation with the half-precision weights, which equals explaining ``model.float()`` on
``x.float()``. Callers still pass half-precision inputs (as to the model); results are float32.

``compute_dtype=None`` keeps the model's half-precision arithmetic (relevance then has the model's
dtype and its rounding; not recommended). ``"float64"`` needs ``jax_enable_x64``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dlbjax.ir import Eqn, Program, Var
from dlbjax.lowerings.fused import FusedBody

__all__ = ["HALF_DTYPES", "resolve_compute_dtype", "promote_program"]

HALF_DTYPES = frozenset({"bfloat16", "float16"})
_ALLOWED = ("float32", "float64")


def resolve_compute_dtype(program: Program, compute_dtype: Any) -> tuple[Program, Optional[str]]:
    """(program to compile, the dtype half-precision values are computed in, or None)."""
    if compute_dtype is None:
        return program, None
    name = str(compute_dtype).replace("torch.", "")
    if name not in _ALLOWED:
        raise ValueError(f"compute_dtype must be 'float32', 'float64' or None, not {compute_dtype!r}")
    if name == "float64":
        import jax
        if not jax.config.jax_enable_x64:
            raise ValueError("compute_dtype='float64' needs jax_enable_x64 "
                             "(jax.config.update('jax_enable_x64', True))")
    if not _has_half(program):
        return program, None
    return promote_program(program, name), name


def _has_half(program: Program) -> bool:
    vs = list(program.inputs) + list(program.constants) + [o for e in program.eqns for o in e.outputs]
    return any(v.dtype in HALF_DTYPES for v in vs)


def promote_program(program: Program, target: str = "float32") -> Program:
    """A copy of ``program`` with every bfloat16/float16 value and dtype literal made ``target``."""
    mapping: dict[Var, Var] = {}

    def var(v: Var) -> Var:
        if v.dtype not in HALF_DTYPES:
            return v
        if v not in mapping:
            mapping[v] = Var(v.name, v.shape, target)
        return mapping[v]

    def lit(a):
        if isinstance(a, Var):
            return var(a)
        if isinstance(a, str) and a in HALF_DTYPES:
            return target
        if isinstance(a, FusedBody):
            return FusedBody(tuple(eqn(e) for e in a.eqns), tuple(var(v) for v in a.inputs),
                             var(a.output), a.module_type, a.kind, a.gate)
        if isinstance(a, list):
            return [lit(x) for x in a]
        if isinstance(a, tuple):
            return tuple(lit(x) for x in a)
        if isinstance(a, dict):
            return {k: lit(x) for k, x in a.items()}
        return a

    def eqn(e: Eqn) -> Eqn:
        return Eqn(e.op, lit(e.args), lit(dict(e.kwargs)), tuple(var(o) for o in e.outputs),
                   e.source)

    values = {}
    for c in program.constants:
        value = program.const_values[c.name]
        values[c.name] = np.asarray(value, np.dtype(target)) if c.dtype in HALF_DTYPES else value
    return Program(tuple(var(v) for v in program.inputs), tuple(var(c) for c in program.constants),
                   tuple(eqn(e) for e in program.eqns), tuple(var(v) for v in program.outputs),
                   program.output_names, values, dict(program.const_kinds)).validate()
