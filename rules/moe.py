"""Mixture-of-experts routing (spec §4.3; the MoE decisions in ``dlbjax/passes/moe.py``).

``aten.topk`` is a routing decision: by default its outputs carry no relevance (the analysis stops
at ``Kind.ROUTER`` ops), so the router gets none. With ``router_relevance=True`` the routing
weights (output 0) carry relevance and topk is the exact index map that selects them: the VJP of
its forward (``shape.route``); the indices (output 1) never carry any.
"""

from __future__ import annotations

from ._registry import register
from .shape import route

__all__ = []

register("aten.topk.default", default=route, outputs=(0,), shared=True, section="§4.3 (MoE routing)")
