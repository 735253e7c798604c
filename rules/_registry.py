"""The rule registry: one relevance rule per ATen operator, for default and contrastive mode.

A rule is a pure JAX function ``rule(ctx, R, *args, **kwargs)``:

* ``args``/``kwargs`` are the equation's arguments with arrays in place of graph values (the
  recorded forward inputs);
* ``R`` is the relevance of the output: an array in default mode, a :class:`Streams` pair
  ``(positive, negative)`` in contrastive mode; for a multi-output op a tuple with one entry per
  output (``None`` for outputs that carry no relevance);
* it returns one entry per positional argument: ``None`` where nothing flows back, the relevance
  (an array, or a Streams pair) for a relevance-carrying argument, and a list for a list argument
  (``cat``). Relevance kept by a bias or a constant addend is reported with ``ctx.absorb``.

``ctx.carries`` mirrors ``args`` with booleans saying which arguments carry relevance (spec §9.1),
``ctx.gate`` is the activation entry gating an affine op (§2.2, §8.1), ``ctx.outputs`` holds the
recorded outputs, ``ctx.info`` static facts from the graph analysis (``{"attention": i}`` when
operand i of a product is a softmax output). The engine wraps every rule in a ``jax.custom_vjp`` whose forward is the op's
lowering, so the whole relevance pass is one VJP of the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp

__all__ = ["Rule", "RULES", "register", "get_rule", "Streams", "RuleContext", "GateSpec",
           "PER_STREAM", "Options", "carried"]


class Streams(NamedTuple):
    """The two non-negative relevance maps of contrastive mode (spec §3.1)."""

    positive: Any
    negative: Any


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

    @property
    def contrastive(self) -> bool:
        return self.mode == "contrastive"


@dataclass
class RuleContext:
    carries: tuple
    outputs: tuple
    gate: Optional[GateSpec]
    options: Options
    op: str
    where: str
    absorbed: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # static facts from the analysis (e.g. attention)
    magnitudes: dict = field(default_factory=dict)  # arg position -> precomputed |constant arg|

    @property
    def out(self):
        return self.outputs[0]

    def absorb(self, amount) -> None:
        """Record relevance kept by a bias or constant (an array or a Streams pair of arrays)."""
        self.absorbed.append(amount)

    def carrying(self, i: int) -> bool:
        return carried(self.carries[i]) if i < len(self.carries) else False

    def magnitude(self, i: int):
        """|args[i]| precomputed once per Explainer for a constant weight, or None (compute it)."""
        return self.magnitudes.get(i)


@dataclass(frozen=True)
class Rule:
    """How relevance crosses one operator.

    ``default``/``contrastive``: the rule functions (``contrastive=PER_STREAM`` reuses the default
    rule on each stream, valid for rules that are linear in R). ``affine``: the op is a Linear/Conv
    unit that the activation consuming it gates (§8.1). ``route``: an exact index map that may
    also route integer token ids (embedding indices). ``gate``: for activations, a function
    ``(args, kwargs, options) -> GateSpec | None`` giving the table entry they supply to their
    producer. ``outputs``: indices of outputs that carry relevance (others are constants, e.g. the
    mean/rstd of layer_norm). ``check``: ``(carries) -> reason | None`` rejects argument patterns the
    rule does not cover.
    """

    default: Callable
    contrastive: Any = PER_STREAM
    affine: bool = False
    route: bool = False
    gate: Optional[Callable] = None
    outputs: Optional[tuple] = None
    check: Optional[Callable] = None
    section: str = ""


RULES: dict[str, Rule] = {}


def register(*ops: str, default: Callable, contrastive: Any = PER_STREAM, affine: bool = False,
             route: bool = False, gate: Optional[Callable] = None, outputs: Optional[tuple] = None,
             check: Optional[Callable] = None, section: str = "") -> Rule:
    """Register ``default`` (and ``contrastive``) as the relevance rule of the given ATen ops."""
    rule = Rule(default, contrastive, affine, route, gate, outputs, check, section)
    for op in ops:
        RULES[op] = rule
    return rule


def carried(c) -> bool:
    """Whether an entry of a carry mask (a bool, or a list of bools for list arguments) is set."""
    return any(carried(x) for x in c) if isinstance(c, (list, tuple)) else bool(c)


def get_rule(op: str) -> Optional[Rule]:
    return RULES.get(op)


def zeros_like_streams(x, contrastive: bool):
    z = jnp.zeros_like(x)
    return Streams(z, z) if contrastive else z
