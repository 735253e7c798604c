"""The forward op-lowering table: one :class:`Lowering` per operator, and how to apply it.

A lowering takes the operator's arguments in ATen's order and names (arrays where the graph had
tensors) and returns a JAX array (a tuple for multi-output ops). Everything the rest of dlbjax
needs to know about an operator's forward lives on its registration: whether the exporter keeps
it whole (``keep_whole``) and its :class:`Kind` flags, which the relevance analysis, the MoE
views and the hot-path passes query instead of keeping op-name sets of their own.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import jax.numpy as jnp

from dlbjax._dtypes import jnp_dtype
from dlbjax._errors import DuplicateRegistrationError, InvalidProgramError
from dlbjax.ir import Eqn

__all__ = ["Kind", "Lowering", "lowering", "register_lowering", "get_lowering", "LOWERINGS",
           "TABLE", "ops_of_kind", "keep_whole_ops", "call_lowering"]


class Kind(enum.Flag):
    """Static facts about an operator that the engine's passes ask for (spec section in brackets)."""

    NONE = 0
    NON_VALUE = enum.auto()    # the output depends on the input's shape/dtype only (§9.1)
    STATISTIC = enum.auto()    # a normalisation statistic: its branch carries no relevance (§9.4)
    INDEX_TABLE = enum.auto()  # argument 1 indexes a constant table: ids carry token relevance (§9.3)
    TRANSPARENT = enum.auto()  # returns its first operand's values (reshape, copy, cast; §9.8)
    SOFTMAX = enum.auto()      # a softmax: attention probabilities, a softmax head (§8.5, §9.8)
    SIGMOID = enum.auto()      # a sigmoid head (§8.5)
    MATMUL = enum.auto()       # a product of two operands: attention's A V when one is a softmax
    MAX = enum.auto()          # max over axes: the shift of a stabilised softmax (x - max x)
    SUBTRACT = enum.auto()     # a - b (with the above: the stabiliser pattern)
    SUM = enum.auto()          # sum over listed axes (MoE: the sum over the k selected experts)
    ROUTER = enum.auto()       # MoE top-k routing decision (no relevance unless router_relevance)
    CONV = enum.auto()         # a convolution with its weight at argument 1 in [out, in, *k]


@dataclass(frozen=True)
class Lowering:
    """One operator's forward: the JAX function and the facts about it."""

    op: str
    fn: Callable
    keep_whole: bool = False   # torch.export must not decompose it (a layer-level op)
    kinds: Kind = Kind.NONE
    family: str = ""           # the lowerings/<family>.py module that registered it


_TABLE: dict[str, Lowering] = {}
TABLE: Mapping[str, Lowering] = MappingProxyType(_TABLE)


class _Functions(Mapping):
    """A read-only view ``op -> fn`` of the table (what the interpreter and the tests index)."""

    def __getitem__(self, op: str) -> Callable:
        return _TABLE[op].fn

    def __iter__(self):
        return iter(_TABLE)

    def __len__(self) -> int:
        return len(_TABLE)


LOWERINGS: Mapping[str, Callable] = _Functions()


def register_lowering(op: str, fn: Callable, *, keep_whole: bool = False,
                      kinds: Kind = Kind.NONE, family: Optional[str] = None) -> Lowering:
    """Register ``fn`` as the forward of ``op``; a second registration of ``op`` raises.
    ``family``: the registering module's name (default: the caller's module)."""
    if family is None:
        family = sys._getframe(1).f_globals.get("__name__", "").rsplit(".", 1)[-1]
    if op in _TABLE:
        raise DuplicateRegistrationError(
            f"{op} already has a lowering (from lowerings/{_TABLE[op].family}.py); an operator has "
            "exactly one forward")
    entry = Lowering(op, fn, bool(keep_whole), kinds, family)
    _TABLE[op] = entry
    return entry


def lowering(*ops: str, keep_whole: bool = False, kinds: Kind = Kind.NONE):
    """Decorator: register a function as the forward of one or more operator overloads."""
    family = sys._getframe(1).f_globals.get("__name__", "").rsplit(".", 1)[-1]

    def deco(fn):
        for op in ops:
            register_lowering(op, fn, keep_whole=keep_whole, kinds=kinds, family=family)
        return fn

    return deco


def get_lowering(op: str) -> Optional[Lowering]:
    return _TABLE.get(op)


def ops_of_kind(kind: Kind) -> frozenset:
    """Every registered operator with all the flags of ``kind``."""
    return frozenset(op for op, e in _TABLE.items() if kind in e.kinds)


def is_kind(op: str, kind: Kind) -> bool:
    entry = _TABLE.get(op)
    return entry is not None and kind in entry.kinds


def keep_whole_ops() -> tuple:
    """The operators torch.export must keep whole, in registration order."""
    return tuple(op for op, e in _TABLE.items() if e.keep_whole)


def call_lowering(eqn: Eqn, args: Sequence, kwargs: Mapping[str, Any]) -> tuple:
    """Apply the forward of ``eqn`` and return its outputs as a tuple, cast to torch's dtypes."""
    fn = _TABLE[eqn.op].fn
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
