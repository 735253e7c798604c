"""Run a :class:`~dlbjax.ir.Program` forward in JAX with the lowering table."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlbjax._dtypes import jnp_dtype
from dlbjax._errors import InvalidProgramError, UnsupportedOp, UnsupportedOperationError
from dlbjax.ir import Program, Var, substitute
from dlbjax.lowerings import TABLE, call_lowering
from dlbjax.passes.layers import scan_weights

__all__ = ["evaluate", "constants_to_jax", "missing_lowerings"]


def constants_to_jax(program: Program) -> dict[str, jnp.ndarray]:
    """The program's constant values as JAX arrays (int64 -> int32 unless x64 is enabled).

    A value that already has its JAX dtype is placed with ``jax.device_put``, which on the CPU
    aliases a suitably aligned numpy array instead of copying it: a torch model's weights
    (zero-copy numpy views, ``importers/_translate.py``) are then shared, not duplicated. Values
    of another dtype (int64 ids without x64, half precision promoted to float32) and every value
    on an accelerator are copies. Either way the values are the same bits.
    """
    out = {}
    for var in program.constants:
        value = np.asarray(program.const_values[var.name])
        dtype = jnp_dtype(var.dtype)
        if value.dtype == np.dtype(dtype):
            out[var.name] = jax.device_put(value)
        else:
            out[var.name] = jnp.asarray(value, dtype=dtype)
    return out


def missing_lowerings(program: Program) -> list[UnsupportedOp]:
    seen, out = set(), []
    for e in program.eqns:
        if e.op not in TABLE and (e.op, e.source.module_path) not in seen:
            seen.add((e.op, e.source.module_path))
            out.append(UnsupportedOp(e.op, e.source.module_path, e.source.module_type,
                                     "dlbjax has no forward lowering for this operator"))
    return out


def evaluate(program: Program, consts: Mapping[str, Any], inputs: Sequence[Any],
             runs: tuple = ()) -> list:
    """The program's outputs for ``inputs`` (one array per program input, in order).

    ``runs``: runs of identical layers (``dlbjax.passes.layers.find_runs``), each computed as
    one ``jax.lax.scan`` over its weights, stacked in ``consts`` (``stack_weights``) or read in
    place (``scan_weights``)."""
    missing = missing_lowerings(program)
    if missing:
        raise UnsupportedOperationError(missing)
    env: dict[Var, Any] = {}
    if len(inputs) != len(program.inputs):
        raise InvalidProgramError(f"expected {len(program.inputs)} inputs, got {len(inputs)}")
    for var, value in zip(program.inputs, inputs):
        env[var] = value
    for var in program.constants:
        if var.name in consts:  # a scanned run's weights come stacked
            env[var] = consts[var.name]

    def step(eqn, env):
        outs = call_lowering(eqn, substitute(eqn.args, env), substitute(eqn.kwargs, env))
        for var, value in zip(eqn.outputs, outs):
            env[var] = value

    scan_at = {r.start: r for r in runs}
    i = 0
    while i < len(program.eqns):
        run = scan_at.get(i)
        how = scan_weights(run, consts) if run is not None else None
        if how is not None:
            template = [program.eqns[j] for j in run.template]
            xs, pick, in_place = how

            def body(carry, x, run=run, template=template, pick=pick):
                benv = dict(env)
                benv.update(zip(run.body_in, carry))
                benv.update(zip((tv for tv, _ in run.weights), pick(x)[0]))
                for eqn in template:
                    step(eqn, benv)
                return tuple(benv[v] for v in run.body_out), None

            if in_place:  # differentiated (gradient of the forward): no per-step weight copies
                body = jax.checkpoint(body)
            final, _ = jax.lax.scan(body, tuple(env[v] for v in run.init), xs,
                                    length=run.count)
            env.update(zip(run.final, final))
            i = run.stop
            continue
        step(program.eqns[i], env)
        i += 1
    return [env[v] for v in program.outputs]
