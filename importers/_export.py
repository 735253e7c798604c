"""Capture a PyTorch model with ``torch.export`` and decompose it to ATen, keeping layers whole.

Relevance rules attach at layer level, so the decomposition table is torch's default one minus the
layer-level operators listed in :data:`KEEP_WHOLE`: a ``nn.Linear`` stays ``aten.linear``, a
``nn.Conv2d`` stays ``aten.conv2d``, softmax stays ``aten.softmax.int``, and so on. Everything else
(in-place ops, ``flatten``, ``batch_norm``'s functional form, ...) is decomposed to functional core
ATen, which has no mutation left.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Any

import torch

from .._errors import ExportError

__all__ = ["KEEP_WHOLE", "decomposition_table", "export_model", "eval_copy"]


def _ops(*names: str) -> list:
    """Resolve ``"aten.linear.default"``-style names to OpOverloads, skipping unknown ones."""
    out = []
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None and overload in packet.overloads():
            out.append(getattr(packet, overload))
    return out


# Layer-level operators kept out of the decomposition so that one rule sees the whole layer.
KEEP_WHOLE = _ops(
    "aten.linear.default", "aten.matmul.default",
    "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
    "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding",
    "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input",
    "aten.max_pool1d.default", "aten.max_pool2d.default", "aten.max_pool3d.default",
    "aten.adaptive_avg_pool1d.default", "aten.adaptive_avg_pool2d.default",
    "aten.adaptive_max_pool1d.default",
    "aten.layer_norm.default", "aten.group_norm.default", "aten.rms_norm.default",
    "aten.softmax.int", "aten.log_softmax.int",
    "aten.relu6.default", "aten.hardtanh.default", "aten.silu.default", "aten.hardswish.default",
    "aten.hardsigmoid.default", "aten.mish.default", "aten.elu.default", "aten.selu.default",
    "aten.softplus.default", "aten.leaky_relu.default", "aten.celu.default", "aten.log_sigmoid.default",
    "aten.scaled_dot_product_attention.default",
    "aten.lstm.input", "aten.gru.input",
)


def decomposition_table() -> dict:
    """torch.export's default decomposition table without the layer-level ops of KEEP_WHOLE."""
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        if op in table:
            del table[op]
    return table


def needs_eval_copy(model: torch.nn.Module) -> bool:
    return any(m.training for m in model.modules())


def eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself if every submodule is in eval mode, else an eval-mode deep copy.

    The user's model is never changed: its training flags, parameters and buffers stay as they were.
    """
    if not needs_eval_copy(model):
        return model
    clone = copy.deepcopy(model)
    clone.eval()
    return clone


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
    """``torch.export.export(strict=False)`` then ``run_decompositions`` with our table.

    Raises ExportError with torch's message and what to do when the forward cannot be captured
    as a static graph (data-dependent control flow, unsupported Python, ...).
    """
    model = eval_copy(model)
    kwargs = _without_cache(model, args, kwargs)
    environ = dict(os.environ)  # torch sets e.g. TORCHINDUCTOR_CACHE_DIR lazily while exporting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
            ep = ep.run_decompositions(decomposition_table())
    except Exception as exc:  # torch raises many unrelated types here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.export could not capture {type(model).__name__}.forward as a static graph: "
            f"{type(exc).__name__}: {first}\n"
            "If the model itself fails on these inputs (a shape or dtype error above), fix the "
            "inputs first. Otherwise: "
            "dlbjax needs a forward without data-dependent Python control flow (if/while on tensor "
            "values, .item(), .tolist(), boolean-mask indexing). Rewrite that part with torch.where "
            "or static shapes, or explain a sub-module that exports."
        ) from exc
    finally:
        _restore_environ(environ)
    return ep


def _without_cache(model, args: tuple, kwargs: dict) -> dict:
    """``use_cache=False`` for forwards that take it (Hugging Face decoders) when the caller did
    not set it: a key/value cache object is not a tensor output, and explaining needs none."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in names and "use_cache" not in kwargs and len(args) <= names.index("use_cache"):
        return {**kwargs, "use_cache": False}
    return kwargs


def _restore_environ(before: dict) -> None:
    """Undo environment changes made during export: dlbjax leaves no global side effects."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
