"""Relevance rules, one per ATen operator, in a registry keyed by the operator's overload name.

>>> from dlbjax.rules import RULES, register
>>> RULES["aten.linear.default"].section
'§2.1, §3.2'

Adding an op is one ``register(...)`` call (see ``_registry.Rule`` for the calling convention)
plus one test. Modules: ``affine`` (dense, conv), ``elementwise`` (add, products, activations,
norms), ``routing`` (exact index maps), ``pooling`` (pools and reductions), ``embedding``,
``recurrent`` (LSTM, GRU, EmbeddingBag).
"""

from ._registry import (PER_STREAM, RULES, GateSpec, Options, Rule, RuleContext, Streams, get_rule,
                        register)
from . import affine, attention, elementwise, embedding, pooling, recurrent, routing  # noqa: F401  (populate RULES)
from ._math import (contrastive_coeffs, default_coeffs, gates, linear_operator_rule, unbroadcast,
                    unit_rule)
from .elementwise import EXPERIMENTAL_GATES, GATES, product_shares

__all__ = ["RULES", "Rule", "RuleContext", "register", "get_rule", "Streams", "GateSpec", "Options",
           "PER_STREAM", "GATES", "EXPERIMENTAL_GATES", "linear_operator_rule", "unit_rule",
           "default_coeffs", "contrastive_coeffs", "gates", "unbroadcast", "product_shares"]
