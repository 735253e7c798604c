"""Comparing a model written in JAX with its torch twin (identical weights copied across)."""

from __future__ import annotations

import numpy as np


def close(a, b, rtol=1e-5):
    """``a`` equals a non-zero ``b`` within ``rtol`` relative to ``b``'s largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape and np.abs(b).max() > 0
    scale = max(np.abs(b).max(), 1e-12)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)
