"""Names from pytree key paths, shared by the torch and the JAX importer (no torch import)."""

from __future__ import annotations

__all__ = ["path_name"]


def path_name(path: tuple) -> str:
    """A pytree key path as a dotted name (``("input_ids",)`` -> ``input_ids``, ``x.0.y``)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k).strip(".[]'\""))
    return ".".join(parts)
