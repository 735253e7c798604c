"""Relevance rules in a registry keyed by (ATen operator overload, method); DLBacktrace's rules are
the default method ``"dlb"``.

>>> from dlbjax.rules import RULES, register
>>> RULES["aten.linear.default"].section
'§2.1, §3.2'

Adding an op is one ``register(...)`` call in ``rules/<family>.py`` beside its forward in
``dlbjax/lowerings/<family>.py`` (see ``_registry`` for the calling convention), plus one test
case. Families: ``affine`` (dense, conv), ``pooling`` (pools and reductions), ``norm`` (norms,
dropout), ``elementwise`` (add, products, activations), ``shape`` (exact index maps, casts,
selection), ``embedding`` (lookups, bags), ``attention``, ``recurrent`` (LSTM, GRU),
``resample`` (interpolation, pixel shuffle), ``moe`` (top-k routing) and ``fused`` (fused
modules). ``_math`` holds the shared unit formulas.
"""

from dlbjax._types import Streams

from ._registry import (DLB, PER_STREAM, RULE_TABLE, RULES, GateSpec, Options, Rule, RuleContext,
                        RuleResult, get_rule, methods, register)
from . import (affine, attention, elementwise, embedding, fused, moe, norm, pooling,  # noqa: F401
               recurrent, resample, shape)  # (populate the registry)
from ._math import (contrastive_coeffs, default_coeffs, gates, linear_operator_rule, unbroadcast,
                    unit_rule)
from .elementwise import EXPERIMENTAL_GATES, GATES, product_shares

FAMILIES = ("affine", "attention", "elementwise", "embedding", "fused", "moe", "norm", "pooling",
            "recurrent", "resample", "shape")

__all__ = ["RULES", "RULE_TABLE", "Rule", "RuleContext", "RuleResult", "register", "get_rule",
           "methods", "DLB", "Streams", "GateSpec", "Options", "PER_STREAM", "GATES",
           "EXPERIMENTAL_GATES", "linear_operator_rule", "unit_rule", "default_coeffs",
           "contrastive_coeffs", "gates", "unbroadcast", "product_shares", "FAMILIES"]
