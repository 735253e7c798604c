"""The torch importer's surface: export a ``torch.nn.Module`` with ``torch.export`` and translate
it (re-exported lazily by :mod:`dlbjax.importers`, so a JAX model never imports torch)."""

from __future__ import annotations

from typing import Any

import torch

from ._bind import BoundInputs, bind_inputs
from ._substitute import (Substitution, register_substitution, substituted_copy, substitutions,
                          unregister_substitution)
from ._export import KEEP_WHOLE, decomposition_table, eval_copy, export_model, static_experts_copy
from ._translate import tensor_to_numpy, torch_dtype_name, translate
from ._repeat import KEEP as REPEAT_KEEP, find_layer_stack, repeat_layers, truncated_copy
from ._export import _without_cache
from . import _mamba  # noqa: F401  (registers dlbjax::selective_scan and the Mamba mixers' substitution)

__all__ = ["import_model", "import_bound", "bind_inputs", "BoundInputs", "export_model", "translate",
           "decomposition_table", "KEEP_WHOLE", "eval_copy", "tensor_to_numpy", "torch_dtype_name",
           "static_experts_copy", "register_substitution", "unregister_substitution",
           "substitutions", "substituted_copy", "Substitution", "import_repeated",
           "reference_outputs", "REPEAT_KEEP"]


def import_model(model: torch.nn.Module, inputs: Any):
    """Export ``model`` on ``inputs`` and translate it. Returns ``(program, bound_inputs)``.

    The model is never modified: a model (or any submodule) in training mode is exported from an
    eval-mode deep copy, and modules with an export-friendly substitution
    (:func:`register_substitution`) are replaced on a copy that shares the model's tensors.
    """
    bound = bind_inputs(_check_module(model), inputs)
    return import_bound(model, bound), bound


def import_bound(model: torch.nn.Module, bound: BoundInputs):
    """Export and translate with inputs already bound (see :func:`bind_inputs`)."""
    ep = export_model(_check_module(model), bound.args, bound.kwargs)
    return translate(ep, bound.names)


def import_repeated(model: torch.nn.Module, bound: BoundInputs):
    """``(program, (path, count))`` of a model whose layers repeat, exported with its first
    three layers only and the rest written as copies in the IR (``importers/_repeat.py``), or
    None when the model has no such stack or its exported layers do not repeat cleanly (then
    :func:`import_bound` exports it whole). The caller checks the result against
    :func:`reference_outputs`."""
    stack = find_layer_stack(_check_module(model))
    if stack is None:
        return None
    path, count = stack
    ep = export_model(truncated_copy(model, path), bound.args, bound.kwargs)
    program = repeat_layers(translate(ep, bound.names), model, path, count)
    return None if program is None else (program, stack)


def reference_outputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> list:
    """The tensor outputs of the model's own eager forward (eval mode, no cache, no grad), in
    the order the exported program returns them, as numpy arrays."""
    import torch.utils._pytree as pytree
    model = eval_copy(model)
    with torch.no_grad():
        out = model(*args, **_without_cache(model, args, kwargs))
    return [tensor_to_numpy(t.float() if t.is_floating_point() else t)
            for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check_module(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model
