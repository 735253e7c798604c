"""Bind user inputs (a tensor, a tuple of positional tensors, or a dict of keyword tensors) to the
names of the model's forward signature."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from dlbjax._errors import InputMismatchError

from ._names import path_name

__all__ = ["BoundInputs", "bind_inputs", "path_name"]


@dataclass
class BoundInputs:
    """Inputs as torch.export receives them, plus a name for every tensor leaf (in flatten order)."""

    args: tuple
    kwargs: dict
    names: list[str]
    tensors: list[torch.Tensor]


def _as_torch(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def bind_inputs(model: torch.nn.Module, inputs: Any) -> BoundInputs:
    """Normalise ``inputs`` and name every tensor after the forward argument it binds to."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        args, kwargs = (_as_torch(inputs),), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), {str(k): _as_torch(v) for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(_as_torch(v) for v in inputs), {}
    else:
        raise InputMismatchError(
            f"inputs must be a tensor, a tuple of positional tensors or a dict of keyword tensors, "
            f"not {type(inputs).__name__}")

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        kinds = {p.name: p.kind for p in sig.parameters.values()}
        has_varargs = any(k == inspect.Parameter.VAR_POSITIONAL for k in kinds.values())
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            names = ", ".join(sig.parameters)
            raise InputMismatchError(
                f"the inputs do not fit {type(model).__name__}.forward({names}): {exc}") from None
        if not has_varargs:
            new_kwargs: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                if kinds[name] == inspect.Parameter.VAR_KEYWORD:
                    new_kwargs.update(value)
                else:
                    new_kwargs[name] = value
            args, kwargs = (), new_kwargs
    positional = list(sig.parameters) if sig is not None else []

    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    names, tensors = [], []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        if path[0].idx == 0:  # positional
            i = path[1].idx
            base = positional[i] if i < len(positional) else f"arg{i}"
            rest = path_name(path[2:])
        else:
            base, rest = path_name(path[1:2]), path_name(path[2:])
        names.append(f"{base}.{rest}" if rest else base)
        tensors.append(leaf)
    if not tensors:
        raise InputMismatchError("the inputs contain no tensor")
    return BoundInputs(args, kwargs, names, tensors)
