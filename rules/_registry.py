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
every relevance-carrying op. Another method registers rules for the ops it changes; what it does
not register comes from its parent (:func:`declare_method`) and finally from DLB: every DLB rule
for an undeclared method, only the DLB rules registered ``shared=True`` (method-independent
facts: exact index maps, identities of activations and norms, winner-takes-all max, products)
for a method declared with ``dlb="shared"`` (the LRP family), so that an op such a method has no
rule for is reported, never explained with another method's rule (:func:`get_rule`).
``Options.method`` picks the method of a pass, ``Options.params`` its parameters (handed to the
rules as ``ctx.params``), ``Options.choices`` a (method, params) pair per equation (composites).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional

from dlbjax._errors import DuplicateRegistrationError
from dlbjax._types import Streams

__all__ = ["Rule", "RULES", "RULE_TABLE", "register", "get_rule", "methods", "Streams",
           "RuleContext", "RuleResult", "GateSpec", "PER_STREAM", "Options", "carried", "DLB",
           "Method", "declare_method", "declared_methods"]

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
    params: tuple = ()  # the method's parameters, sorted (name, value) pairs (ctx.params)
    # composites: one (method, params) per equation index; () = ``method`` for every equation
    choices: tuple = field(default=(), repr=False)

    @property
    def contrastive(self) -> bool:
        return self.mode == "contrastive"

    def choice(self, index: int) -> tuple:
        """(method, params) of equation ``index``."""
        if self.choices and index < len(self.choices) and self.choices[index] is not None:
            return self.choices[index]
        return self.method, self.params

    def rule(self, index: int, op: str) -> Optional["Rule"]:
        """The rule equation ``index`` (an ``op``) runs under these options."""
        return get_rule(op, self.choice(index)[0])


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
    params: dict = field(default_factory=dict)  # the method's parameters (epsilon, gamma, ...)

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
    shared: bool = False  # a method-independent DLB rule that methods declared dlb="shared" reuse


@dataclass(frozen=True)
class Method:
    """A declared rule method: ``parent`` fills in the ops it does not register; ``dlb`` says
    which DLB rules fill in after that: ``"all"`` or ``"shared"`` (only rules registered
    ``shared=True``; any other op is unsupported under this method)."""

    name: str
    parent: Optional[str] = None
    dlb: str = "all"
    doc: str = ""


_METHODS: dict[str, Method] = {}


def declare_method(name: str, parent: Optional[str] = None, dlb: str = "all",
                   doc: str = "") -> Method:
    """Declare a rule method (see :class:`Method`); declaring a name twice raises
    DuplicateRegistrationError."""
    if name in _METHODS or name == DLB:
        raise DuplicateRegistrationError(f"method {name!r} is already declared")
    if dlb not in ("all", "shared"):
        raise ValueError(f"dlb must be 'all' or 'shared', not {dlb!r}")
    if parent is not None and parent != DLB and parent not in _METHODS:
        raise ValueError(f"parent method {parent!r} of {name!r} is not declared")
    m = Method(name, None if parent == DLB else parent, dlb, doc)
    _METHODS[name] = m
    return m


def declared_methods() -> Mapping[str, Method]:
    """Every declared method by name (DLB is not declared: it is the base)."""
    return MappingProxyType(_METHODS)


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
             check: Optional[Callable] = None, section: str = "", method: str = DLB,
             shared: bool = False) -> tuple:
    """Register ``default`` (and ``contrastive``) as the ``method`` rule of the given ATen ops.

    ``shared``: a DLB rule that holds for every method (see the module docstring). Each
    (op, method) pair has one rule: registering it again raises DuplicateRegistrationError.
    Returns the registered Rule records."""
    family = sys._getframe(1).f_globals.get("__name__", "").rsplit(".", 1)[-1]  # the caller
    out = []
    for op in ops:
        if (op, method) in _TABLE:
            raise DuplicateRegistrationError(
                f"{op} already has a {method!r} rule (from rules/{_TABLE[(op, method)].family}.py); "
                "register another method instead of replacing it")
        rule = Rule(op, method, default, contrastive, affine, route, gate, outputs, check, section,
                    family, shared)
        _TABLE[(op, method)] = rule
        out.append(rule)
    return tuple(out)


def carried(c) -> bool:
    """Whether an entry of a carry mask (a bool, or a list of bools for list arguments) is set."""
    return any(carried(x) for x in c) if isinstance(c, (list, tuple)) else bool(c)


def get_rule(op: str, method: str = DLB) -> Optional[Rule]:
    """The ``method`` rule of ``op``; else its parents' (declared methods); else its DLB rule,
    which a method declared ``dlb="shared"`` takes only when it is registered ``shared=True``.
    None: the method has no rule for ``op``."""
    m, only_shared = method, False
    while m is not None and m != DLB:
        rule = _TABLE.get((op, m))
        if rule is not None:
            return rule
        decl = _METHODS.get(m)
        if decl is None:
            break
        only_shared = only_shared or decl.dlb == "shared"
        m = decl.parent
    rule = _TABLE.get((op, DLB))
    if rule is not None and only_shared and not rule.shared:
        return None
    return rule


def methods() -> tuple:
    """Every registered or declared method name (``"dlb"`` first)."""
    names = sorted(({m for _, m in _TABLE} | set(_METHODS)) - {DLB})
    return (DLB,) + tuple(names)
