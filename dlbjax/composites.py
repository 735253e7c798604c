"""Composites: LRP rules assigned per layer, as data.

A :class:`Composite` maps *selectors* to rules; the first selector (in the order given) that
matches an affine equation (dense, conv, a product with a constant weight) decides its rule.
Selectors:

* ``"first"``: the affine layers that read a float model input directly (through element-wise
  ops, index maps and pools, with no other affine layer between; Zennit's "first layer");
  ``"first-conv"``: those of them that are convolutions;
* a kind: ``"conv"`` (convolutions, transposed ones included), ``"linear"`` (``nn.Linear`` and
  products with a constant weight) or ``"affine"`` (both);
* an operator name (``"aten.conv2d.default"``);
* anything else is a glob on the module path (``"features.0"``, ``"layer4.*"``, ``"*head*"``),
  or on the module's class name with a ``type:`` prefix (``"type:Conv2d"``).

A rule is a method name of the LRP family (``"lrp-0"``, ``"lrp-epsilon"``, ``"lrp-gamma"``,
``"lrp-alpha-beta"``, ``"flat"``, ``"w-square"``, ``"zb"``) or a pair ``(name, {parameters})``.
Affine layers no selector matches get ``default`` (``"lrp-epsilon"``); every other op gets the
family's base rules (z-rule for sums and average pools, identities, exact index maps; see
``rules/_lrp.py``), with the composite's ``stabilizer``. ``canonize=True`` folds batch norm into
the layer before it first (``dlbjax/passes/canonize.py``).

Presets (Zennit's, Anders et al. 2021, same rules and defaults): :func:`EpsilonPlus`,
:func:`EpsilonPlusFlat`, :func:`EpsilonGammaBox`, :func:`EpsilonAlpha2Beta1`,
:func:`EpsilonAlpha2Beta1Flat`; as method names ``"epsilon-plus"``, ``"epsilon-plus-flat"``,
``"epsilon-gamma-box"``, ``"epsilon-alpha2-beta1"``, ``"epsilon-alpha2-beta1-flat"``.

>>> dlbjax.explain(model, x, method="epsilon-gamma-box", low=-2.1, high=2.6)
>>> dlbjax.explain(model, x, method=Composite({"first": "flat", "conv": ("lrp-gamma",
...     {"gamma": 0.5}), "classifier.*": "lrp-0"}))
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from dlbjax._errors import MethodError
from dlbjax.engine.gradient import ArrayOption
from dlbjax.ir import Program, Var
from dlbjax.rules import RULES
from dlbjax.rules._lrp import LRP, LRP_METHODS

__all__ = ["Composite", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1",
           "EpsilonAlpha2Beta1Flat", "PRESETS", "KINDS", "resolve", "first_layers"]

KINDS = ("first", "first-conv", "conv", "linear", "affine")
_CONV_OPS = frozenset(op for op in RULES if "conv" in op)
# the parameters each LRP method reads (the rest are rejected)
METHOD_PARAMS = {"lrp-0": (), "lrp-epsilon": ("epsilon",), "lrp-gamma": ("gamma", "stabilizer"),
                 "lrp-alpha-beta": ("alpha", "beta", "stabilizer"), "flat": ("stabilizer",),
                 "w-square": ("stabilizer",), "zb": ("low", "high", "stabilizer")}

RuleSpec = Union[str, tuple]


def _rule(spec: RuleSpec, where: str) -> tuple:
    """(method, params dict) of a rule given as a name or (name, params)."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) \
            and isinstance(spec[1], Mapping):
        name, params = spec[0], dict(spec[1])
    else:
        raise MethodError(f"the rule for {where!r} must be a method name or (name, {{params}}), "
                          f"not {spec!r}")
    name = name.lower().replace("_", "-")
    if name not in LRP_METHODS:
        raise MethodError(f"unknown rule {spec!r} for {where!r}; a composite assigns the LRP rules "
                          f"{', '.join(map(repr, LRP_METHODS))}")
    wrong = sorted(set(params) - set(METHOD_PARAMS[name]))
    if wrong:
        raise MethodError(f"rule {name!r} (for {where!r}) takes no parameter "
                          f"{', '.join(wrong)}; its parameters are "
                          f"{', '.join(METHOD_PARAMS[name]) or 'none'}")
    if name == "zb":
        if not {"low", "high"} <= set(params) or params["low"] is None or params["high"] is None:
            raise MethodError(f"rule 'zb' (for {where!r}) needs low= and high=, the bounds of "
                              "the input (e.g. the normalised pixel range)")
        for k in ("low", "high"):
            params[k] = _bound(params[k], k)
    if name == "lrp-alpha-beta":
        a, b = float(params.get("alpha", 2.0)), float(params.get("beta", 1.0))
        if a < 0 or b < 0 or abs(a - b - 1) > 1e-12:
            raise MethodError(f"lrp-alpha-beta needs alpha, beta >= 0 and alpha - beta = 1 "
                              f"(Bach et al. 2015), not alpha={a}, beta={b}")
        params.update(alpha=a, beta=b)
    return name, params


