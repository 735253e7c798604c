"""Normalisation layers and dropout (spec §4.8, §8.10, §9.4): identity for the normalised input.

Batch norm in inference, layer/group/RMS norm (with their affine parameters as part of the op)
and dropout in eval pass relevance unchanged to their first operand; the statistics outputs of
``native_layer_norm`` and of the batch-norm kernel (mean, rstd) carry none; a negative scale does
not swap the contrastive streams (§8.10).
"""

from __future__ import annotations

from ._registry import register
from .elementwise import identity

__all__ = []

register("aten._native_batch_norm_legit_no_training.default", "aten.native_layer_norm.default",
         default=identity, outputs=(0,), shared=True, section="§4.8, §8.10, §9.4")
register("aten.batch_norm.default", "aten.layer_norm.default", "aten.group_norm.default",
         "aten.rms_norm.default", "aten.dropout.default", "aten.feature_dropout.default",
         "aten.alpha_dropout.default", default=identity, shared=True, section="§4.8, §8.10, §9.4")
