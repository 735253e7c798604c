"""Forward of mixture-of-experts routing: ``aten.topk`` (the router's choice of k experts).

Its outputs (routing weights and expert indices) are routing decisions (``Kind.ROUTER``): by
default they carry no relevance (``rules/moe.py``; spec §4.3 with the MoE decisions in
``dlbjax/_moe.py``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._table import Kind, lowering


@lowering("aten.topk.default", kinds=Kind.ROUTER)
def topk(self, k, dim=-1, largest=True, sorted=True):
    x = jnp.moveaxis(self, dim, -1)
    vals, idx = lax.top_k(x if largest else -x, k)
    vals = vals if largest else -vals
    return jnp.moveaxis(vals, -1, dim), jnp.moveaxis(idx, -1, dim)
