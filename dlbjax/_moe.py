"""Mixture-of-experts support: top-k routing, expert-level relevance, experts implementations.

* ``aten.topk`` gets a forward lowering. Its outputs (routing weights and expert indices) are
  routing decisions: by default they carry no relevance, so the router gets none and the
  products ``expert_output * routing_weight`` are products with a constant (identity to the expert
  output), and the sum over the selected experts splits each token's relevance in proportion to
  |routing weight x expert output| (the reduction rule, §4.2/§4.4). With
  ``router_relevance=True`` the routing weights carry relevance like any activation (products then
  use the product rule and the router's linear layer gets its share).
* :func:`find_moe_layers` locates, for each top-k router, the tensor of weighted expert outputs
  ``[tokens, k, hidden]`` that is summed over the k selected experts, so the explanation can report
  relevance per expert and per (token, expert) from that tensor's relevance and the router's
  indices.
* :func:`static_experts_copy` switches Hugging Face MoE models to the ``batched_mm`` experts
  implementation (a static graph without custom ops, importer_notes §1.3) on a copy, never on
  the user's model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from ._errors import ExportError
from ._lowering import lowering
from .ir import Program, Var

__all__ = ["MoELayer", "find_moe_layers", "static_experts_copy", "ROUTING_OPS"]

ROUTING_OPS = frozenset({"aten.topk.default"})


@lowering("aten.topk.default")
def topk(self, k, dim=-1, largest=True, sorted=True):
    x = jnp.moveaxis(self, dim, -1)
    vals, idx = lax.top_k(x if largest else -x, k)
    vals = vals if largest else -vals
    return jnp.moveaxis(vals, -1, dim), jnp.moveaxis(idx, -1, dim)


@dataclass(frozen=True)
class MoELayer:
    """One routed layer: where it sits, the router's indices and the weighted expert outputs."""

    name: str
    indices: Var       # [tokens, k] expert ids chosen per token
    weighted: Var      # [tokens, k, hidden] routing weight x expert output, summed over k
    num_experts: int


def find_moe_layers(program: Program) -> list[MoELayer]:
    producers = program.producers()
    consumers = program.consumers()
    layers = []
    for eqn in program.eqns:
        if eqn.op not in ROUTING_OPS:
            continue
        idx = eqn.outputs[1]
        num_experts = eqn.args[0].shape[-1] if isinstance(eqn.args[0], Var) else 0
        weighted = _weighted_outputs(program, idx, consumers, producers)
        if weighted is not None:
            layers.append(MoELayer(eqn.source.module_path or eqn.outputs[0].name, idx, weighted,
                                   num_experts))
    return layers


def _weighted_outputs(program, idx, consumers, producers):
    """The [tokens, k, hidden] tensor summed over the k axis after this router (same block)."""
    start = program.eqns.index(producers[idx])
    for eqn in program.eqns[start + 1:]:
        if eqn.op != "aten.sum.dim_IntList" or not isinstance(eqn.args[0], Var):
            continue
        v = eqn.args[0]
        dims = eqn.args[1] if len(eqn.args) > 1 else None
        if v.shape[:2] == idx.shape and len(v.shape) == 3 and list(dims or []) in ([1], [-2]):
            return v
    return None


def static_experts_copy(model):
    """A copy of a Hugging Face MoE model that uses the static ``batched_mm`` experts (or the
    model itself when it already does or has no such switch)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_experts_implementation"):
        return model
    current = getattr(config, "_experts_implementation", None)
    if current == "batched_mm":
        return model
    if not any("Experts" in type(m).__name__ for m in model.modules()):
        return model
    clone = copy.deepcopy(model)
    try:
        clone.set_experts_implementation("batched_mm")
    except Exception as exc:  # the model cannot switch: keep its own implementation
        raise ExportError(
            f"{type(model).__name__} could not switch to the static 'batched_mm' experts "
            f"implementation ({exc}); dlbjax needs an MoE graph without data-dependent shapes") from exc
    return clone
