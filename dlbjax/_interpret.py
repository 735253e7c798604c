"""Run a :class:`~dlbjax.ir.Program` forward in JAX with the op-lowering table."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ._errors import InvalidProgramError, UnsupportedOp, UnsupportedOperationError
from . import _attention  # noqa: F401  (registers the attention lowering)
from ._fuse import FUSED_OP, FusedBody
from ._lowering import LOWERINGS, jnp_dtype, lowering
from .ir import Eqn, Program, Var

__all__ = ["evaluate", "substitute", "call_lowering", "constants_to_jax", "missing_lowerings"]


def substitute(obj: Any, env: Mapping[Var, Any]) -> Any:
    """Replace every Var inside a nested argument structure by its value in ``env``."""
    if isinstance(obj, Var):
        return env[obj]
    if isinstance(obj, list):
        return [substitute(o, env) for o in obj]
    if isinstance(obj, tuple):
        return tuple(substitute(o, env) for o in obj)
    if isinstance(obj, Mapping):
        return {k: substitute(v, env) for k, v in obj.items()}
    return obj


def call_lowering(eqn: Eqn, args: Sequence, kwargs: Mapping) -> tuple:
    """Apply the forward of ``eqn`` and return its outputs as a tuple, cast to torch's dtypes."""
    fn = LOWERINGS[eqn.op]
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if len(outs) != len(eqn.outputs):
        raise InvalidProgramError(
            f"lowering of {eqn.op} returned {len(outs)} values, torch recorded {len(eqn.outputs)}")
    result = []
    for var, value in zip(eqn.outputs, outs):
        value = jnp.asarray(value)
        if tuple(value.shape) != tuple(var.shape):
            raise InvalidProgramError(
                f"lowering of {eqn.op} (module {eqn.source}) produced shape {tuple(value.shape)} but "
                f"torch recorded {var.shape} for '{var.name}'")
        dtype = jnp_dtype(var.dtype)
        result.append(value if value.dtype == dtype else value.astype(dtype))
    return tuple(result)


@lowering(FUSED_OP)
def _fused(*args, body: FusedBody):
    """Forward of a fused module: its original equations, unchanged."""
    env: dict[Var, Any] = dict(zip(body.inputs, args))
    for eqn in body.eqns:
        for var, value in zip(eqn.outputs, call_lowering(eqn, substitute(eqn.args, env),
                                                         substitute(eqn.kwargs, env))):
            env[var] = value
    return env[body.output]


def constants_to_jax(program: Program) -> dict[str, jnp.ndarray]:
    """The program's constant values as JAX arrays (int64 -> int32 unless x64 is enabled)."""
    out = {}
    for var in program.constants:
        value = program.const_values[var.name]
        out[var.name] = jnp.asarray(np.asarray(value), dtype=jnp_dtype(var.dtype))
    return out


def missing_lowerings(program: Program) -> list[UnsupportedOp]:
    seen, out = set(), []
    for e in program.eqns:
        if e.op not in LOWERINGS and (e.op, e.source.module_path) not in seen:
            seen.add((e.op, e.source.module_path))
            out.append(UnsupportedOp(e.op, e.source.module_path, e.source.module_type,
                                     "dlbjax has no forward lowering for this operator"))
    return out


def evaluate(program: Program, consts: Mapping[str, Any], inputs: Sequence[Any]) -> list:
    """The program's outputs for ``inputs`` (one array per program input, in order)."""
    missing = missing_lowerings(program)
    if missing:
        raise UnsupportedOperationError(missing)
    env: dict[Var, Any] = {}
    if len(inputs) != len(program.inputs):
        raise InvalidProgramError(f"expected {len(program.inputs)} inputs, got {len(inputs)}")
    for var, value in zip(program.inputs, inputs):
        env[var] = value
    for var in program.constants:
        env[var] = consts[var.name]
    for eqn in program.eqns:
        outs = call_lowering(eqn, substitute(eqn.args, env), substitute(eqn.kwargs, env))
        for var, value in zip(eqn.outputs, outs):
            env[var] = value
    return [env[v] for v in program.outputs]
