"""How a scan over layers should read its weights (issue 15 item 1, the next step).

Today a run of identical layers (``dlbjax/passes/layers.py``) is computed as one ``lax.scan``
over its weights *stacked* into one array per weight (``stack_weights``): a second copy of every
layer's weights, held by the runner next to the per-layer constants (``_runner.call_state``),
or, when stacked inside the compiled call, a copy in XLA's temporaries. The alternative measured
here reads each layer's weights in place: the scan runs over the layer index, its body picks
layer ``i``'s weights with ``lax.switch`` over the per-layer arrays, and the body is
``jax.checkpoint``-ed so that the backward pass (the relevance pass is a VJP) recomputes the
body instead of saving the weights it picked as per-step residuals.

A stand-in for a decoder's layers: ``depth`` layers of ``tanh(h @ W_i)`` with ``[hidden,
hidden]`` weights, a VJP through all of them (as the relevance pass), batch 8. Printed per
variant: XLA's temporary bytes of the compiled VJP (``memory_analysis()``; the weights passed
as arguments excluded), its median time, both as ratios to the stacked variant, and whether the
gradients agree. Run by hand:

    python benchmarks/bench_scan_weights.py [--hidden 1024] [--depth 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def layer(h, w):
    return jnp.tanh(h @ w)


def stacked(ws, x):
    """Today's lowering, stacked inside the call (the runner stacks once, outside)."""
    def step(h, w):
        return layer(h, w), None
    return jax.lax.scan(step, x, jnp.stack(ws))[0].sum()


def switched(ws, x):
    """Weights read in place: switch on the layer index, checkpointed body."""
    branches = [lambda k=k: ws[k] for k in range(len(ws))]

    def step(h, i):
        return layer(h, jax.lax.switch(i, branches)), None
    return jax.lax.scan(jax.checkpoint(step), x, jnp.arange(len(ws)))[0].sum()


def named(ws, x):
    """Weights read in place, and only they recomputed in the backward pass: the picked weights
    are named and the checkpoint policy saves every residual but them."""
    from jax.ad_checkpoint import checkpoint_name
    branches = [lambda k=k: ws[k] for k in range(len(ws))]
    policy = jax.checkpoint_policies.save_anything_except_these_names("layer_weights")

    def step(h, i):
        w = checkpoint_name(jax.lax.switch(i, branches), "layer_weights")
        return layer(h, w), None
    return jax.lax.scan(jax.checkpoint(step, policy=policy), x, jnp.arange(len(ws)))[0].sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from common import interleaved, machine_line
    print(machine_line())
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(args.hidden)
    ws = [jnp.asarray(rng.standard_normal((args.hidden, args.hidden)).astype(np.float32) * scale)
          for _ in range(args.depth)]
    x = jnp.asarray(rng.standard_normal((8, args.hidden)).astype(np.float32))
    weights_mib = args.depth * args.hidden ** 2 * 4 / 2**20
    print(f"{args.depth} layers of tanh(h @ W), hidden {args.hidden}, batch 8, float32; weights "
          f"{weights_mib:.0f} MiB; VJP through all layers; times are medians of {args.repeats}\n")
    fns, temps = {}, {}
    for fn in (stacked, switched, named):
        compiled = jax.jit(jax.grad(fn, argnums=1)).lower(ws, x).compile()
        temps[fn.__name__] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        fns[fn.__name__] = (lambda c=compiled: c(ws, x))
    times = interleaved(fns, args.repeats)
    ga = fns["stacked"]()
    diff = max(float(jnp.max(jnp.abs(a - b))) for name in ("switched", "named")
               for a, b in zip(ga, fns[name]()))
    print("| variant | XLA temp MiB | temp / stacked | time ms | time / stacked |")
    print("|---|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {temps[name]:.1f} | {temps[name] / temps['stacked']:.2f}x | "
              f"{times[name] * 1e3:.1f} | {times[name] / times['stacked']:.2f}x |")
    print(f"\nlargest |gradient difference|: {diff:.3g} (bitwise equal: {diff == 0.0})")


if __name__ == "__main__":
    main()
