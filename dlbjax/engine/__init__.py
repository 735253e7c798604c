"""The engine: run a program forward (``interpret``), analyse its relevance path (``analysis``)
and run the relevance pass (``relevance``: every rule in a ``jax.custom_vjp``, relevance as one
VJP of the forward)."""
