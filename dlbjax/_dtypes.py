"""The dtype relevance is accumulated in (spec §7.3): float32, or float64 when jax_enable_x64 is on."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["relevance_dtype"]


def relevance_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