def _bound(v, name):
    """A z^B bound: a float, or an array (per channel, per pixel) kept by value."""
    if isinstance(v, ArrayOption):
        return v
    arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise MethodError(f"{name} must be finite")
    return float(arr) if arr.ndim == 0 else ArrayOption(arr)


class Composite:
    """Rules per layer (see the module docstring). ``rules``: a mapping (or a sequence of pairs)
    selector -> rule, first match wins; ``default``: the rule of unmatched affine layers;
    ``stabilizer``: of every rule that has one and of the z-rule of sums and pools (1e-6);
    ``canonize``: fold batch norm into the preceding layer; ``name``: how it is reported."""

    def __init__(self, rules: Union[Mapping, Sequence] = (), *, default: RuleSpec = "lrp-epsilon",
                 stabilizer: float = 1e-6, canonize: bool = True, name: str = "composite"):
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        parsed = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise MethodError(f"a composite's rules are selector -> rule pairs, not {item!r}")
            parsed.append((item[0], _rule(item[1], item[0])))
        self.rules = tuple(parsed)
        self.default = _rule(default, "default")
        self.stabilizer = float(stabilizer)
        self.canonize = bool(canonize)
        self.name = str(name)

    def _key(self):
        def frozen(p):
            return tuple(sorted(p.items()))
        return (tuple((s, m, frozen(p)) for s, (m, p) in self.rules),
                (self.default[0], frozen(self.default[1])), self.stabilizer, self.canonize,
                self.name)

    def __eq__(self, other):
        return isinstance(other, Composite) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        body = ", ".join(f"{s!r}: {m}{p if p else ''}" for s, (m, p) in self.rules)
        return f"{self.name}({{{body}}}, default={self.default[0]})"

    def describe(self) -> dict:
        """The composite as plain data (for manifests and reports)."""
        return {"name": self.name, "rules": [[s, m, {k: repr(v) for k, v in p.items()}]
                                             for s, (m, p) in self.rules],
                "default": self.default[0], "stabilizer": self.stabilizer,
                "canonize": self.canonize}


def _merge(params: dict, stabilizer: float) -> tuple:
    p = {"stabilizer": stabilizer, **params}
    return tuple(sorted(p.items()))


def first_layers(program: Program) -> set:
    """Indices of the affine equations that read a float model input with no other affine
    equation between (Zennit's first layer, by data flow rather than by module order)."""
    raw = {v for v in program.inputs if v.is_float}
    first = set()
    for i, eqn in enumerate(program.eqns):
        rule = RULES.get(eqn.op)
        reads_raw = any(v in raw for v in eqn.inputs)
        if not reads_raw:
            continue
        if rule is not None and rule.affine:
            first.add(i)
        else:
            raw.update(o for o in eqn.outputs if o.is_float)
    return first


def _matches(selector: str, i: int, eqn, first: set) -> bool:
    if selector == "first":
        return i in first
    if selector == "first-conv":
        return i in first and eqn.op in _CONV_OPS
    if selector == "conv":
        return eqn.op in _CONV_OPS
    if selector in ("linear", "dense"):
        return eqn.op not in _CONV_OPS
    if selector == "affine":
        return True
    if selector.startswith(("aten.", "dlbjax.")):
        return eqn.op == selector
    if selector.startswith("type:"):
        kind = eqn.source.module_type.rsplit(".", 1)[-1]
        return fnmatch.fnmatchcase(kind, selector[5:])
    return fnmatch.fnmatchcase(eqn.source.module_path, selector)


