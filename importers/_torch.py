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
from . import _mamba  # noqa: F401  (registers dlbjax::selective_scan and the Mamba mixers' substitution)

__all__ = ["import_model", "import_bound", "bind_inputs", "BoundInputs", "export_model", "translate",
           "decomposition_table", "KEEP_WHOLE", "eval_copy", "tensor_to_numpy", "torch_dtype_name",
           "static_experts_copy", "register_substitution", "unregister_substitution",
           "substitutions", "substituted_copy", "Substitution"]


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


def _check_module(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model
