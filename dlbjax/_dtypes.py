"""dtype names and the dtypes dlbjax computes in.

* :func:`jnp_dtype`: an IR dtype name as a JAX dtype, honouring ``jax_enable_x64`` (int64 -> int32,
  float64 -> float32, complex128 -> complex64 when it is off).
* :func:`relevance_dtype`: the dtype relevance is accumulated in (spec §7.3): float32, or float64
  when ``jax_enable_x64`` is on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["jnp_dtype", "relevance_dtype"]


def jnp_dtype(name):
    """dtype name -> JAX dtype, honouring jax_enable_x64 (int64 -> int32, float64 -> float32)."""
    if name is None:
        return None
    x64 = jax.config.jax_enable_x64
    if name == "int64" and not x64:
        return jnp.int32
    if name == "float64" and not x64:
        return jnp.float32
    if name == "complex128" and not x64:
        return jnp.complex64
    return jnp.dtype(name)


def relevance_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