def resolve(composite: Composite, program: Program) -> tuple:
    """One (method, params) per equation of ``program`` (``Options.choices``)."""
    first = first_layers(program)
    base = (LRP, _merge({}, composite.stabilizer))
    choices = []
    for i, eqn in enumerate(program.eqns):
        rule = RULES.get(eqn.op)
        if rule is None or not rule.affine:
            choices.append(base)
            continue
        method, params = composite.default
        for selector, (m, p) in composite.rules:
            if _matches(selector, i, eqn, first):
                method, params = m, p
                break
        choices.append((method, _merge(params, composite.stabilizer)))
    return tuple(choices)


# ---- Zennit's presets ---------------------------------------------------------------------------
def EpsilonPlus(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True):
    """Convolutions z-plus (alpha=1, beta=0), dense layers epsilon."""
    return Composite({"conv": ("lrp-alpha-beta", {"alpha": 1.0, "beta": 0.0}),
                      "linear": ("lrp-epsilon", {"epsilon": epsilon})}, stabilizer=stabilizer,
                     canonize=canonize, name="EpsilonPlus")


def EpsilonPlusFlat(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True):
    """The first layer flat, convolutions z-plus, dense layers epsilon."""
    return Composite({"first": "flat", "conv": ("lrp-alpha-beta", {"alpha": 1.0, "beta": 0.0}),
                      "linear": ("lrp-epsilon", {"epsilon": epsilon})}, stabilizer=stabilizer,
                     canonize=canonize, name="EpsilonPlusFlat")


def EpsilonGammaBox(low: Any, high: Any, epsilon: float = 1e-6, gamma: float = 0.25,
                    stabilizer: float = 1e-6, canonize: bool = True):
    """A first convolution z^B with the input bounds [low, high] (scalars or arrays that
    broadcast to one input row, e.g. per channel), convolutions gamma, dense layers epsilon.
    As Zennit's first map holds convolutions only, a dense first layer keeps epsilon."""
    return Composite([("first-conv", ("zb", {"low": low, "high": high})),
                      ("conv", ("lrp-gamma", {"gamma": gamma})),
                      ("linear", ("lrp-epsilon", {"epsilon": epsilon}))], stabilizer=stabilizer,
                     canonize=canonize, name="EpsilonGammaBox")


def EpsilonAlpha2Beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True):
    """Convolutions alpha=2, beta=1, dense layers epsilon."""
    return Composite({"conv": ("lrp-alpha-beta", {"alpha": 2.0, "beta": 1.0}),
                      "linear": ("lrp-epsilon", {"epsilon": epsilon})}, stabilizer=stabilizer,
                     canonize=canonize, name="EpsilonAlpha2Beta1")


def EpsilonAlpha2Beta1Flat(epsilon: float = 1e-6, stabilizer: float = 1e-6,
                           canonize: bool = True):
    """The first layer flat, convolutions alpha=2, beta=1, dense layers epsilon."""
    return Composite({"first": "flat", "conv": ("lrp-alpha-beta", {"alpha": 2.0, "beta": 1.0}),
                      "linear": ("lrp-epsilon", {"epsilon": epsilon})}, stabilizer=stabilizer,
                     canonize=canonize, name="EpsilonAlpha2Beta1Flat")


# method name -> (preset, the Explainer options it takes)
PRESETS = {
    "epsilon-plus": (EpsilonPlus, ("epsilon", "stabilizer")),
    "epsilon-plus-flat": (EpsilonPlusFlat, ("epsilon", "stabilizer")),
    "epsilon-gamma-box": (EpsilonGammaBox, ("low", "high", "epsilon", "gamma", "stabilizer")),
    "epsilon-alpha2-beta1": (EpsilonAlpha2Beta1, ("epsilon", "stabilizer")),
    "epsilon-alpha2-beta1-flat": (EpsilonAlpha2Beta1Flat, ("epsilon", "stabilizer")),
}
