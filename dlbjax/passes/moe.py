"""Mixture-of-experts models: where the routed layers are, for expert-level relevance.

* ``aten.topk`` (``lowerings/moe.py``, ``Kind.ROUTER``) is the router's choice. Its outputs (routing weights and expert indices) are
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
* ``dlbjax.importers.static_experts_copy`` switches Hugging Face MoE models to the ``batched_mm``
  experts implementation (a static graph without custom ops, importer_notes §1.3) on a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlbjax.ir import Program, Var
from dlbjax.lowerings import Kind, is_kind

__all__ = ["MoELayer", "find_moe_layers"]


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
        if not is_kind(eqn.op, Kind.ROUTER):
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
        if not is_kind(eqn.op, Kind.SUM) or not isinstance(eqn.args[0], Var):
            continue
        v = eqn.args[0]
        dims = eqn.args[1] if len(eqn.args) > 1 else None
        if v.shape[:2] == idx.shape and len(v.shape) == 3 and list(dims or []) in ([1], [-2]):
            return v
    return None
