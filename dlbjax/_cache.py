"""Opt-in persistent compilation cache.

dlbjax changes no global setting on import or when explaining. Compiling a relevance pass takes
seconds to a minute for large models; :func:`enable_compilation_cache` switches on JAX's
persistent cache, an explicit process-wide setting, so that a later process reuses the compiled
executables for the same model, shapes, options and JAX version.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

__all__ = ["enable_compilation_cache"]

_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes")


def enable_compilation_cache(path: Any, min_compile_time_secs: float = 0.0) -> dict:
    """Cache compiled XLA executables in the directory ``path`` (created if needed).

    A global JAX setting (``jax_compilation_cache_dir``), for every jitted function of the process,
    not just dlbjax's. Entries are cached when compiling took at least ``min_compile_time_secs``
    (JAX's default is 1 s; here 0, so every relevance pass is cached). Returns the previous values
    of the settings it changed, so ``jax.config.update(k, v)`` for each restores them.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    previous = {k: getattr(jax.config, k) for k in _KEYS}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return previous
