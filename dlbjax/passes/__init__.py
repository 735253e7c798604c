"""Passes over an imported program: ``fuse`` (written-out activations and norms to one equation),
``precision`` (half precision computed in float32), ``magnitudes`` (|W| once, CPU conv layouts)
and ``moe`` (where the routed layers are)."""
