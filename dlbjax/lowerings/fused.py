"""The ``dlbjax.fused`` operator: a written-out element-wise module replaced by one equation.

The fusion pass (``dlbjax/passes/fuse.py``) finds a known activation or norm module written out of
primitive ops and replaces its equations by one ``dlbjax.fused`` equation whose ``body`` keyword
holds the original equations; the forward below replays them unchanged, and the relevance rule
(``rules/fused.py``) is the identity to its single non-constant input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlbjax.ir import Var, substitute

from ._table import call_lowering, lowering

__all__ = ["FUSED_OP", "FusedBody"]

FUSED_OP = "dlbjax.fused"


@dataclass(frozen=True, eq=False)
class FusedBody:
    """The original equations of a fused module; ``inputs`` are read in ``args`` order."""

    eqns: tuple
    inputs: tuple
    output: Var
    module_type: str
    kind: str  # "activation" or "norm"
    gate: str | None

    def __repr__(self) -> str:
        return f"<{self.module_type}: {len(self.eqns)} eqns>"


@lowering(FUSED_OP)
def fused(*args, body: FusedBody):
    """Forward of a fused module: its original equations, unchanged."""
    env: dict[Var, Any] = dict(zip(body.inputs, args))
    for eqn in body.eqns:
        for var, value in zip(eqn.outputs, call_lowering(eqn, substitute(eqn.args, env),
                                                         substitute(eqn.kwargs, env))):
            env[var] = value
    return env[body.output]
