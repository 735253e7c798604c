"""The rule registry: relevance rules keyed by (operator, method), DLBacktrace's as the default.

A rule is a pure JAX function ``rule(ctx, R, *args, **kwargs)``:

* ``args``/``kwargs`` are the equation's arguments with arrays in place of graph values (the
  recorded forward inputs);
* ``R`` is the relevance of the output: an array in default mode, a :class:`Streams` pair
  ``(positive, negative)`` in contrastive mode; for a multi-output op a tuple with one entry per
  output (``None`` for outputs that carry no relevance);
* it returns one entry per positional argument: ``None`` where nothing flows back, the relevance
  (an array, or a Streams pair) for a relevance-carrying argument, and a list for a list argument
  (``cat``). A rule whose bias or constant addend keeps relevance returns
  ``RuleResult(per_argument, absorbed)`` instead, ``absorbed`` being the kept total (a scalar;
  in contrastive mode a Streams pair of scalars, or None).

``ctx.carries`` mirrors ``args`` with booleans saying which arguments carry relevance (spec §9.1),
``ctx.gate`` is the activation entry gating an affine op (§2.2, §8.1), ``ctx.outputs`` holds the
recorded outputs, ``ctx.info`` static facts from the graph analysis (``{"attention": i}`` when
operand i of a product is a softmax output). The engine wraps every rule in a ``jax.custom_vjp``
whose forward is the op's lowering, so the whole relevance pass is one VJP of the model's forward.

Methods: ``"dlb"`` (the DLBacktrace rules of the specification) is the default and must cover
every relevance-carrying op. Another method registers rules for the ops it changes; every other op
keeps its DLB rule (:func:`get_rule`). ``Options.method`` picks the method for a whole pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional

from dlbjax._errors import DuplicateRegistrationError
from dlbjax._types import Streams

__all__ = ["Rule", "RULES", "RULE_TABLE", "register", "get_rule", "methods", "Streams",
           "RuleContext", "RuleResult", "GateSpec", "PER_STREAM", "Options", "carried", "DLB"]

DLB = "dlb"  # the default method: DLBacktrace's rules (the specification)
PER_STREAM = "per-stream"  # contrastive rule = the default rule applied to each stream (linear rules)


@dataclass(frozen=True)
class GateSpec:
    """An activation-table entry (spec §2.2): bounds and, for non-monotone entries, the function."""

    name: str
    lower: Optional[float] = None
    upper: Optional[float] = None
    fn: Optional[Callable] = None  # set for non-monotone entries only
    tol: float = 1e-5


@dataclass(frozen=True)
class Options:
    """Static rule options (part of the compiled function's identity)."""

    mode: str = "default"
    experimental_gating: bool = False
    product_rule: str = "half"
    phi: float = 0.5  # attention value fraction (spec §4.9 step 2, §9.8)
    router_relevance: bool = False  # MoE routing weights carry relevance (issue: MoE)
    method: str = DLB  # which registered rules to use (see the module docstring)

    @property
    def contrastive(self) -> bool:
        return self.mode == "contrastive"


@dataclass(frozen=True)
class RuleContext:
    carries: tuple
    outputs: tuple
    gate: Optional[GateSpec]
    options: Options
    op: str
    where: str
    info: dict = field(default_factory=dict)  # static facts from the analysis (e.g. attention)
    magnitudes: dict = field(default_factory=dict)  # arg position -> precomputed |constant arg|

    @property
    def out(self):
        return self.outputs[0]

    def carrying(self, i: int) -> bool:
        return carried(self.carries[i]) if i < len(self.carries) else False

    def magnitude(self, i: int):
        """|args[i]| precomputed once per Explainer for a constant weight, or None (compute it)."""
        return self.magnitudes.get(i)


class RuleResult(NamedTuple):
    """What a rule that keeps relevance returns: the per-argument relevance and the kept total."""

    relevance: tuple
    absorbed: Any = None


@dataclass(frozen=True)
class Rule:
    """How relevance crosses one operator under one method.

    ``default``/``contrastive``: the rule functions (``contrastive=PER_STREAM`` reuses the default
    rule on each stream, valid for rules that are linear in R). ``affine``: the op is a Linear/Conv
    unit that the activation consuming it gates (§8.1). ``route``: an exact index map that may
    also route integer token ids (embedding indices). ``gate``: for activations, a function
    ``(args, kwargs, options) -> GateSpec | None`` giving the table entry they supply to their
    producer. ``outputs``: indices of outputs that carry relevance (others are constants, e.g. the
    mean/rstd of layer_norm). ``check``: ``(carries) -> reason | None`` rejects argument patterns the
    rule does not cover. ``family``: the ``rules/<family>.py`` module that registered it.
    """

    op: str
    method: str
    default: Callable
    contrastive: Any = PER_STREAM
    affine: bool = False
    route: bool = False
    gate: Optional[Callable] = None
    outputs: Optional[tuple] = None
    check: Optional[Callable] = None
    section: str = ""
    family: str = ""


_TABLE: dict[tuple[str, str], Rule] = {}
RULE_TABLE: Mapping[tuple[str, str], Rule] = MappingProxyType(_TABLE)


class _DefaultRules(Mapping):
    """Read-only view ``op -> Rule`` of the default (DLB) method."""

    def __getitem__(self, op: str) -> Rule:
        return _TABLE[(op, DLB)]

    def __iter__(self):
        return (op for op, m in _TABLE if m == DLB)

    def __len__(self) -> int:
        return sum(1 for _, m in _TABLE if m == DLB)


RULES: Mapping[str, Rule] = _DefaultRules()


def register(*ops: str, default: Callable, contrastive: Any = PER_STREAM, affine: bool = False,
             route: bool = False, gate: Optional[Callable] = None, outputs: Optional[tuple] = None,
             check: Optional[Callable] = None, section: str = "", method: str = DLB) -> tuple:
    """Register ``default`` (and ``contrastive``) as the ``method`` rule of the given ATen ops.

    Each (op, method) pair has one rule: registering it again raises DuplicateRegistrationError.
    Returns the registered Rule records."""
    family = sys._getframe(1).f_globals.get("__name__", "").rsplit(".", 1)[-1]  # the caller
    out = []
    for op in ops:
        if (op, method) in _TABLE:
            raise DuplicateRegistrationError(
                f"{op} already has a {method!r} rule (from rules/{_TABLE[(op, method)].family}.py); "
                "register another method instead of replacing it")
        rule = Rule(op, method, default, contrastive, affine, route, gate, outputs, check, section,
                    family)
        _TABLE[(op, method)] = rule
        out.append(rule)
    return tuple(out)


def carried(c) -> bool:
    """Whether an entry of a carry mask (a bool, or a list of bools for list arguments) is set."""
    return any(carried(x) for x in c) if isinstance(c, (list, tuple)) else bool(c)


def get_rule(op: str, method: str = DLB) -> Optional[Rule]:
    """The ``method`` rule of ``op``, or its DLB rule when the method does not override it."""
    return _TABLE.get((op, method)) or _TABLE.get((op, DLB))


def methods() -> tuple:
    """Every registered method name (``"dlb"`` first)."""
    names = sorted({m for _, m in _TABLE} - {DLB})
    return (DLB,) + tuple(names)
