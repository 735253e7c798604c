"""What dlbjax computes a program in (``compute_dtype``, spec §7.3).

``compute_dtype="float32"`` (the Explainer's default): a half-precision model is computed in
float32. Every bfloat16/float16 value of the imported program -- inputs, parameters and buffers,
intermediate values and the dtype arguments of casts (``x.to(bf16)``, ``torch.full(...,
dtype=bf16)``) -- becomes float32. The weights and inputs keep their half-precision *values* (they
are exactly representable in float32); only the arithmetic is wider. Torch's half-precision
forward rounds every intermediate result to bf16/fp16 and dlbjax's float32 forward does not, so
``Explanation.prediction`` differs from ``model(x)`` by the half-precision rounding error (bf16:
about 1e-2 relative, fp16: about 1e-3), and on a near-tie the argmax (the default target) can
differ. The relevance equals explaining ``model.float()`` on ``x.float()``; callers still pass
half-precision inputs (as to the model); results are float32. A float32 model is unchanged.

``compute_dtype="bfloat16"`` / ``"float16"`` (half compute, for accelerators): the forward runs in
the half dtype, as a half-precision model computes it, and the rules accumulate in float32.
Precisely:

* **half**: every float parameter and buffer (a float32 model's weights are cast once, which halves
  weight memory, and so is the precomputed |W|); every intermediate value of the forward (each op
  rounds its result to the half dtype, as torch's half forward does; matmuls and convolutions
  accumulate in float32 inside XLA); the dtype arguments of casts to float32 or float16 in a
  float32 model. A half-precision model's own float32 islands (``hidden.to(torch.float32)`` in
  an RMSNorm, a float32 buffer) stay float32, as the model computes them; a float16 model asked
  for bfloat16 has its float16 values made bfloat16.
* **float32**: the program's float inputs and outputs (the interface: callers pass the model's
  dtype, the first equations round it to the half dtype, the last ones widen the outputs), so
  the prediction and the relevance returned at every input are float32;
  token-id relevance (always float32); inside the dense/conv/matmul rule (``rules/_math.py``:
  ``linear_operator_rule``) the positive and negative sums P, N, the magnitude sum S = |x| |W|,
  the denominator D, the ratio R / D and both transposed products (R / D) |W| and (R / D) W, from
  the half x and W upcast (each product of two half numbers is exact in float32, so this equals
  a half GEMM with ``preferred_element_type=float32``); likewise the unit rule of adds, pools
  and reductions (``unit_rule``: P, N, D and the coefficients), the bilinear rule of a product of
  two activations (attention Q K^T and A V written out, ``rules/affine.py``) and AttnLRP's norm
  rules (``rules/norm.py``; DLB's norm rules are identities). Not yet: the fused SDPA rule
  (``rules/attention.py``, computed in the half dtype) and the pooling rules that do not go
  through ``unit_rule``.
* **half at the boundaries**: the relevance *between* two equations is the cotangent of the
  forward value in the VJP (``engine/relevance.py``), and JAX gives a cotangent its primal's dtype,
  so each rule's result is rounded to the half dtype once where it is handed on (bf16: 2^-9
  relative, unbiased; the per-equation float32 work above keeps the rounding from compounding
  inside a rule). Carrying float32 relevance between equations needs the engine to give each
  half value a float32 stream leaf of its own (``_Carried(value, streams)`` with
  ``streams = value.astype(float32)``), which it does not do yet.

Measured against the float32 explanation (``benchmarks/bench_precision.py``,
``benchmarks/RESULTS.md`` section (i), seeded tiny models, default / contrastive mode): bf16
relevance rel. L2 error MLP 2.2e-3 / 2.7e-3, CNN 1.5e-2 / 3.4e-2 (max error 4e-2 / 1e-1), BERT
1.9e-3 / 3.7e-2, LLaMA 1.6e-3 / 7.7e-4, GPT-2 2.6e-3 / 1.2e-3; top-5 token agreement 0.90-1.00,
the same target on every row; prediction error 5e-3. fp16 is about 8x closer. Decision: float32
stays the default on every backend (no ``"auto"``): bf16 is a usable opt-in where memory limits,
not a faithful stand-in (up to 4e-2 L2 / 1e-1 max error), and no GPU timing weighs against that
yet (``benchmarks/gpu_check.py``).

``compute_dtype=None`` keeps the model's arithmetic (relevance then has the model's dtype and its
rounding everywhere, rules included; not recommended). ``"float64"`` needs ``jax_enable_x64``.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_dtypes
import numpy as np

from dlbjax.ir import Eqn, Program, Source, Var
from dlbjax.lowerings.fused import FusedBody

__all__ = ["HALF_DTYPES", "resolve_compute_dtype", "promote_program", "half_program"]

HALF_DTYPES = frozenset({"bfloat16", "float16"})
_ALLOWED = ("float32", "float64", "bfloat16", "float16")


def resolve_compute_dtype(program: Program, compute_dtype: Any) -> tuple[Program, Optional[str]]:
    """(program to compile, the dtype it is computed in where that differs from the model's, or
    None)."""
    if compute_dtype is None:
        return program, None
    name = str(compute_dtype).replace("torch.", "")
    if name not in _ALLOWED:
        raise ValueError(f"compute_dtype must be 'float32', 'bfloat16', 'float16', 'float64' or "
                         f"None, not {compute_dtype!r}")
    if name == "float64":
        import jax
        if not jax.config.jax_enable_x64:
            raise ValueError("compute_dtype='float64' needs jax_enable_x64 "
                             "(jax.config.update('jax_enable_x64', True))")
    if name in HALF_DTYPES:
        return half_program(program, name), name
    if not _has_half(program):
        return program, None
    return promote_program(program, name), name


def _has_half(program: Program) -> bool:
    vs = list(program.inputs) + list(program.constants) + [o for e in program.eqns for o in e.outputs]
    return any(v.dtype in HALF_DTYPES for v in vs)


def promote_program(program: Program, target: str = "float32") -> Program:
    """A copy of ``program`` with every bfloat16/float16 value and dtype literal made ``target``."""
    return _convert(program, HALF_DTYPES, target)


def half_program(program: Program, target: str = "bfloat16") -> Program:
    """A copy of ``program`` computed in the half dtype ``target`` (module docstring): a float32
    model's float32 values and literals (a half model's other half dtype) become ``target``, and
    every float input stays a float32 interface followed by a cast to ``target``."""
    if _has_half(program):
        sources = HALF_DTYPES - {target}
    else:
        sources = frozenset({"float32", "float16"}) - {target}
    return _convert(program, sources, target, interface="float32")


def _convert(program: Program, sources, target: str, interface: Optional[str] = None) -> Program:
    mapping: dict[Var, Var] = {}
    names = {v.name for v in program.inputs} | {c.name for c in program.constants} | \
        {o.name for e in program.eqns for o in e.outputs}

    def var(v: Var) -> Var:
        if v in mapping:
            return mapping[v]
        if v.dtype not in sources:
            return v
        mapping[v] = Var(v.name, v.shape, target)
        return mapping[v]

    def lit(a):
        if isinstance(a, Var):
            return var(a)
        if isinstance(a, str) and a in sources:
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

    inputs, casts = [], []
    for v in program.inputs:
        if interface is None or v.dtype not in (set(sources) | {target, interface}):
            inputs.append(var(v))
            continue
        # a float interface, rounded to the compute dtype by the first equation
        inner = f"{v.name}_{target}"
        while inner in names:
            inner += "_"
        names.add(inner)
        mapping[v] = Var(inner, v.shape, target)
        outer = Var(v.name, v.shape, interface)
        inputs.append(outer)
        casts.append(Eqn("aten._to_copy.default", (outer,), {"dtype": target}, (mapping[v],),
                         Source()))
    values = {}
    for c in program.constants:
        value = program.const_values[c.name]
        values[c.name] = np.asarray(value, _np_dtype(target)) if c.dtype in sources else value
    eqns = tuple(casts) + tuple(eqn(e) for e in program.eqns)
    outputs = tuple(var(v) for v in program.outputs)
    if interface is not None:
        # float outputs leave as the interface dtype too (the prediction is float32)
        produced = {o for e in eqns for o in e.outputs}
        wide, ends = [], []
        for v in outputs:
            if v.dtype == target and v in produced and v not in wide:
                name = f"{v.name}_{interface}"
                while name in names:
                    name += "_"
                names.add(name)
                out = Var(name, v.shape, interface)
                ends.append(Eqn("aten._to_copy.default", (v,), {"dtype": interface}, (out,),
                                Source()))
                wide.append(v)
        cast = {v: e.outputs[0] for v, e in zip(wide, ends)}
        outputs = tuple(cast.get(v, v) for v in outputs)
        eqns = eqns + tuple(ends)
    return Program(tuple(inputs), tuple(var(c) for c in program.constants), eqns, outputs,
                   program.output_names, values, dict(program.const_kinds)).validate()


def _np_dtype(name: str):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
