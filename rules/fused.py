"""Fused written-out activation and norm modules (``dlbjax.fused``; spec §4.8, §9.4, §9.6)."""

from __future__ import annotations

from dlbjax.lowerings.fused import FUSED_OP

from ._registry import register
from .elementwise import EXPERIMENTAL_GATES

__all__ = []


def _fused_identity(ctx, R, *args, body):
    """A fused written-out activation or norm module (``dlbjax/passes/fuse.py``) is one element-wise op:
    identity from its output to its single non-constant input (§4.8, §9.4, §9.6)."""
    return tuple(R if ctx.carrying(i) else None for i in range(len(args)))


def _fused_gate(args, kwargs, options):
    key = kwargs["body"].gate
    return EXPERIMENTAL_GATES[key] if key and options.experimental_gating else None


def _fused_check(carries):
    if sum(1 for c in carries if c) != 1:
        return "a fused module with several relevance-carrying inputs is not element-wise"
    return None


register(FUSED_OP, default=_fused_identity, gate=_fused_gate, check=_fused_check,
         shared=True, section="§4.8, §9.4, §9.6")
