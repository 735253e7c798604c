"""Sequence-length buckets: one compiled relevance pass per bucket, not per sentence length.

Token inputs ([batch, T] integer tensors: ``input_ids``, ``attention_mask``, ``token_type_ids``,
...) are padded on the right to the smallest bucket length >= T, with the attention mask set to 0
on the padding (``input_ids`` padded with the model's pad token id, everything else with 0). Masked
keys get exactly zero attention, so the real tokens' predictions and relevance are those of the
unpadded input (up to float rounding), and the padding itself receives exactly 0. Results are
stripped back to length T. Each bucket is exported and compiled once, on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from . import importers  # its torch half loads on first use (a torch model is given here)
from ._errors import InputMismatchError
from ._torch import is_tensor

__all__ = ["Bucketing", "default_buckets"]


def default_buckets(max_len: int, smallest: int = 8) -> tuple[int, ...]:
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max(b, smallest))
    return tuple(out)


class Bucketing:
    def __init__(self, model, example, buckets, make_explainer):
        import torch
        bound = importers.bind_inputs(model, example)
        self.model = model
        self.make = make_explainer
        self.kwargs_template = dict(bound.kwargs)
        self.seq_names = [n for n, t in zip(bound.names, bound.tensors)
                          if not torch.is_floating_point(t) and t.ndim == 2]
        if "attention_mask" not in self.seq_names:
            raise InputMismatchError(
                "length buckets pad sequences, which needs an integer 'attention_mask' input [batch, T]; "
                "pass one (all ones if there is no padding) or use buckets=None")
        lengths = {bound.kwargs[n].shape[1] for n in self.seq_names}
        if len(lengths) != 1:
            raise InputMismatchError(f"token inputs have different lengths {sorted(lengths)}")
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or 512
        if buckets is True:
            buckets = default_buckets(limit)
        self.buckets = tuple(sorted(int(b) for b in buckets))
        pad_id = getattr(config, "pad_token_id", None)
        self.pad_values = {n: 0 for n in self.seq_names}
        self.pad_values["input_ids"] = int(pad_id) if pad_id is not None else 0
        self.inner: dict[int, Any] = {}

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if b >= length:
                return b
        raise InputMismatchError(f"sequence length {length} exceeds the largest bucket "
                                 f"{self.buckets[-1]}; pass larger buckets")

    def pad(self, kwargs: dict, length: int, bucket: int) -> dict:
        import torch
        out = dict(kwargs)
        for n in self.seq_names:
            t = torch.as_tensor(np.asarray(kwargs[n])) if not isinstance(kwargs[n], torch.Tensor) \
                else kwargs[n]
            if t.shape[1] > bucket:
                out[n] = t[:, :bucket]
            else:
                extra = torch.full((t.shape[0], bucket - t.shape[1]), self.pad_values[n], dtype=t.dtype)
                out[n] = torch.cat([t, extra], dim=1)
        return out

    def first(self):
        """The Explainer of the example's own bucket (built now: the example is checked once)."""
        return self.explainer(self.bucket_for(self.kwargs_template[self.seq_names[0]].shape[1]))

    def explainer(self, bucket: int):
        if bucket not in self.inner:
            example = {k: (v[:1] if is_tensor(v) else v)
                       for k, v in self.kwargs_template.items()}
            length = example[self.seq_names[0]].shape[1]
            self.inner[bucket] = self.make(self.pad(example, length, bucket))
        return self.inner[bucket]

    def _split(self, inputs):
        bound = importers.bind_inputs(self.model, inputs)
        missing = [n for n in self.seq_names if n not in bound.kwargs]
        if missing:
            raise InputMismatchError(f"missing token inputs {missing}")
        lengths = {np.shape(bound.kwargs[n])[1] for n in self.seq_names}
        if len(lengths) != 1:
            raise InputMismatchError(f"token inputs have different lengths {sorted(lengths)}")
        return bound.kwargs, lengths.pop()

    def run(self, inputs, target, explain: Callable):
        """``explain(bucket_explainer, padded_inputs, target)`` on the inputs' bucket, stripped
        back to the inputs' length."""
        kwargs, length = self._split(inputs)
        bucket = self.bucket_for(length)
        e = explain(self.explainer(bucket), self.pad(kwargs, length, bucket), target)
        return self.strip(e, length, bucket)

    def strip(self, e, length: int, bucket: int):
        def cut(x, min_ndim):
            if isinstance(x, tuple) and hasattr(x, "_fields"):
                return type(x)(*(cut(a, min_ndim) for a in x))
            return x[:, :length] if x.ndim >= min_ndim and x.shape[1] == bucket else x

        relevance = {k: (cut(v, 2) if k in self.seq_names else v) for k, v in e.relevance.items()}
        outputs = {k: cut(v, 3) for k, v in e.outputs.items()}  # per-token outputs [B, T, ...]
        inputs = None if e.inputs is None else {
            k: (cut(v, 2) if k in self.seq_names else v) for k, v in e.inputs.items()}
        return dataclasses.replace(e, relevance=relevance, outputs=outputs,
                                   prediction=cut(e.prediction, 3), inputs=inputs)

    @property
    def trace_count(self) -> int:
        return sum(ex.trace_count for ex in self.inner.values())
