"""The forward of every operator dlbjax runs, one family module per kind of op.

``lowerings/<family>.py`` registers each operator's JAX forward with the facts the rest of dlbjax
needs (``keep_whole`` for the exporter, :class:`Kind` flags for the analysis); ``rules/<family>.py``
holds the relevance rules of the same operators. Families: ``affine`` (dense, matmul, conv),
``pooling`` (pools and reductions), ``norm`` (norms, dropout), ``elementwise`` (activations,
arithmetic, comparisons), ``shape`` (index maps, casts, selection), ``embedding``, ``attention``,
``recurrent``, ``resample`` (interpolation, pixel shuffle), ``moe`` (top-k routing), ``fused``
(fused modules) and ``creation`` (constants; no rules). ``windows`` holds the pooling index tables shared with the rules.

>>> from dlbjax.lowerings import TABLE, Kind
>>> TABLE["aten.linear.default"].keep_whole
True
"""

from __future__ import annotations

from ._common import HIGHEST, reduce_axes
from ._table import (LOWERINGS, TABLE, Kind, Lowering, call_lowering, get_lowering, is_kind,
                     keep_whole_ops, lowering, ops_of_kind, register_lowering)
from . import (affine, attention, creation, elementwise, embedding, fused, moe, norm,  # noqa: F401
               pooling, recurrent, resample, shape)  # (populate the table)

FAMILIES = ("affine", "attention", "creation", "elementwise", "embedding", "fused", "moe", "norm",
            "pooling", "recurrent", "resample", "shape")

__all__ = ["LOWERINGS", "TABLE", "Kind", "Lowering", "lowering", "register_lowering",
           "get_lowering", "is_kind", "ops_of_kind", "keep_whole_ops", "call_lowering", "HIGHEST",
           "reduce_axes", "FAMILIES"]
