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
from torch.nn.utils.rnn import PackedSequence

from dlbjax._errors import ExportError
from dlbjax.lowerings import keep_whole_ops
from ._substitute import substituted_copy
from . import _mamba  # noqa: F401  (registers dlbjax::selective_scan and the Mamba substitution)

__all__ = ["KEEP_WHOLE", "decomposition_table", "export_model", "eval_copy", "static_experts_copy"]


def _ops(*names: str) -> list:
    """Resolve ``"aten.linear.default"``-style names to OpOverloads, skipping unknown ones."""
    out = []
    for name in names:
        ns, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None and overload in packet.overloads():
            out.append(getattr(packet, overload))
    return out


# Layer-level operators kept out of the decomposition so that one rule sees the whole layer: the
# lowerings registered with keep_whole=True (dlbjax/lowerings/<family>.py).
KEEP_WHOLE = _ops(*keep_whole_ops())


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
    as a static graph (data-dependent control flow, unsupported Python, ...). Modules with a
    registered export-friendly substitution (``_substitute.py``) are replaced first, on a copy
    that shares the model's tensors, after checking that the copy's forward is the model's.
    """
    model = eval_copy(model)
    kwargs = _without_cache(model, args, kwargs)
    environ = dict(os.environ)  # torch sets e.g. TORCHINDUCTOR_CACHE_DIR lazily while exporting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            static = substituted_copy(model, tuple(args), dict(kwargs))
            ep = torch.export.export(static, tuple(args), dict(kwargs), strict=False)
            ep = ep.run_decompositions(decomposition_table())
    except ExportError:  # a substitution that changes the output
        raise
    except Exception as exc:  # torch raises many unrelated types here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _from_packed_sequence(exc):
            raise ExportError(
                f"torch.export could not capture {type(model).__name__}.forward: it packs a "
                "sequence (torch.nn.utils.rnn.pack_padded_sequence / PackedSequence), whose batch "
                "sizes per step are data-dependent, so it has no static graph "
                f"({type(exc).__name__}: {first}).\nPass the padded batch to the LSTM/GRU "
                "instead: with a forward direction, outputs at step t never see later (padded) "
                "steps, so read each row's output at its last valid step (e.g. with "
                "torch.gather on the lengths) rather than h_n, which would include the padding."
            ) from exc
        if type(model).__module__.startswith("torchvision.models.detection"):
            raise ExportError(
                f"torch.export could not capture {type(model).__name__}.forward as a static graph: "
                f"{type(exc).__name__}: {first}\ntorchvision detectors keep the anchors or "
                "proposals above a score threshold and run NMS, so how many boxes come out "
                "depends on the data. Run the detector in torch, then explain its backbone and "
                "head on the fixed anchor behind a detection: a small nn.Module that returns that "
                "anchor's class logit (task='binary') or its 4 box deltas "
                "(task='bbox-regression'); see notebooks/07_detection.ipynb."
            ) from exc
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


def _from_packed_sequence(exc: BaseException) -> bool:
    """Whether the export failure was raised while packing a sequence (torch/nn/utils/rnn.py, or
    an RNN called on a PackedSequence)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_filename.replace("\\", "/").endswith("nn/utils/rnn.py") or any(
                    isinstance(v, PackedSequence) for v in tb.tb_frame.f_locals.values()):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


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
