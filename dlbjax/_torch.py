"""torch type checks that never import torch: an object can only be a torch tensor or module when
torch is already imported, so a JAX model (or NumPy inputs) never pulls torch in."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_tensor", "is_module", "is_device"]


def _torch():
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def is_module(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.nn.Module)


def is_device(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.device)
